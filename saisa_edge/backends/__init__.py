"""Where each backend plugs in: the three stages a runtime needs from a model.

Generation and caching are written once against `Backend`, on numpy arrays; PyTorch
runs a checkpoint, ONNX Runtime an artifact folder, TensorRT an engine folder. Opening
an artifact or engine folder imports neither torch nor the exporter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import numpy as np

from saisa_edge.artifacts import MANIFEST_NAME, Artifact, Engines, open_runnable
from saisa_edge.config import SaisaConfig
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.runtime.kv import TextCache, VisualKV

Observer = Callable[[str, dict[str, np.ndarray]], None]
"""`observe(graph, outputs)`: sees every run's named outputs (calibration's statistics)."""


class Backend(Protocol):
    name: str
    config: SaisaConfig
    dtype: str  # the compute dtype's name (config.DTYPE_NAMES); arrays use runtime.kv.NUMPY_DTYPES[dtype]
    max_context: int
    identity: str  # changes whenever the image path's weights or graphs do (keys the visual cache)

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised pixels [B, 3, S, S] float32 -> selected features [B, N_v, mm_hidden]."""
        ...

    def visual_kv(self, features: np.ndarray, start: int) -> VisualKV:
        """Features [B, N_v, mm_hidden] -> every layer's visual K/V, RoPE from position `start`."""
        ...

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: TextCache,
                visual: VisualKV | None) -> tuple[np.ndarray, TextCache]:
        """Text ids/positions int64 [B, T] -> logits float32 [B, T, vocab] and the grown text cache."""
        ...


BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


def open_model(source: Path | Artifact | Engines, backend: str = "auto", vision_tower: Path | None = None,
               dtype: str | None = None) -> tuple[Backend, PromptTokenizer]:
    """A backend and tokenizer for SOURCE: an artifact folder (ONNX Runtime by default; `torch`
    runs the checkpoint it was exported from), an engine folder (TensorRT) or a checkpoint (PyTorch).
    An already opened folder is used as it is (not read again)."""
    opened = source if isinstance(source, (Artifact, Engines)) else None
    source = opened.path if opened is not None else cast(Path, source)
    if opened is None and (source / MANIFEST_NAME).is_file() and not (source / "config.json").is_file():
        opened = open_runnable(source)
    if isinstance(opened, Engines):
        if backend not in ("auto", "tensorrt"):
            raise SaisaError(f"--backend {backend}: {source} holds TensorRT engines; use --backend tensorrt")
        from saisa_edge.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(opened), PromptTokenizer.load(source)
    if backend == "tensorrt":
        raise SaisaError(f"--backend tensorrt: {source} is not an engine folder; run `saisa-edge build` first")
    if opened is not None:
        artifact = opened
        if backend == "torch":
            checkpoint = Path(artifact.details["source"]["checkpoint"])
            if not (checkpoint / "config.json").is_file():
                raise SaisaError(f"--backend torch: {source} was exported from {checkpoint}, which is gone; "
                                 "pass that checkpoint folder as SOURCE instead")
            tower = Path(artifact.details["source"]["vision_tower"])
            return _torch(checkpoint, vision_tower or tower, dtype or artifact.dtype)
        from saisa_edge.backends.ort import OrtBackend

        if vision_tower is not None:
            raise SaisaError(f"--vision-tower: {source} is an artifact folder; its vision graph is built in")
        if dtype is not None and dtype != artifact.dtype:
            raise SaisaError(f"--dtype {dtype}: {source} was exported in {artifact.dtype}; "
                             "export again to change it")
        return OrtBackend(artifact), PromptTokenizer.load(source)
    if (source / "config.json").is_file():
        if backend == "onnxruntime":
            raise SaisaError(f"--backend onnxruntime: {source} is a checkpoint; run `saisa-edge export` first")
        return _torch(source, vision_tower, dtype or "fp32")
    raise SaisaError(f"SOURCE {source}: neither a SAISA checkpoint (config.json) nor an artifact folder "
                     f"({MANIFEST_NAME})")


def _torch(checkpoint: Path, vision_tower: Path | None, dtype: str) -> tuple[Backend, PromptTokenizer]:
    from saisa_edge.backends.pytorch import TorchBackend
    from saisa_edge.checkpoint.loader import load_checkpoint
    from saisa_edge.model.dtypes import TORCH_DTYPES

    ckpt = load_checkpoint(checkpoint, vision_tower, TORCH_DTYPES[dtype])
    return TorchBackend(ckpt), ckpt.tokenizer
