"""TensorRT engines as a backend (runs engine folders from `saisa-edge build`).

Device memory and the stream come from cuda-python (`cuda.bindings.runtime`); every CUDA
call's status is checked (`cuda_check`), as is every TensorRT setter's answer (`trt_check`).
No torch, and no Python plugin code: an engine built with the NAAViT plugin carries its
AOT kernel and deserializes without it.

Buffers are allocated once per (engine, profile, tensor) at the profile's largest shapes
and reused. What crosses the bus:
  - once per image: pixels up, features down (the runtime caches numpy arrays), features
    up, the visual K/V down; then the visual K/V up once per VisualKV object, kept on the
    device for every step that uses it (as the ONNX Runtime backend keeps its feeds).
  - every decoder step: ids and positions up; logits [B, T, vocab], the new positions and
    the new T columns of each layer's K/V down (the host keeps the text cache). The past
    K/V and positions go up only when the cache is not the one the previous step returned;
    when it is (plain decoding), its device copy is read in place (two output sets, alternating).
  - the host appends the new columns to its copy of the cache: a host-side copy of the
    cache per step (numpy concatenation), which on a Jetson's shared memory is the same RAM.
Nothing here runs without TensorRT and a GPU; the arithmetic it relies on (shapes, sizes,
dtypes, status checks) is in functions tested without them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saisa_edge.artifacts import Engines
from saisa_edge.artifacts import names as io
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.errors import SaisaError
from saisa_edge.runtime.kv import NUMPY_DTYPES, TextCache, VisualKV

INSTALL_HINT = ("install TensorRT 10.9+ (x86-64: `pip install tensorrt`; Jetson: JetPack's python3-libnvinfer) "
                "and cuda-python, and run on a machine with an NVIDIA GPU")

TRT_DTYPES: dict[str, np.dtype[Any]] = {"FLOAT": np.dtype(np.float32), "HALF": np.dtype(np.float16), "BF16": NUMPY_DTYPES["bf16"],
              "INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32)}
"""TensorRT DataType names -> numpy dtypes of the host arrays."""

Shape = tuple[int, ...]


def host_dtype(engine: Path, tensor: str, trt_name: str) -> np.dtype[Any]:
    """The numpy dtype for a TensorRT tensor type, or a one-line error naming the tensor."""
    if trt_name not in TRT_DTYPES:
        raise SaisaError(f"{engine}: tensor {tensor} is {trt_name}, which this runtime does not exchange "
                         f"({', '.join(TRT_DTYPES)}); rebuild the engines with `saisa-edge build`")
    return TRT_DTYPES[trt_name]


def import_tensorrt(what: str) -> Any:
    """TensorRT's module, or a one-line error (type stubs alone install an empty `tensorrt`)."""
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is None or not hasattr(trt, "Builder"):
        raise SaisaError(f"{what}: TensorRT is not installed; {INSTALL_HINT}")
    return trt


def cuda_check(call: str, result: Any, hint: str = "") -> Any:
    """cuda-python returns (status, *values): the values, or a one-line error naming the call
    (`hint` says what to do; the install hint only where a failure means no usable GPU)."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise SaisaError(f"--backend tensorrt: {call} failed ({getattr(status, 'name', status)})"
                         + (f"; {hint}" if hint else ""))
    return values[0] if len(values) == 1 else tuple(values)


def trt_check(call: str, ok: bool) -> None:
    """TensorRT's setters answer False (and log why) instead of raising: one line naming the call."""
    if not ok:
        raise SaisaError(f"--backend tensorrt: {call} was refused (see TensorRT's log); "
                         "rebuild the engines with `saisa-edge build` if the shapes exceed their profiles")


