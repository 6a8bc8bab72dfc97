"""The PyTorch reference as a backend (runs checkpoints)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from saisa_edge.checkpoint.loader import Checkpoint
from saisa_edge.model import split
from saisa_edge.model.split import TextCache, VisualKV


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config = ckpt.config
        self.dtype = ckpt.dtype
        self.max_context = ckpt.config.text.max_position_embeddings
        self.identity = f"torch:{_fingerprint(ckpt.path, ckpt.vision_tower_path)}"

    @torch.no_grad()
    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ckpt.vision(pixels.to(self.dtype))

    def visual_kv(self, features: torch.Tensor, start: int) -> VisualKV:
        return split.visual_kv(self.ckpt.lm, features, start)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: TextCache,
                visual: VisualKV | None) -> tuple[torch.Tensor, TextCache]:
        return split.forward_text(self.ckpt.lm, ids, positions, cache, visual)


def _fingerprint(*folders: Path) -> str:
    """Names, sizes and modification times of the config and weight files: cheap, and it
    changes when the weights do."""
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"):
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
