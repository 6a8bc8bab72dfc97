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
