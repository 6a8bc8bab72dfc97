"""Rotary position embedding, HF LLaMA convention (rotate-half), computed in fp32."""

from __future__ import annotations

import torch

from saisa_edge.config import TextConfig
from saisa_edge.runtime.rope import inverse_frequencies as frequencies


def inverse_frequencies(cfg: TextConfig) -> torch.Tensor:
    """Per-pair rotation frequencies (fp32), with `linear` or `llama3` scaling applied: the
    runtime's definition, so the reference and the runtime rotate by the same angles."""
    return torch.from_numpy(frequencies(cfg))


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape positions.shape + (head_dim,), cast to `dtype`."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, heads, T, d] by cos/sin [B, T, d]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
