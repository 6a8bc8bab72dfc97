"""Masked multi-head attention with grouped K/V heads: the one softmax both formulations use."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, KV, S, d], mask [B, T, S] (True = visible) -> [B, T, H*d].

    Every query row must see at least one key; GQA repeats each K/V head H/KV times.
    """
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return out.transpose(1, 2).reshape(b, t, h * d)
