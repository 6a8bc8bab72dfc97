"""RoPE frequencies and rotation in numpy: the one definition of the frequencies (with
`linear` and `llama3` scaling), used by the runtime to move cached keys and by the
PyTorch reference (`model.rope`), so both rotate by exactly the same angles."""

from __future__ import annotations

import math

import numpy as np

from saisa_edge.config import RopeScaling, TextConfig


def inverse_frequencies(cfg: TextConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim / 2] in fp32 (computed in fp64, as HF does)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is not None:
        inv = inv / s.factor if s.kind == "linear" else _llama3(inv, s)
    return inv.astype(np.float32)


def _llama3(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    """LLaMA-3.1 scaling: long wavelengths divided by `factor`, short ones kept, smooth between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rotate(x: np.ndarray, cfg: TextConfig, delta: int) -> np.ndarray:
    """Keys x [..., head_dim] rotated by `delta` more positions (rotate-half convention), in
    fp32 and cast back: RoPE_{s+d}(k) = R(d) RoPE_s(k)."""
    angles = np.float32(delta) * inverse_frequencies(cfg)
    emb = np.concatenate((angles, angles))
    cos, sin = np.cos(emb), np.sin(emb)
    x32 = x.astype(np.float32)
    half = x.shape[-1] // 2
    rotated = np.concatenate((-x32[..., half:], x32[..., :half]), axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
