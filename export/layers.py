"""ONNX twins of the reference model's pieces (`saisa_edge.model`), same maths, same names.

Each function takes the graph, its input value names and the weight prefix (the
checkpoint's tensor name), declares the weights it reads and returns output names.
Linear weights are stored transposed ([in, out]) so every projection is one MatMul.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import TensorProto

from saisa_edge.checkpoint.loader import CheckpointSource
from saisa_edge.config import TextConfig
from saisa_edge.export.graph import ELEM_TYPE, Graph
from saisa_edge.model.rope import inverse_frequencies


class Weights:
    """Declares graph weights read from a checkpoint, converted to the export dtype."""

    def __init__(self, g: Graph, source: CheckpointSource, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.g, self.source, self.shapes, self.dtype = g, source, shapes, dtype
        self._declared: set[str] = set()

    def __call__(self, name: str, transpose: bool = False) -> str:
        if name in self._declared:
            return name
        self._declared.add(name)
        shape = self.shapes[name]
        declared = tuple(reversed(shape)) if transpose else shape

        def load() -> torch.Tensor:
            t = self.source.tensor(name, shape)
            return t.T if transpose else t

        return self.g.weight(name, declared, self.dtype, load)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def joined(self, name: str, parts: list[str], transpose: bool) -> str:
        """One initializer `name` holding `parts` side by side (last axis), read part by part."""
        shapes = [tuple(reversed(self.shapes[p])) if transpose else self.shapes[p] for p in parts]

        def load() -> torch.Tensor:
            tensors = [self.source.tensor(p, self.shapes[p]) for p in parts]
            return torch.cat([t.T if transpose else t for t in tensors], dim=-1)

        declared = (*shapes[0][:-1], sum(sh[-1] for sh in shapes))
        return self.g.weight(name, declared, self.dtype, load)


def linear(g: Graph, w: Weights, x: str, prefix: str) -> str:
    y = g.op("MatMul", x, w(f"{prefix}.weight", transpose=True), name=prefix.rsplit(".", 1)[-1])
    return g.op("Add", y, w(f"{prefix}.bias")) if w.has(f"{prefix}.bias") else y


def linears(g: Graph, w: Weights, x: str, prefixes: list[str], name: str) -> tuple[str, ...]:
    """Several projections of the same input as one MatMul (one pass over x, one larger
    weight read: what bandwidth-bound decoding wants), split back into their outputs."""
    y = joined_linear(g, w, x, prefixes, name)
    sizes = [w.shapes[f"{p}.weight"][0] for p in prefixes]
    return tuple(g.op("Split", y, g.const(sizes), axis=-1, outputs=len(sizes)))


def joined_linear(g: Graph, w: Weights, x: str, prefixes: list[str], name: str) -> str:
    """The projections of `linears`, their outputs side by side (packed QKV, as fused attention takes it)."""
    weights = w.joined(f"{name}.weight", [f"{p}.weight" for p in prefixes], transpose=True)
    y = g.op("MatMul", x, weights, name=name.rsplit(".", 1)[-1])
    if w.has(f"{prefixes[0]}.bias"):
        y = g.op("Add", y, w.joined(f"{name}.bias", [f"{p}.bias" for p in prefixes], transpose=False))
    return y


def rms_norm(g: Graph, w: Weights, x: str, prefix: str, eps: float) -> str:
    """As HF LLaMA: normalise in fp32, cast back, then scale; written in the
    Pow/ReduceMean/Add/Sqrt/Div/Mul form that ONNX Runtime and TensorRT fuse into one kernel."""
    cast = w.dtype != torch.float32
    x32 = g.op("Cast", x, to=TensorProto.FLOAT) if cast else x
    var = g.op("ReduceMean", g.op("Pow", x32, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
    normed = g.op("Div", x32, g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32))))
    normed = g.op("Cast", normed, to=ELEM_TYPE[w.dtype]) if cast else normed
    return g.op("Mul", normed, w(f"{prefix}.weight"), name="rms_norm")


def layer_norm(g: Graph, w: Weights, x: str, prefix: str, eps: float) -> str:
    return g.op("LayerNormalization", x, w(f"{prefix}.weight"), w(f"{prefix}.bias"), axis=-1, epsilon=eps)


def gelu(g: Graph, x: str) -> str:
    """Exact (erf) GELU, as nn.GELU()."""
    half = g.op("CastLike", g.const(0.5, np.float32), x)
    one = g.op("CastLike", g.const(1.0, np.float32), x)
    inner = g.op("Erf", g.op("Mul", x, g.op("CastLike", g.const(1 / math.sqrt(2), np.float32), x)))
    return g.op("Mul", g.op("Mul", x, half), g.op("Add", inner, one), name="gelu")


def quick_gelu(g: Graph, x: str) -> str:
    k = g.op("CastLike", g.const(1.702, np.float32), x)
    return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, k)), name="quick_gelu")


def projector(g: Graph, w: Weights, x: str, prefix: str, depth: int) -> str:
    """LLaVA's `linear` (depth 0) or `mlp{depth}x_gelu`, as `model.llama.build_projector`."""
    if depth == 0:
        return linear(g, w, x, prefix)
    x = linear(g, w, x, f"{prefix}.0")
    for i in range(1, depth):
        x = linear(g, w, gelu(g, x), f"{prefix}.{2 * i}")
    return x


def rope_tables(g: Graph, cfg: TextConfig, positions: str, dtype: torch.dtype) -> tuple[str, str]:
    """cos, sin [B, 1, T, D] for positions [B, T], angles in fp32 as the reference."""
    inv = g.const(inverse_frequencies(cfg).numpy(), np.float32)
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT), g.const([-1])), inv)
    emb = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.const([1]))
    return (g.op("Cast", g.op("Cos", emb), to=ELEM_TYPE[dtype]), g.op("Cast", g.op("Sin", emb), to=ELEM_TYPE[dtype]))


def apply_rope(g: Graph, x: str, cos: str, sin: str, rotate: str, out: str | None = None) -> str:
    """x [B, heads, T, D]: x * cos + rotate_half(x) * sin, rotate_half as a MatMul by `rotate`."""
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", g.op("MatMul", x, rotate), sin), name="rope", out=out)


def rotate_half_matrix(g: Graph, head_dim: int, dtype: torch.dtype) -> str:
    """[D, D] with x @ R = concat(-x[D/2:], x[:D/2]): exact in any dtype (entries 0, 1, -1)."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[half:, :half] = -np.eye(half)
    r[:half, half:] = np.eye(half)
    m = g.const(r, np.float32)
    return m if dtype == torch.float32 else g.op("Cast", m, to=ELEM_TYPE[dtype])


def to_heads(g: Graph, x: str, heads: int, head_dim: int, out: str | None = None) -> str:
    """[B, T, heads*D] -> [B, heads, T, D]."""
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, heads, head_dim])), perm=[0, 2, 1, 3], out=out)


def from_heads(g: Graph, x: str) -> str:
    """[B, heads, T, D] -> [B, T, heads*D]."""
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, -1]))
