"""Faces in photos: `detect` finds them (RetinaFace on onnxruntime, 5 landmarks), `align` warps
each onto a fixed template. The names of both are here: `from facegender.core.faces import
FaceDetector, align_face`."""

from facegender.core.faces.align import (
    ARCFACE_SIZE,
    ARCFACE_TEMPLATE_112,
    DLIB_CHIP_FACE_FRACTION,
    DLIB_CHIP_FILL,
    DLIB_CHIP_SIZE,
    FaceAlignConfig,
    align_face,
    alignment_matrix,
    fallback_crop,
    similarity_transform,
    template_landmarks,
    warp_affine,
)
from facegender.core.faces.detect import (
    DetectedFace,
    FaceDetector,
    align_or_fallback,
    decode_retinaface,
    detect_and_align,
    retinaface_weights,
    select_faces,
)

__all__ = [
    "ARCFACE_SIZE",
    "ARCFACE_TEMPLATE_112",
    "DLIB_CHIP_FACE_FRACTION",
    "DLIB_CHIP_FILL",
    "DLIB_CHIP_SIZE",
    "FaceAlignConfig",
    "align_face",
    "alignment_matrix",
    "fallback_crop",
    "similarity_transform",
    "template_landmarks",
    "warp_affine",
    "DetectedFace",
    "FaceDetector",
    "align_or_fallback",
    "decode_retinaface",
    "detect_and_align",
    "retinaface_weights",
    "select_faces",
]
