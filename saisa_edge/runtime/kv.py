"""The K/V a runtime holds, as numpy arrays: a per-image visual segment and a causal text
cache, and where prompt tokens sit (positions) around the image.

For layer l the visual keys and values are a function of the image and of the
position of its first token only, so they are computed once and then read as a
fixed, all-visible segment by every text token after the image. Which text token may
see it follows from positions alone: exactly those at or after the image's end.
Padding, too, is a position: PAD_POSITION, after every real token, so no real query
ever sees it. Nothing here imports torch: this is what a device runtime carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.config import TextConfig
from saisa_edge.runtime import rope

PAD_POSITION = 2**30
"""Position of padding tokens (and the end of a missing image): after every real position."""

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16),
}
"""A compute dtype name (config.DTYPE_NAMES) -> the numpy dtype of arrays in it."""


@dataclass(frozen=True)
class VisualKV:
    """Read-only per-image keys/values, one [images, kv_heads, N_v, head_dim] per layer,
    and each image's first position [images] int64 (1 image: shared by a whole batch)."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    starts: np.ndarray

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def ends(self) -> np.ndarray:
        """Position of the first text token after each image."""
        return self.starts + self.length

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def moved_to(self, cfg: TextConfig, start: int) -> "VisualKV":
        """The same image placed at `start`: keys rotated by the difference, values unchanged."""
        if len(self.starts) != 1:
            raise ValueError("only a single image's K/V can be moved")
        delta = start - int(self.starts[0])
        if delta == 0:
            return self
        keys = tuple(rope.rotate(k, cfg, delta) for k in self.keys)
        return VisualKV(keys, self.values, np.array([start], dtype=np.int64))

    @staticmethod
    def batch(rows: "list[VisualKV | None]") -> "VisualKV":
        """One image per batch row (zeros and PAD_POSITION where a row has none)."""
        some = next(r for r in rows if r is not None)
        blank = [np.zeros_like(k) for k in some.keys]
        keys = tuple(np.concatenate([r.keys[i] if r else blank[i] for r in rows]) for i in range(len(blank)))
        values = tuple(np.concatenate([r.values[i] if r else blank[i] for r in rows]) for i in range(len(blank)))
        none = np.array([PAD_POSITION - some.length], dtype=np.int64)
        starts = np.concatenate([r.starts if r else none for r in rows])
        return VisualKV(keys, values, starts)


@dataclass(frozen=True)
class TextCache:
    """Causal text K/V, one [batch, kv_heads, T, head_dim] per layer, and each entry's position [batch, T] int64."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    positions: np.ndarray

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, dtype: str) -> "TextCache":
        kv = np.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), dtype=NUMPY_DTYPES[dtype])
        layers = (kv,) * cfg.num_hidden_layers
        return cls(layers, layers, np.zeros((batch, 0), dtype=np.int64))

    @property
    def length(self) -> int:
        return int(self.positions.shape[1])

    def truncated(self, n: int) -> "TextCache":
        """The first `n` entries (views, no copies)."""
        return TextCache(tuple(k[:, :, :n] for k in self.keys), tuple(v[:, :, :n] for v in self.values),
                         self.positions[:, :n])

    def copy(self) -> "TextCache":
        """A cache that owns its memory (a view would keep a longer cache alive)."""
        return TextCache(tuple(k.copy() for k in self.keys), tuple(v.copy() for v in self.values),
                         self.positions.copy())


def text_layout(ids: list[int], n_visual: int) -> tuple[list[int], list[int], int]:
    """Prompt ids with at most one image marker -> (text ids, their positions, image start).

    Text before the image sits at 0..s-1, the image at s..s+N_v-1, text after it from
    s+N_v on. Without a marker the image start is the prompt length (nothing follows it).
    """
    start = ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in ids else len(ids)
    text = [i for i in ids if i != IMAGE_TOKEN_INDEX]
    positions = list(range(start)) + list(range(start + n_visual, start + n_visual + len(text) - start))
    return text, positions, start
