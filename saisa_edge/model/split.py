"""SAISA split for deployment: visual K/V once per image, then text-only prefill and decode.

For layer l the visual keys and values are a function of the image and of the
position of its first token only, so they are computed once and then read as a
fixed, all-visible segment by every text token after the image. Text tokens keep
an ordinary causal K/V cache. Which text token may see the visual segment follows
from positions alone: exactly those at or after the image's end. Padding, too, is a
position: PAD_POSITION, after every real token, so no real query ever sees it. The
positions and the padding convention are the runtime's (`runtime.kv`), which the
reference shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saisa_edge.config import TextConfig
from saisa_edge.model.attention import attend
from saisa_edge.model.llama import SaisaLM
from saisa_edge.runtime.kv import PAD_POSITION, text_layout

__all__ = ["PAD_POSITION", "TextCache", "VisualKV", "forward_text", "text_layout", "visual_kv"]


@dataclass(frozen=True)
class VisualKV:
    """The reference's per-image keys/values as torch tensors, one [images, kv_heads, N_v,
    head_dim] per layer, and each image's first position [images] (the runtime's numpy
    twin, with caching and batching, is `runtime.kv.VisualKV`)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    starts: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def ends(self) -> torch.Tensor:
        """Position of the first text token after each image."""
        return self.starts + self.length


@dataclass(frozen=True)
class TextCache:
    """The reference's causal text K/V, one [batch, kv_heads, T, head_dim] per layer, and
    each entry's position [batch, T] (the runtime's twin: `runtime.kv.TextCache`)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    positions: torch.Tensor

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, dtype: torch.dtype) -> "TextCache":
        kv = torch.zeros(batch, cfg.num_key_value_heads, 0, cfg.head_dim, dtype=dtype)
        layers = (kv,) * cfg.num_hidden_layers
        return cls(layers, layers, torch.zeros(batch, 0, dtype=torch.long))

    @property
    def length(self) -> int:
        return self.positions.shape[1]


@torch.no_grad()
def visual_kv(lm: SaisaLM, features: torch.Tensor, start: int) -> VisualKV:
    """features [images, N_v, mm_hidden] -> every layer's visual K/V, RoPE from position `start`."""
    dtype = lm.lm_head.weight.dtype
    features = features.to(dtype)
    n = features.shape[1]
    positions = torch.arange(start, start + n).expand(features.shape[0], n)
    cos, sin = lm.rope(positions, dtype)
    keys, values = [], []
    for layer in lm.layers:
        h = layer.input_layernorm(layer.mm_projector(features))
        k, v = layer.self_attn.key_value(h, cos, sin)
        keys.append(k)
        values.append(v)
    return VisualKV(tuple(keys), tuple(values), torch.full((features.shape[0],), start))


@torch.no_grad()
def forward_text(
    lm: SaisaLM,
    ids: torch.Tensor,
    positions: torch.Tensor,
    cache: TextCache,
    visual: VisualKV | None = None,
) -> tuple[torch.Tensor, TextCache]:
    """Text tokens ids [B, T] at positions [B, T] -> logits [B, T, vocab] and the grown cache.

    The two key segments: `visual` (shared by the batch when it holds one image,
    visible to queries at or after the image's end) and the text cache plus the new
    tokens (visible where the key's position is not after the query's).
    """
    dtype = lm.lm_head.weight.dtype
    b, t = ids.shape
    x = lm.model.embed_tokens(ids)
    cos, sin = lm.rope(positions, dtype)
    key_pos = torch.cat((cache.positions, positions), dim=1)
    mask = key_pos[:, None, :] <= positions[:, :, None]
    if visual is not None:
        sees_image = (positions >= visual.ends[:, None])[:, :, None].expand(b, t, visual.length)
        mask = torch.cat((sees_image, mask), dim=2)
    keys, values = [], []
    for i, layer in enumerate(lm.layers):
        h = layer.input_layernorm(x)
        q = layer.self_attn.query(h, cos, sin)
        k_new, v_new = layer.self_attn.key_value(h, cos, sin)
        k = torch.cat((cache.keys[i], k_new), dim=2)
        v = torch.cat((cache.values[i], v_new), dim=2)
        keys.append(k)
        values.append(v)
        if visual is not None:
            k = torch.cat((visual.keys[i].expand(b, -1, -1, -1), k), dim=2)
            v = torch.cat((visual.values[i].expand(b, -1, -1, -1), v), dim=2)
        x = layer.residual(x, attend(q, k, v, mask))
    return lm.logits(x), TextCache(tuple(keys), tuple(values), key_pos)