def nbytes(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    """Bytes of a dense tensor; at least 1, so an empty tensor still gets an address."""
    return max(math.prod(shape) * dtype.itemsize, 1)


@dataclass(frozen=True)
class Columns:
    """A 2D copy that takes columns [start, start + count) of the third axis of a dense
    [a, b, n, d] tensor: `rows` rows of `width` bytes, `pitch` bytes apart, from byte `offset`."""

    rows: int
    width: int
    pitch: int
    offset: int


def columns(shape: Shape, start: int, count: int, itemsize: int) -> Columns:
    a, b, n, d = shape
    return Columns(rows=a * b, width=count * d * itemsize, pitch=n * d * itemsize, offset=start * d * itemsize)


def decode_profile(tokens: int) -> int:
    """Profile 0 serves prefill (T > 1), profile 1 decode (T = 1), as `plugins.build` makes them."""
    return 0 if tokens > 1 else 1


class _Cuda:
    """The few runtime calls used here, each checked."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise SaisaError(f"--backend tensorrt: cuda-python is not installed; {INSTALL_HINT}") from None
        self.rt = cudart
        if cuda_check("cudaGetDeviceCount", cudart.cudaGetDeviceCount(), INSTALL_HINT) < 1:
            raise SaisaError(f"--backend tensorrt: no CUDA GPU is visible; {INSTALL_HINT}")
        self.stream = cuda_check("cudaStreamCreate", cudart.cudaStreamCreate(), INSTALL_HINT)
        self._staged: list[np.ndarray] = []  # host sources of copies in flight: alive until sync()

    def capability(self) -> tuple[int, int]:
        props = cuda_check("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(0))
        return int(props.major), int(props.minor)

    def malloc(self, size: int) -> int:
        return int(cuda_check("cudaMalloc", self.rt.cudaMalloc(size)))

    def free(self, ptr: int) -> None:
        cuda_check("cudaFree", self.rt.cudaFree(ptr))

    def upload(self, ptr: int, a: np.ndarray) -> None:
        """`a` is kept until `sync()`: CUDA does not promise that an async copy from pageable
        memory has read its source when the call returns."""
        a = np.ascontiguousarray(a)
        self._staged.append(a)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, kind, self.stream))

    def download(self, a: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(a.ctypes.data, ptr, a.nbytes, kind, self.stream))

    def download_columns(self, a: np.ndarray, ptr: int, c: Columns) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check("cudaMemcpy2DAsync", self.rt.cudaMemcpy2DAsync(
            a.ctypes.data, c.width, ptr + c.offset, c.pitch, c.width, c.rows, kind, self.stream))

    def sync(self) -> None:
        cuda_check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(self.stream))
        self._staged.clear()


@dataclass(frozen=True)
class _Tensor:
    """An engine output (or a kept device copy) after a run: where it is and its shape."""

    ptr: int
    shape: Shape
    dtype: np.dtype[Any]


class _Engine:
    """One engine: an execution context per profile, device buffers per (profile, tensor), reused."""

    def __init__(self, trt: Any, runtime: Any, path: Path, cuda: _Cuda):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise SaisaError(f"{path}: TensorRT cannot load this engine; rebuild it with `saisa-edge build`")
        self.cuda = cuda
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: host_dtype(path, n, self.engine.get_tensor_dtype(n).name) for n in names}
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            try:  # the binding raises on failure (it never answers False)
                ctx.set_optimization_profile_async(p, int(cuda.stream))
            except RuntimeError as e:
                raise SaisaError(f"{path.name}: set_optimization_profile_async({p}) failed ({e}); "
                                 "rebuild the engines with `saisa-edge build`") from None
            self.contexts.append(ctx)
        self._max = [self._max_shapes(p) for p in range(len(self.contexts))]  # before any run sets real shapes
        self._buffers: dict[tuple[int, str, int], int] = {}

    def _max_shapes(self, profile: int) -> dict[str, Shape]:
        """Every tensor's largest shape under `profile` (outputs inferred from the largest inputs).
        It sets input shapes on the profile's context, so it runs once, when the engine opens."""
        ctx = self.contexts[profile]
        shapes = {n: tuple(self.engine.get_tensor_profile_shape(n, profile)[2]) for n in self.inputs}
        for n, s in shapes.items():
            trt_check(f"set_input_shape({n}, {s})", ctx.set_input_shape(n, s))
        shapes.update({n: tuple(ctx.get_tensor_shape(n)) for n in self.outputs})
        return shapes

    def buffer(self, profile: int, name: str, slot: int = 0) -> int:
        """The device buffer of `name` under `profile` (slot: which of alternating copies), sized once."""
        key = (profile, name, slot)
        if key not in self._buffers:
            self._buffers[key] = self.cuda.malloc(nbytes(self._max[profile][name], self.dtypes[name]))
        return self._buffers[key]

    def run(self, host: dict[str, np.ndarray], device: dict[str, _Tensor], profile: int = 0,
            slot: int = 0) -> dict[str, _Tensor]:
        """Inputs from host arrays (copied up) or device tensors (read in place); outputs stay
        on the device, in slot `slot` of this profile's buffers. Not synchronized."""
        ctx = self.contexts[profile]
        for name in self.inputs:
            if name in device:
                ptr, shape = device[name].ptr, device[name].shape
            else:
                a = np.ascontiguousarray(host[name], dtype=self.dtypes[name])
                ptr, shape = self.buffer(profile, name), a.shape
                if a.size:
                    self.cuda.upload(ptr, a)
            trt_check(f"set_input_shape({name}, {shape})", ctx.set_input_shape(name, shape))
            trt_check(f"set_tensor_address({name})", ctx.set_tensor_address(name, ptr))
        out = {}
        for name in self.outputs:
            out[name] = _Tensor(self.buffer(profile, name, slot), tuple(ctx.get_tensor_shape(name)), self.dtypes[name])
            trt_check(f"set_tensor_address({name})", ctx.set_tensor_address(name, out[name].ptr))
        trt_check("execute_async_v3", ctx.execute_async_v3(int(self.cuda.stream)))
        return out

    def fetch(self, t: _Tensor) -> np.ndarray:
        a = np.empty(t.shape, dtype=t.dtype)
        if a.size:
            self.cuda.download(a, t.ptr)
        return a

    def close(self) -> None:
        for ptr in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engines: Engines):
        trt = import_tensorrt("--backend tensorrt")
        self.cuda = _Cuda()
        engines.check_runtime(trt.__version__, self.cuda.capability())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: _Engine(trt, runtime, engines.engine(name), self.cuda) for name in GRAPHS}
        self.config = engines.config
        self.dtype = engines.dtype
        self.max_context = engines.max_context
        self.identity = f"tensorrt:{engines.image_path_digest}"
        self._layers = self.config.text.num_hidden_layers
        self._lock = threading.Lock()  # execution contexts and buffers are shared: one call at a time
        self._visual: tuple[VisualKV | None, dict[str, _Tensor]] = (None, {})
        self._cache: tuple[TextCache | None, dict[str, _Tensor]] = (None, {})
        self._slot = 0

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            engine = self.engines["vision"]
            out = engine.run({io.PIXEL_VALUES: pixels}, {})
            features = engine.fetch(out[io.FEATURES])
            self.cuda.sync()
            return features

    def visual_kv(self, features: np.ndarray, start: int) -> VisualKV:
        starts = np.full(features.shape[0], start, dtype=np.int64)
        with self._lock:
            engine = self.engines["visual_kv"]
            out = engine.run({io.FEATURES: features, io.VISUAL_START: starts}, {})
            keys = tuple(engine.fetch(out[io.visual("key", i)]) for i in range(self._layers))
            values = tuple(engine.fetch(out[io.visual("value", i)]) for i in range(self._layers))
            self.cuda.sync()
        return VisualKV(keys, values, starts)

    def _visual_on_device(self, engine: _Engine, visual: VisualKV | None) -> dict[str, _Tensor]:
        """The visual segment's inputs: uploaded once per VisualKV object, then read in place."""
        last, uploaded = self._visual
        if last is visual and visual is not None:
            return dict(uploaded)
        t = self.config.text
        empty = np.zeros((1, t.num_key_value_heads, 0, t.head_dim), dtype=NUMPY_DTYPES[self.dtype])
        arrays = {io.VISUAL_END: visual.ends if visual is not None else np.zeros(1, dtype=np.int64)}
        for i in range(self._layers):
            arrays[io.visual("key", i)] = visual.keys[i] if visual is not None else empty
            arrays[io.visual("value", i)] = visual.values[i] if visual is not None else empty
        kept: dict[str, _Tensor] = {}
        for name, a in arrays.items():  # its own buffers (profile 0's sizes, the larger), never outputs
            a = np.ascontiguousarray(a, dtype=engine.dtypes[name])
            ptr = engine.buffer(0, name, slot=2)
            if a.size:
                self.cuda.upload(ptr, a)
            kept[name] = _Tensor(ptr, a.shape, a.dtype)
        self._visual = (visual, kept)
        return dict(kept)

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: TextCache,
                visual: VisualKV | None) -> tuple[np.ndarray, TextCache]:
        with self._lock:
            engine = self.engines["decoder"]
            device = self._visual_on_device(engine, visual)
            last, on_device = self._cache
            host: dict[str, np.ndarray] = {io.INPUT_IDS: ids, io.POSITION_IDS: positions}
            if last is cache and on_device:
                device.update(on_device)  # the previous step's outputs, read in place
            else:
                host[io.PAST_POSITIONS] = cache.positions
                for i in range(self._layers):
                    host[io.past("key", i)], host[io.past("value", i)] = cache.keys[i], cache.values[i]
            slot = self._slot ^ 1  # not the one the cache read in place lives in; taken once the step succeeded
            out = engine.run(host, device, decode_profile(ids.shape[1]), slot)
            logits = engine.fetch(out[io.LOGITS])
            grown_positions = engine.fetch(out[io.PRESENT_POSITIONS])
            p, t = cache.length, ids.shape[1]
            new = {}
            for kind in ("key", "value"):
                for i in range(self._layers):
                    tensor = out[io.present(kind, i)]
                    b, h, _, d = tensor.shape
                    a = np.empty((b, h, t, d), dtype=tensor.dtype)
                    self.cuda.download_columns(a, tensor.ptr, columns(tensor.shape, p, t, tensor.dtype.itemsize))
                    new[(kind, i)] = a
            self.cuda.sync()
            self._slot = slot
            grown = TextCache(
                tuple(np.concatenate((cache.keys[i], new[("key", i)]), axis=2) for i in range(self._layers)),
                tuple(np.concatenate((cache.values[i], new[("value", i)]), axis=2) for i in range(self._layers)),
                grown_positions,
            )
            on_device = {io.past(kind, i): out[io.present(kind, i)] for kind in ("key", "value")
                         for i in range(self._layers)}
            on_device[io.PAST_POSITIONS] = out[io.PRESENT_POSITIONS]
            self._cache = (grown, on_device)
            return logits.astype(np.float32, copy=False), grown
