"""TensorRT engines as a backend (runs engine folders from `saisa-edge build`).

Device memory is torch's CUDA allocator: engine outputs land in buffers allocated once
per (engine, profile) at the profile's largest shapes and reused; visual K/V stay on
the device (the visual cache holds device tensors). cuda-python provides the stream.
pycuda is not used: it does not build without a CUDA driver and NVIDIA does not
maintain it. Nothing here runs without TensorRT and a GPU; the checks it relies on
(`plugins.build`) are tested without them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saisa_edge.artifacts import Engines
from saisa_edge.artifacts import names as io
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.config import DTYPES
from saisa_edge.errors import SaisaError
from saisa_edge.model.split import TextCache, VisualKV

INSTALL_HINT = ("install TensorRT 10.9+ (x86-64: `pip install tensorrt`; Jetson: JetPack's python3-libnvinfer) "
                "and run on a machine with an NVIDIA GPU")


def import_tensorrt(what: str) -> Any:
    """TensorRT's module, or a one-line error (type stubs alone install an empty `tensorrt`)."""
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is None or not hasattr(trt, "Builder"):
        raise SaisaError(f"{what}: TensorRT is not installed; {INSTALL_HINT}")
    return trt


def _tensorrt() -> Any:
    trt = import_tensorrt("--backend tensorrt")
    if not torch.cuda.is_available():
        raise SaisaError(f"--backend tensorrt: no CUDA GPU is visible; {INSTALL_HINT}")
    return trt


class _Engine:
    """One engine: an execution context per profile, output buffers per profile, reused."""

    def __init__(self, trt: Any, runtime: Any, path: Path, stream: int):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise SaisaError(f"{path}: TensorRT cannot load this engine; rebuild it with `saisa-edge build`")
        self.trt, self.stream = trt, stream
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, stream)
            self.contexts.append(ctx)
        self.buffers: dict[tuple[int, str], torch.Tensor] = {}

    def _dtype(self, name: str) -> torch.dtype:
        t = self.trt.DataType
        return {t.FLOAT: torch.float32, t.HALF: torch.float16, t.BF16: torch.bfloat16, t.INT64: torch.int64,
                t.INT32: torch.int32}[self.engine.get_tensor_dtype(name)]

    def _buffer(self, profile: int, name: str) -> torch.Tensor:
        """The output's buffer for this profile: sized once, from the profile's largest inputs."""
        key = (profile, name)
        if key not in self.buffers:
            ctx = self.contexts[profile]
            for i in self.inputs:
                ctx.set_input_shape(i, tuple(self.engine.get_tensor_profile_shape(i, profile)[2]))
            numel = math.prod(ctx.get_tensor_shape(name))
            self.buffers[key] = torch.empty(numel, dtype=self._dtype(name), device="cuda")
        return self.buffers[key]

    def run(self, feeds: dict[str, torch.Tensor], profile: int = 0) -> dict[str, torch.Tensor]:
        ctx = self.contexts[profile]
        buffers = {name: self._buffer(profile, name) for name in self.outputs}
        inputs = {n: feeds[n].to("cuda", self._dtype(n)).contiguous() for n in self.inputs}
        for name, t in inputs.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else buffers[self.outputs[0]].data_ptr())
        shapes = {name: tuple(ctx.get_tensor_shape(name)) for name in self.outputs}
        for name, buf in buffers.items():
            ctx.set_tensor_address(name, buf.data_ptr())
        torch.cuda.current_stream().synchronize()
        if not ctx.execute_async_v3(self.stream):
            raise SaisaError("TensorRT failed to run the engine (see its log)")
        from cuda.bindings import runtime as cudart

        cudart.cudaStreamSynchronize(self.stream)
        return {name: buffers[name][: math.prod(shapes[name])].view(shapes[name]) for name in self.outputs}


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engines: Engines):
        trt = _tensorrt()
        engines.check_runtime(trt.__version__, torch.cuda.get_device_capability())
        if engines.manifest.attention == "plugin":
            from saisa_edge.plugins import trt_plugin  # noqa: F401  (registers the plugin)
        from cuda.bindings import runtime as cudart

        err, self.stream = cudart.cudaStreamCreate()
        if int(err) != 0:
            raise SaisaError(f"--backend tensorrt: cannot create a CUDA stream ({err})")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: _Engine(trt, runtime, engines.engine(name), int(self.stream)) for name in GRAPHS}
        self.config = engines.config
        self.dtype = DTYPES[engines.dtype]
        self.max_context = engines.max_context
        self.identity = f"tensorrt:{engines.image_path_digest}"
        self._layers = self.config.text.num_hidden_layers

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.engines["vision"].run({io.PIXEL_VALUES: pixels})[io.FEATURES].clone()

    def visual_kv(self, features: torch.Tensor, start: int) -> VisualKV:
        starts = torch.full((features.shape[0],), start, dtype=torch.int64)
        out = self.engines["visual_kv"].run({io.FEATURES: features, io.VISUAL_START: starts})
        keys = tuple(out[io.visual("key", i)].clone() for i in range(self._layers))
        values = tuple(out[io.visual("value", i)].clone() for i in range(self._layers))
        return VisualKV(keys, values, starts)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: TextCache,
                visual: VisualKV | None) -> tuple[torch.Tensor, TextCache]:
        t = self.config.text
        empty = torch.zeros((1, t.num_key_value_heads, 0, t.head_dim), dtype=self.dtype)
        feeds = {io.INPUT_IDS: ids, io.POSITION_IDS: positions, io.PAST_POSITIONS: cache.positions,
                 io.VISUAL_END: visual.ends if visual is not None else torch.zeros(1, dtype=torch.int64)}
        for i in range(self._layers):
            feeds[io.past("key", i)], feeds[io.past("value", i)] = cache.keys[i], cache.values[i]
            feeds[io.visual("key", i)] = visual.keys[i] if visual is not None else empty
            feeds[io.visual("value", i)] = visual.values[i] if visual is not None else empty
        out = self.engines["decoder"].run(feeds, profile=0 if ids.shape[1] > 1 else 1)
        cache = TextCache(tuple(out[io.present("key", i)].clone() for i in range(self._layers)),
                          tuple(out[io.present("value", i)].clone() for i in range(self._layers)),
                          out[io.PRESENT_POSITIONS].cpu())
        return out[io.LOGITS].float().cpu(), cache
