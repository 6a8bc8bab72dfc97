"""The TensorRT backend's arithmetic, tested without TensorRT or a GPU: CUDA status checks,
dtype map, buffer sizes, the 2D copy of new cache columns, profile choice."""

from __future__ import annotations

import enum

import numpy as np
import pytest

from saisa_edge.backends import tensorrt as trt_backend
from saisa_edge.errors import SaisaError


class _Status(enum.IntEnum):  # cuda-python's cudaError_t is an IntEnum
    cudaSuccess = 0
    cudaErrorIllegalAddress = 700


def test_every_cuda_status_is_checked():
    assert trt_backend.cuda_check("cudaMalloc", (_Status.cudaSuccess, 1234)) == 1234
    assert trt_backend.cuda_check("cudaStreamSynchronize", (_Status.cudaSuccess,)) == ()
    with pytest.raises(SaisaError, match="cudaStreamSynchronize failed \\(cudaErrorIllegalAddress\\)"):
        trt_backend.cuda_check("cudaStreamSynchronize", (_Status.cudaErrorIllegalAddress,))


def test_tensorrt_refusals_are_one_line_errors():
    trt_backend.trt_check("set_input_shape(x, (1,))", True)
    with pytest.raises(SaisaError, match="set_input_shape\\(past_key.0, \\(1, 2\\)\\) was refused"):
        trt_backend.trt_check("set_input_shape(past_key.0, (1, 2))", False)


def test_real_cuda_bindings_report_through_the_check():
    """On a machine without a GPU, cuda-python's own status comes back as a one-line error."""
    rt = pytest.importorskip("cuda.bindings.runtime")
    result = rt.cudaGetDeviceCount()
    if int(result[0]) == 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(SaisaError, match="^--backend tensorrt: cudaGetDeviceCount failed"):
        trt_backend.cuda_check("cudaGetDeviceCount", result)


def test_dtypes_and_sizes():
    assert trt_backend.TRT_DTYPES["HALF"] == np.float16 and trt_backend.TRT_DTYPES["INT64"] == np.int64
    assert trt_backend.TRT_DTYPES["BF16"].itemsize == 2
    assert trt_backend.nbytes((2, 3, 5), np.dtype(np.float16)) == 60
    assert trt_backend.nbytes((1, 4, 0, 64), np.dtype(np.float32)) == 1  # an empty tensor still has an address


def test_new_columns_copy_matches_numpy_slicing():
    """The 2D copy's rows/width/pitch/offset, applied to bytes, give exactly a[:, :, p:p+t]."""
    a = np.arange(2 * 3 * 7 * 4, dtype=np.float16).reshape(2, 3, 7, 4)
    p, t = 5, 2
    c = trt_backend.columns(a.shape, p, t, a.itemsize)
    raw = a.tobytes()
    got = b"".join(raw[c.offset + r * c.pitch: c.offset + r * c.pitch + c.width] for r in range(c.rows))
    assert got == np.ascontiguousarray(a[:, :, p:p + t]).tobytes()


def test_profiles():
    assert trt_backend.decode_profile(7) == 0 and trt_backend.decode_profile(1) == 1


def test_no_torch_and_no_plugin_code_at_import():
    import subprocess
    import sys

    code = ("import sys; import saisa_edge.backends.tensorrt; "
            "print(sorted(m for m in ('torch', 'triton', 'saisa_edge.plugins.trt_plugin') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the engine wrapper against a stand-in with TensorRT's shape semantics ------------------------
# An execution context keeps the input shapes last set on it, and output shapes follow from them;
# `execute_async_v3` runs with whatever shapes are set at that moment (what a real engine does).

class _Names(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class _FakeTrt:
    TensorIOMode = _Names


class _Context:
    def __init__(self, engine: "_FakeEngine"):
        self.engine, self.shapes, self.executed, self.profile = engine, {}, [], None

    def set_optimization_profile_async(self, p, stream):
        if self.engine.refuse_profile:
            raise RuntimeError("Error in set optimization profile async.")  # the binding raises; never False
        self.profile = p
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"][:1] + (self.shapes["x"][1] * 2,)  # y = [B, 2T]

    def set_tensor_address(self, name, ptr):
        return True

    def execute_async_v3(self, stream):
        if self.engine.fail_next:
            self.engine.fail_next = False
            return False
        self.executed.append(dict(self.shapes))
        return True


class _Dtype:
    def __init__(self, name):
        self.name = name


class _FakeEngine:
    num_io_tensors, num_optimization_profiles = 2, 2
    refuse_profile = fail_next = False
    out_dtype = "FLOAT"

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def get_tensor_mode(self, name):
        return _Names.INPUT if name == "x" else _Names.OUTPUT

    def get_tensor_dtype(self, name):
        return _Dtype("INT64" if name == "x" else self.out_dtype)

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 1), (1, 4), (2, 64)]

    def create_execution_context(self):
        self.contexts = [*getattr(self, "contexts", []), _Context(self)]
        return self.contexts[-1]


