"""ONNX Runtime as a backend (runs artifact folders): CPU by default, CUDA when onnxruntime-gpu is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from saisa_edge.backends import Observer
from saisa_edge.backends.ort_slots import SlotDecoder
from saisa_edge.artifacts import Artifact
from saisa_edge.artifacts import names as io
from saisa_edge.errors import SaisaError
from saisa_edge.runtime.kv import NUMPY_DTYPES, TextCache, VisualKV
from saisa_edge.runtime.visual_cache import pixel_digest


MAX_BATCH = 8  # rows of the contrib decoder's K/V buffer (memory is taken only by the slots written)


def providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, graphs: dict[str, Path] | None = None, observe: Observer | None = None,
                 features: dict[str, np.ndarray] | None = None, max_batch: int = MAX_BATCH):
        """`graphs` replaces some of the artifact's graph files (calibration's tapped copies);
        `observe(graph, outputs)` sees every run's outputs by name; `features`, when given, keeps
        each image's vision features by pixel digest and reuses them (calibration's passes run
        every image more than once); `max_batch` sizes the K/V buffer of a contrib decoder."""
        self.config = artifact.config
        self.dtype = artifact.dtype
        self.max_context = artifact.max_context
        self.identity = f"onnxruntime:{artifact.image_path_digest}"
        chosen = providers()
        if self.dtype == "bf16" and chosen == ["CPUExecutionProvider"]:
            raise SaisaError(f"{artifact.path}: a bf16 artifact cannot run on ONNX Runtime's CPU provider (no bf16 "
                             "kernels); export with --dtype fp32 or fp16, or build a TensorRT engine")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if artifact.precision == "fp8":
            options.add_session_config_entry("session.disable_quant_qdq", "1")  # CPU kernels lack fused FP8 Q/DQ
        if (artifact.details.get("quantization") or {}).get("recipe", {}).get("form") == "dq":
            # ORT fuses a blocked DequantizeLinear + MatMul into MatMulNBits at accuracy level 4 (int8
            # activations) by default; a TensorRT-form artifact keeps float activations, as TensorRT computes
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        paths = {name: (graphs or {}).get(name, artifact.graph(name)) for name in io.GRAPHS}
        try:
            self.sessions = {
                name: ort.InferenceSession(str(path), options, providers=chosen) for name, path in paths.items()
            }
        except Exception as e:  # ORT reports a bad graph as a generic failure
            raise SaisaError(f"{artifact.path}: ONNX Runtime cannot load the graphs ({e})") from None
        self._layers = self.config.text.num_hidden_layers
        self._np_dtype = NUMPY_DTYPES[self.dtype]
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._visual_feeds: tuple[VisualKV | None, dict[str, np.ndarray]] = (None, {})
        self._observe = observe
        self._features = features
        self._slots = SlotDecoder(self.sessions["decoder"], self.config.text, self.max_context, self._np_dtype,
                                  max_batch, observe) if artifact.decoder_form == "contrib" else None

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = dict(zip(self._outputs[graph], self.sessions[graph].run(None, feeds)))
        if self._observe is not None:
            self._observe(graph, outputs)
        return outputs

    def _array(self, a: np.ndarray) -> np.ndarray:
        """In the graphs' dtype, contiguous: no copy when it already is (ORT reads its memory)."""
        return np.ascontiguousarray(a, dtype=self._np_dtype)

    def _visual(self, visual: VisualKV | None) -> dict[str, np.ndarray]:
        """Feeds for the visual segment, built once per VisualKV (decode steps reuse them)."""
        last, last_feeds = self._visual_feeds  # one read: other threads may replace it
        if last is visual and visual is not None:
            return last_feeds
        t = self.config.text
        empty = np.zeros((1, t.num_key_value_heads, 0, t.head_dim), dtype=self._np_dtype)
        feeds = {io.VISUAL_END: visual.ends if visual else np.zeros(1, dtype=np.int64)}
        for i in range(self._layers):
            feeds[io.visual("key", i)] = self._array(visual.keys[i]) if visual else empty
            feeds[io.visual("value", i)] = self._array(visual.values[i]) if visual else empty
        self._visual_feeds = (visual, feeds)
        return feeds

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        if self._features is None:
            return self._run("vision", {io.PIXEL_VALUES: self._array(pixels)})[io.FEATURES]
        key = pixel_digest(pixels)
        if key not in self._features:
            self._features[key] = self._run("vision", {io.PIXEL_VALUES: self._array(pixels)})[io.FEATURES]
        return self._features[key]

    def visual_kv(self, features: np.ndarray, start: int) -> VisualKV:
        starts = np.full(features.shape[0], start, dtype=np.int64)
        out = self._run("visual_kv", {io.FEATURES: self._array(features), io.VISUAL_START: starts})
        keys = tuple(out[io.visual("key", i)] for i in range(self._layers))
        values = tuple(out[io.visual("value", i)] for i in range(self._layers))
        return VisualKV(keys, values, starts)

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: TextCache,
                visual: VisualKV | None) -> tuple[np.ndarray, TextCache]:
        if self._slots is not None:
            return self._slots.forward(ids, positions, cache, visual)
        feeds = {
            io.INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64),
            io.POSITION_IDS: np.ascontiguousarray(positions, dtype=np.int64),
            io.PAST_POSITIONS: np.ascontiguousarray(cache.positions, dtype=np.int64),
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

