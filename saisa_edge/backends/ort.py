"""ONNX Runtime as a backend (runs artifact folders): CPU by default, CUDA when onnxruntime-gpu is installed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from saisa_edge.artifacts import Artifact
from saisa_edge.artifacts import names as io
from saisa_edge.config import DTYPES
from saisa_edge.errors import SaisaError
from saisa_edge.model.split import TextCache, VisualKV


Observer = Callable[[str, dict[str, np.ndarray]], None]


def providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, graphs: dict[str, Path] | None = None, observe: Observer | None = None):
        """`graphs` replaces some of the artifact's graph files (calibration's tapped copies);
        `observe(graph, outputs)` sees every run's outputs by name."""
        self.config = artifact.config
        self.dtype = DTYPES[artifact.dtype]
        self.max_context = artifact.max_context
        self.identity = f"onnxruntime:{artifact.image_path_digest}"
        chosen = providers()
        if self.dtype == torch.bfloat16 and chosen == ["CPUExecutionProvider"]:
            raise SaisaError(f"{artifact.path}: a bf16 artifact cannot run on ONNX Runtime's CPU provider (no bf16 "
                             "kernels); export with --dtype fp32 or fp16, or build a TensorRT engine")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()
        if artifact.precision == "fp8":
            options.add_session_config_entry("session.disable_quant_qdq", "1")  # CPU kernels lack fused FP8 Q/DQ
        paths = {name: (graphs or {}).get(name, artifact.graph(name)) for name in io.GRAPHS}
        try:
            self.sessions = {
                name: ort.InferenceSession(str(path), options, providers=chosen) for name, path in paths.items()
            }
        except Exception as e:  # ORT reports a bad graph as a generic failure
            raise SaisaError(f"{artifact.path}: ONNX Runtime cannot load the graphs ({e})") from None
        self._layers = self.config.text.num_hidden_layers
        self._np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._visual_feeds: tuple[VisualKV | None, dict[str, np.ndarray]] = (None, {})
        self._observe = observe

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        outputs = self.sessions[graph].run(None, feeds)
        if self._observe is not None:
            self._observe(graph, dict(zip(self._outputs[graph], outputs)))
        return {name: torch.from_numpy(v) for name, v in zip(self._outputs[graph], outputs)}

    def _array(self, t: torch.Tensor) -> np.ndarray:
        if t.dtype == self.dtype and t.is_contiguous():
            return t.numpy()  # no copy: ORT reads the tensor's memory
        return t.detach().to(self.dtype).contiguous().numpy()

    def _visual(self, visual: VisualKV | None) -> dict[str, np.ndarray]:
        """Feeds for the visual segment, built once per VisualKV (decode steps reuse them)."""
        last, last_feeds = self._visual_feeds  # one read: other threads may replace it
        if last is visual and visual is not None:
            return last_feeds
        t = self.config.text
        empty = np.zeros((1, t.num_key_value_heads, 0, t.head_dim), dtype=self._np_dtype)
        feeds = {io.VISUAL_END: visual.ends.numpy() if visual else np.zeros(1, dtype=np.int64)}
        for i in range(self._layers):
            feeds[io.visual("key", i)] = self._array(visual.keys[i]) if visual else empty
            feeds[io.visual("value", i)] = self._array(visual.values[i]) if visual else empty
        self._visual_feeds = (visual, feeds)
        return feeds

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("vision", {io.PIXEL_VALUES: self._array(pixels)})[io.FEATURES]

    def visual_kv(self, features: torch.Tensor, start: int) -> VisualKV:
        starts = np.full(features.shape[0], start, dtype=np.int64)
        out = self._run("visual_kv", {io.FEATURES: self._array(features), io.VISUAL_START: starts})
        keys = tuple(out[io.visual("key", i)] for i in range(self._layers))
        values = tuple(out[io.visual("value", i)] for i in range(self._layers))
        return VisualKV(keys, values, torch.from_numpy(starts))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: TextCache,
                visual: VisualKV | None) -> tuple[torch.Tensor, TextCache]:
        feeds = {
            io.INPUT_IDS: ids.numpy(), io.POSITION_IDS: positions.numpy(), io.PAST_POSITIONS: cache.positions.numpy(),
            **self._visual(visual),
        }
        for i in range(self._layers):
            feeds[io.past("key", i)] = self._array(cache.keys[i])
            feeds[io.past("value", i)] = self._array(cache.values[i])
        out = self._run("decoder", feeds)
        cache = TextCache(
            tuple(out[io.present("key", i)] for i in range(self._layers)),
            tuple(out[io.present("value", i)] for i in range(self._layers)),
            out[io.PRESENT_POSITIONS],
        )
        return out[io.LOGITS], cache

