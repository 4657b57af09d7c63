"""Every onnxruntime session of the package comes from `core.onnx_model.onnx_session`."""

from __future__ import annotations

from facegender.core import onnx_model
from facegender.core.faces import FaceDetector


def test_the_face_detector_gets_its_session_from_the_one_factory(monkeypatch):
    calls = []
    real = onnx_model.onnx_session
    monkeypatch.setattr(
        "facegender.core.faces.detect.onnx_session",
        lambda source, threads=None, **kw: calls.append((threads, kw)) or real(source, threads, **kw),
    )
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


def test_the_server_loads_its_model_without_memory_arenas():
    """serve's model: classifier and face detector sessions without onnxruntime's CPU arena (which
    keeps the largest request's buffers for good); a plain load keeps them."""
    import facegender
    from facegender.app.serve import create_app
    from facegender.core.resources import default_model_path

    served = create_app(default_model_path()).state.predictor
    plain = facegender.load()
    for model, arena in ((served, False), (plain, True)):
        assert model.backend.session.get_session_options().enable_cpu_mem_arena is arena
        assert model.detector._get_session().get_session_options().enable_cpu_mem_arena is arena


def test_the_server_caps_malloc_arenas_on_glibc():
    """mallopt(M_ARENA_MAX) is accepted where the C library is glibc, and is a no-op elsewhere."""
    import platform

    from facegender.core.memory import limit_heap_arenas

    assert limit_heap_arenas() is (platform.libc_ver()[0] == "glibc")
