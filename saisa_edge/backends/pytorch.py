"""The PyTorch reference as a backend (runs checkpoints)."""

from __future__ import annotations

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

    @torch.no_grad()
    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ckpt.vision(pixels.to(self.dtype))

    def visual_kv(self, features: torch.Tensor, start: int) -> VisualKV:
        return split.visual_kv(self.ckpt.lm, features, start)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: TextCache,
                visual: VisualKV | None) -> tuple[torch.Tensor, TextCache]:
        return split.forward_text(self.ckpt.lm, ids, positions, cache, visual)
