"""How the visual K/V cache stores an image: as computed, or quantized to 8 bits.

SAISA's cache is large (Vicuna-7B: 32 layers x 576 tokens x 4096 x 2 in fp16, 288 MiB
an image); int8 or fp8 storage halves that against fp16 (a quarter against fp32).
Keys get a scale per head and channel (RoPE'd keys carry outlier channels), values a
scale per head and token, as KIVI does. Entries are dequantized when used, so a
backend always sees its own dtype and the first request equals every later one.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from saisa_edge.runtime.kv import NUMPY_DTYPES, VisualKV

STORAGES = ("native", "int8", "fp8")
_QUANT = {"int8": (np.dtype(np.int8), 127.0), "fp8": (np.dtype(ml_dtypes.float8_e4m3fn), 448.0)}


@dataclass(frozen=True)
class PackedKV:
    storage: str
    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    key_scales: tuple[np.ndarray, ...]  # [B, KV, 1, D] fp16 per layer; empty when native
    value_scales: tuple[np.ndarray, ...]  # [B, KV, N, 1] fp16
    starts: np.ndarray
    native: VisualKV | None = None  # the entry itself when stored as computed: hits share it

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for group in (self.keys, self.values, self.key_scales, self.value_scales)
                   for t in group)

    def arrays(self) -> dict[str, np.ndarray]:
        """Named arrays, for a file."""
        named = {}
        for kind, group in (("key", self.keys), ("value", self.values), ("key_scale", self.key_scales),
                            ("value_scale", self.value_scales)):
            named.update({f"{kind}.{i}": np.ascontiguousarray(t) for i, t in enumerate(group)})
        return named

    @classmethod
    def from_arrays(cls, storage: str, named: dict[str, np.ndarray], layers: int, start: int) -> "PackedKV":
        def group(kind: str, n: int) -> tuple[np.ndarray, ...]:
            return tuple(named[f"{kind}.{i}"] for i in range(n))

        scaled = 0 if storage == "native" else layers
        return cls(storage, group("key", layers), group("value", layers), group("key_scale", scaled),
                   group("value_scale", scaled), np.array([start], dtype=np.int64))


def _quantize(x: np.ndarray, axis: int, storage: str) -> tuple[np.ndarray, np.ndarray]:
    dtype, top = _QUANT[storage]
    x32 = x.astype(np.float32)
    scale = np.maximum(np.abs(x32).max(axis=axis, keepdims=True) / np.float32(top), np.float32(1e-8))
    q = np.clip(x32 / scale, -top, top)
    return (np.rint(q) if storage == "int8" else q).astype(dtype), scale.astype(np.float16)


def pack(kv: VisualKV, storage: str) -> PackedKV:
    if storage == "native":
        return PackedKV(storage, kv.keys, kv.values, (), (), kv.starts, kv)
    keys = [_quantize(k, 2, storage) for k in kv.keys]  # amax over tokens: per head and channel
    values = [_quantize(v, 3, storage) for v in kv.values]  # amax over channels: per head and token
    return PackedKV(storage, tuple(q for q, _ in keys), tuple(q for q, _ in values),
                    tuple(s for _, s in keys), tuple(s for _, s in values), kv.starts)


def unpack(p: PackedKV, dtype: str) -> VisualKV:
    if p.storage == "native":
        return p.native or VisualKV(p.keys, p.values, p.starts)
    to = NUMPY_DTYPES[dtype]
    keys = tuple((q.astype(np.float32) * s.astype(np.float32)).astype(to) for q, s in zip(p.keys, p.key_scales))
    values = tuple((q.astype(np.float32) * s.astype(np.float32)).astype(to)
                   for q, s in zip(p.values, p.value_scales))
    return VisualKV(keys, values, p.starts)
