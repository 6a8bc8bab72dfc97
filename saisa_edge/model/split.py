"""SAISA split for deployment: visual K/V once per image, then text-only prefill and decode.

For layer l the visual keys and values are a function of the image and of the
position of its first token only, so they are computed once and then read as a
fixed, all-visible segment by every text token after the image. Text tokens keep
an ordinary causal K/V cache. Which text token may see the visual segment follows
from positions alone: exactly those at or after the image's end. Padding, too, is a
position: PAD_POSITION, after every real token, so no real query ever sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.config import TextConfig
from saisa_edge.model import rope
from saisa_edge.model.attention import attend
from saisa_edge.model.llama import SaisaLM

PAD_POSITION = 2**30
"""Position of padding tokens (and the end of a missing image): after every real position."""


@dataclass(frozen=True)
class VisualKV:
    """Read-only per-image keys/values, one [images, kv_heads, N_v, head_dim] per layer,
    and each image's first position [images] (1 image: shared by a whole batch)."""

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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def moved_to(self, cfg: TextConfig, start: int) -> "VisualKV":
        """The same image placed at `start`: RoPE_{s+d}(k) = R(d) RoPE_s(k), values unchanged."""
        delta = start - int(self.starts[0])
        if len(self.starts) != 1:
            raise ValueError("only a single image's K/V can be moved")
        if delta == 0:
            return self
        cos, sin = rope.cos_sin(rope.inverse_frequencies(cfg), torch.tensor([[delta]]), torch.float32)
        keys = tuple(rope.apply(k.float(), cos, sin).to(k.dtype) for k in self.keys)
        return VisualKV(keys, self.values, torch.tensor([start]))

    @staticmethod
    def batch(rows: "list[VisualKV | None]") -> "VisualKV":
        """One image per batch row (zeros and PAD_POSITION where a row has none)."""
        some = next(r for r in rows if r is not None)
        blank = [torch.zeros_like(k) for k in some.keys]
        keys = tuple(torch.cat([r.keys[i] if r else blank[i] for r in rows]) for i in range(len(blank)))
        values = tuple(torch.cat([r.values[i] if r else blank[i] for r in rows]) for i in range(len(blank)))
        starts = torch.cat([r.starts if r else torch.tensor([PAD_POSITION - some.length]) for r in rows])
        return VisualKV(keys, values, starts)


@dataclass(frozen=True)
class TextCache:
    """Causal text K/V, one [batch, kv_heads, T, head_dim] per layer, and each entry's position [batch, T]."""

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

    def truncated(self, n: int) -> "TextCache":
        """The first `n` entries (views, no copies)."""
        return TextCache(tuple(k[:, :, :n] for k in self.keys), tuple(v[:, :, :n] for v in self.values),
                         self.positions[:, :n])


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


def text_layout(ids: list[int], n_visual: int) -> tuple[list[int], list[int], int]:
    """Prompt ids with at most one image marker -> (text ids, their positions, image start).

    Text before the image sits at 0..s-1, the image at s..s+N_v-1, text after it from
    s+N_v on. Without a marker the image start is the prompt length (nothing follows it).
    """
    start = ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in ids else len(ids)
    text = [i for i in ids if i != IMAGE_TOKEN_INDEX]
    positions = list(range(start)) + list(range(start + n_visual, start + n_visual + len(text) - start))
    return text, positions, start