class _FakeRuntime:
    def __init__(self, engine):
        self.engine = engine

    def deserialize_cuda_engine(self, data):
        return self.engine


class _FakeCuda:
    stream = 7

    def __init__(self):
        self.next, self.live, self.staged = 4096, {}, []

    def malloc(self, size):
        self.next += 4096
        self.live[self.next] = size
        return self.next

    def upload(self, ptr, a):
        assert a.nbytes <= self.live[ptr]
        self.staged.append(a)


def _engine(tmp_path, **fake):
    engine = _FakeEngine()
    vars(engine).update(fake)
    (tmp_path / "decoder.engine").write_bytes(b"")
    return engine, trt_backend._Engine(_FakeTrt, _FakeRuntime(engine), tmp_path / "decoder.engine", _FakeCuda())


def test_a_run_executes_with_its_own_shapes_even_when_buffers_are_new(tmp_path):
    """Sizing a new buffer must not reset the live context to the profile's largest shapes."""
    fake, engine = _engine(tmp_path)
    out = engine.run({"x": np.zeros((1, 3), np.int64)}, {}, profile=0, slot=1)
    assert fake.contexts[0].executed[-1]["x"] == (1, 3) and out["y"].shape == (1, 6)
    assert engine.cuda.live[out["y"].ptr] == 2 * 128 * 4  # sized for the profile's largest output


def test_the_profile_switch_failure_is_one_line(tmp_path):
    with pytest.raises(SaisaError, match="set_optimization_profile_async\\(0\\) failed"):
        _engine(tmp_path, refuse_profile=True)


def test_an_unknown_tensor_type_is_one_line(tmp_path):
    with pytest.raises(SaisaError, match="tensor y is FP8"):
        _engine(tmp_path, out_dtype="FP8")


def test_uploads_keep_their_source_until_sync():
    """An async copy from pageable memory may read its source after the call returns."""
    cuda = trt_backend._Cuda.__new__(trt_backend._Cuda)
    calls = []

    class _Rt:
        class cudaMemcpyKind:
            cudaMemcpyHostToDevice = 1

        def cudaMemcpyAsync(self, *args):
            calls.append(args)
            return (_Status.cudaSuccess,)

        def cudaStreamSynchronize(self, stream):
            return (_Status.cudaSuccess,)

    cuda.rt, cuda.stream, cuda._staged = _Rt(), 7, []
    cuda.upload(4096, np.arange(6, dtype=np.int64)[::2])  # a non-contiguous view: a temporary is made
    assert len(cuda._staged) == 1 and calls[0][1] == cuda._staged[0].ctypes.data
    cuda.sync()
    assert cuda._staged == []


def test_a_failed_step_keeps_the_slot_the_cache_lives_in(tmp_path, monkeypatch):
    """After a refused run, the next step must not write into the buffers it reads in place."""
    backend = trt_backend.TensorRTBackend.__new__(trt_backend.TensorRTBackend)
    slots = []

    class _Decoder:
        def run(self, host, device, profile, slot):
            slots.append(slot)
            raise SaisaError("execute_async_v3 was refused")

    backend.engines, backend._slot = {"decoder": _Decoder()}, 0
    backend._cache, backend._lock = (None, {}), __import__("threading").Lock()
    monkeypatch.setattr(backend, "_visual_on_device", lambda engine, visual: {}, raising=False)
    from saisa_edge.runtime.kv import TextCache

    cache = TextCache((), (), np.zeros((1, 0), np.int64))
    backend._layers = 0
    for _ in range(2):
        with pytest.raises(SaisaError):
            backend.forward(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), cache, None)
    assert slots == [1, 1] and backend._slot == 0
