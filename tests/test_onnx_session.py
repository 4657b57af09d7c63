"""Every onnxruntime session of the package comes from `core.onnx_model.onnx_session`."""

from __future__ import annotations

from facegender.core import onnx_model
from facegender.core.faces import FaceDetector


def test_the_face_detector_gets_its_session_from_the_one_factory(monkeypatch):
    calls = []
    real = onnx_model.onnx_session
    monkeypatch.setattr("facegender.core.faces.detect.onnx_session",
                        lambda source, threads=None, **kw: calls.append((threads, kw)) or real(source, threads, **kw))
    detector = FaceDetector(threads=1, arena=False)
    session = detector._get_session()
    assert detector._get_session() is session and calls == [(1, {"arena": False})]
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and not options.enable_cpu_mem_arena


def test_sessions_keep_the_memory_arena_unless_told_otherwise():
    from facegender.core.faces.detect import retinaface_weights

    options = onnx_model.onnx_session(retinaface_weights()).get_session_options()
    assert options.enable_cpu_mem_arena and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
