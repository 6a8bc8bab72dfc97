"""Rotary position embedding, HF LLaMA convention (rotate-half), computed in fp32."""

from __future__ import annotations

import math

import torch

from saisa_edge.config import RopeScaling, TextConfig


def inverse_frequencies(cfg: TextConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with `linear` or `llama3` scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv.float()
    if s.kind == "linear":
        return (inv / s.factor).float()
    return _llama3(inv, s).float()


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """LLaMA-3.1 scaling: long wavelengths divided by `factor`, short ones kept, smooth between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


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
