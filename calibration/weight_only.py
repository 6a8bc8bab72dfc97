"""Weight-only quantization (W4A16, W8A16) and its two graph forms.

One `WeightQuant` per linear layer: integer codes of its [K, N] weight and one scale per
(block of K rows, output column); symmetric (signed codes, zero point 0) or asymmetric
(unsigned codes and an integer zero point per block: AWQ's and MatMulNBits' uint4 with
zeros, which can follow a block whose values are not centred on 0). The same codes,
scales and zero points are written either as

- `dq`: DequantizeLinear on an INT4/INT8 (UINT4 with zero points) initializer feeding the
  MatMul, blocked along K (`block_size`, opset 21) for 4 bits, per output channel (`axis=1`)
  for 8 bits: the pattern TensorRT fuses into its weight-only GEMMs (symmetric only there);
- `nbits`: `com.microsoft` MatMulNBits, ONNX Runtime's weight-only kernel: codes stored
  unsigned (symmetric: with the op's default zero point 2^(bits-1)), packed low bits first
  along K, [N, k_blocks, block_size * bits / 8], scales [N, k_blocks], zero points packed
  the same way along the blocks, [N, ceil(k_blocks * bits / 8)].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from saisa_edge.calibration import qdq
from saisa_edge.calibration.recipe import Recipe, group_size_for

FORMS = ("dq", "nbits")
MS_DOMAIN = "com.microsoft"
BLOCKED_DQ_OPSET = 21  # DequantizeLinear's block_size and INT4 arrived in opset 21
NBITS_BLOCKS = (128, 64, 32, 16)  # MatMulNBits blocks are powers of two >= 16
# int8 with a scale per output channel (--group-size 0) in MatMulNBits: the scale repeated per block
# of 16. Accuracy level 4 quantizes activations to int8 per block of K: small blocks keep smol's outlier
# channels from flattening their neighbours (int8_wo measured top-1 0.934 at 128, 0.955 at 16, float
# compute 0.949), for one fp32 scale per 16 weights (+25% of the int8 bytes)
INT8_NBITS_BLOCK = 16
# Where each form runs; the TensorRT rows come from its documentation (not run here: no GPU)
ACCEPTED_BY = {
    "dq": {"int4": "TensorRT >= 10.0 on sm_80+ (Orin sm_87, A100, L4, H100): INT4 weight-only block quantization, "
                   "symmetric, blocks of 64 or 128; ONNX Runtime >= 1.20 (CPU, dequantizes at load)",
           "uint4": "ONNX Runtime >= 1.20 only (CPU): TensorRT's DequantizeLinear takes no zero point",
           "int8": "TensorRT >= 10.0, sm_75+: INT8 weight-only (per-channel DQ into the GEMM); ONNX Runtime (CPU)"},
    "nbits": {"int4": "ONNX Runtime >= 1.17 CPU (MLAS 4-bit kernels); not TensorRT",
              "uint4": "ONNX Runtime >= 1.17 CPU (MLAS 4-bit kernels, zero points); not TensorRT",
              "int8": "ONNX Runtime >= 1.20 CPU (8-bit MatMulNBits); not TensorRT"},
}


@dataclass(frozen=True)
class WeightQuant:
    """A [K, N] weight as (codes [K, N] - zeros) times scales, zeros and scales [ceil(K / block), N];
    codes are int8 holding signed `bits`-bit values, or uint8 holding unsigned ones when `zeros` is set."""

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    block: int  # rows of K sharing a scale; K itself for per-output-channel
    zeros: np.ndarray | None = None  # asymmetric: the code of 0.0 per block (uint8, 0 .. 2^bits - 1)

    def dequantize(self) -> np.ndarray:
        k = self.codes.shape[0]
        codes = self.codes.astype(np.float32)
        if self.zeros is not None:
            codes -= np.repeat(self.zeros, self.block, axis=0)[:k]
        return codes * np.repeat(self.scales, self.block, axis=0)[:k]


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize(w: np.ndarray, bits: int, block: int, shrink: np.ndarray | None = None,
             asymmetric: bool = False) -> WeightQuant:
    """Round to nearest, a scale per block of `block` rows and column: symmetric over each
    block's max |w|, or asymmetric over its [min, max] (AWQ's zero-point form). `shrink`
    ([blocks, N], in (0, 1]) narrows each block's range (AWQ's clipping search)."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    padded[k:] = w[-1:]  # padding repeats a real row: it moves no block's range
    grouped = padded.reshape(blocks, block, n)
    ratio = 1.0 if shrink is None else shrink
    if not asymmetric:
        scales = (np.clip(np.abs(grouped).max(axis=1) * ratio, 1e-8, None) / qmax(bits)).astype(np.float32)
        codes = np.clip(np.round(grouped / scales[:, None, :]), -qmax(bits) - 1, qmax(bits))
        return WeightQuant(codes.reshape(-1, n)[:k].astype(np.int8), scales, bits, block)
    top = 2 ** bits - 1
    hi, lo = grouped.max(axis=1) * ratio, grouped.min(axis=1) * ratio
    scales = (np.clip(hi - lo, 1e-8, None) / top).astype(np.float32)
    zeros = np.clip(np.round(-lo / scales), 0, top)
    codes = np.clip(np.round(grouped / scales[:, None, :]) + zeros[:, None, :], 0, top)
    return WeightQuant(codes.reshape(-1, n)[:k].astype(np.uint8), scales, bits, block, zeros.astype(np.uint8))


@dataclass(frozen=True)
class SiteFormat:
    """How one linear's weight is quantized: bits, rows of K per scale, zero points."""

    bits: int
    block: int
    asymmetric: bool


def site_format(recipe: Recipe, site: qdq.Site, k: int) -> SiteFormat:
    """The recipe's format, or for an LM head in more bits than the body (int4 with --lm-head-bits 8)
    int8 as int8_wo takes it on this target (symmetric; blocks of 32 rows on cpu, a scale per output
    channel for TensorRT)."""
    bits = recipe.lm_head_own_bits
    if site.role == qdq.LM_HEAD and bits is not None:
        group = group_size_for("int8_wo", recipe.target, None)
        return SiteFormat(bits, group or k, False)
    return SiteFormat(recipe.weight_bits, recipe.group_size or k, recipe.asymmetric)


def nbits_block(q: WeightQuant) -> int:
    """MatMulNBits' block: the quantization block when it is a power of two >= 16, else
    (per-channel) the scale repeated per block: 8 bits in blocks of INT8_NBITS_BLOCK, 4 bits
    in the largest of NBITS_BLOCKS dividing K."""
    k = q.codes.shape[0]
    if q.block < k or (q.bits == 4 and q.block & (q.block - 1) == 0 and q.block >= 16):
        if q.block & (q.block - 1) or q.block < 16:
            raise ValueError(f"block {q.block} is not a power of two >= 16 (MatMulNBits)")
        return q.block
    if q.bits == 8 and k % INT8_NBITS_BLOCK == 0:
        return INT8_NBITS_BLOCK
    return next((b for b in NBITS_BLOCKS if k % b == 0), NBITS_BLOCKS[0])


# --- the two forms, from one WeightQuant --------------------------------------------------------


def _pack_int4(codes: np.ndarray) -> bytes:
    """ONNX INT4/UINT4: two values a byte, the first in the low nibble (row-major order)."""
    flat = (codes.ravel() & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def dq_tensors(q: WeightQuant, base: str, float_dtype: type) -> tuple[list[TensorProto], onnx.NodeProto]:
    """The initializers and the DequantizeLinear node of the TensorRT form (UINT4 with zero points when asymmetric)."""
    k, n = q.codes.shape
    if q.bits == 4:
        kind = TensorProto.INT4 if q.zeros is None else TensorProto.UINT4
        codes = helper.make_tensor(f"{base}.quantized", kind, [k, n], vals=_pack_int4(q.codes), raw=True)
        scale = numpy_helper.from_array(q.scales.astype(float_dtype), f"{base}.scale")
        tensors = [codes, scale]
        if q.zeros is not None:
            tensors.append(helper.make_tensor(f"{base}.zero_point", kind, list(q.zeros.shape),
                                              vals=_pack_int4(q.zeros), raw=True))
        node = helper.make_node("DequantizeLinear", [t.name for t in tensors], [f"{base}.dequantized"],
                                name=f"{base}.weight_dq", axis=0, block_size=q.block)
        return tensors, node
    if q.zeros is not None:
        raise ValueError("asymmetric weights are 4-bit only")
    codes = numpy_helper.from_array(q.codes, f"{base}.quantized")
    scale = numpy_helper.from_array(q.scales[0].astype(float_dtype), f"{base}.scale")
    node = helper.make_node("DequantizeLinear", [codes.name, scale.name], [f"{base}.dequantized"],
                            name=f"{base}.weight_dq", axis=1)
    return [codes, scale], node


def _per_nbits_block(rows: np.ndarray, q: WeightQuant, block: int, blocks: int) -> np.ndarray:
    """A per-quantization-block array ([q_blocks, N]) repeated per MatMulNBits block."""
    return np.repeat(rows, q.block // block, axis=0)[:blocks] if q.block > block else rows


def _pack_along_last(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values packed two a byte (low nibble first) along the last axis for 4 bits."""
    if bits != 4:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def nbits_arrays(q: WeightQuant) -> tuple[np.ndarray, np.ndarray, int]:
    """MatMulNBits' B [N, k_blocks, blob] (uint8) and scales [N, k_blocks], and its block size."""
    k, n = q.codes.shape
    block = nbits_block(q)
    blocks = -(-k // block)
    offset = 2 ** (q.bits - 1) if q.zeros is None else 0
    unsigned = np.full((blocks * block, n), offset, np.uint8)  # padding rows meet no activation
    unsigned[:k] = (q.codes.astype(np.int16) + offset).astype(np.uint8)
    packed = _pack_along_last(unsigned.T.reshape(n, blocks, block), q.bits)
    return np.ascontiguousarray(packed), np.ascontiguousarray(_per_nbits_block(q.scales, q, block, blocks).T), block


def nbits_zero_points(q: WeightQuant) -> np.ndarray | None:
    """MatMulNBits' zero_points [N, ceil(k_blocks * bits / 8)] (uint8), None when symmetric."""
    if q.zeros is None:
        return None
    block = nbits_block(q)
    blocks = -(-q.codes.shape[0] // block)
    return np.ascontiguousarray(_pack_along_last(_per_nbits_block(q.zeros, q, block, blocks).T, q.bits))


def nbits_node(q: WeightQuant, base: str, activation: str, output: str, float_dtype: type,
               accuracy_level: int = 0) -> tuple[list[TensorProto], onnx.NodeProto]:
    """The initializers and MatMulNBits node of the ONNX Runtime form (symmetric: no zero points,
    the op's default 2^(bits-1))."""
    packed, scales, block = nbits_arrays(q)
    k, n = q.codes.shape
    tensors = [numpy_helper.from_array(packed, f"{base}.nbits"),
               numpy_helper.from_array(scales.astype(float_dtype), f"{base}.nbits_scale")]
    zeros = nbits_zero_points(q)
    if zeros is not None:
        tensors.append(numpy_helper.from_array(zeros, f"{base}.nbits_zero_point"))
    node = helper.make_node("MatMulNBits", [activation, *(t.name for t in tensors)], [output],
                            name=f"{base}.matmul_nbits", domain=MS_DOMAIN, K=k, N=n, bits=q.bits, block_size=block,
                            accuracy_level=accuracy_level)
    return tensors, node


def decode_dq(codes: TensorProto, scale: TensorProto, node: onnx.NodeProto,
              zero_point: TensorProto | None = None) -> np.ndarray:
    """What a DequantizeLinear node of `dq_tensors` computes (read back through onnx)."""
    c = numpy_helper.to_array(codes).astype(np.float32)
    s = numpy_helper.to_array(scale).astype(np.float32)
    z = np.zeros_like(s) if zero_point is None else numpy_helper.to_array(zero_point).astype(np.float32)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "block_size" in attrs:
        def rows(a: np.ndarray) -> np.ndarray:
            return np.repeat(a, attrs["block_size"], axis=0)[:c.shape[0]]
        return (c - rows(z)) * rows(s)
    return (c - z[None, :]) * s[None, :]


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1) if bits == 4 else packed


def decode_nbits(packed: np.ndarray, scales: np.ndarray, k: int, bits: int,
                 zero_points: np.ndarray | None = None) -> np.ndarray:
    """What MatMulNBits reads from `packed`, `scales` (and `zero_points`), as a [K, N] weight (spec semantics)."""
    n, blocks, _ = packed.shape
    zeros = np.full((n, blocks), 2 ** (bits - 1), np.float32) if zero_points is None \
        else _unpack(zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    values = (_unpack(packed, bits).astype(np.float32) - zeros[..., None]) * scales.astype(np.float32)[..., None]
    return values.reshape(n, -1)[:, :k].T


# --- graph rewrite ------------------------------------------------------------------------------


def rewrite(model: onnx.ModelProto, sites: list[qdq.Site], quants: dict[str, WeightQuant], form: str,
            accuracy_level: int = 0) -> int:
    """Replace each site's float weight by its quantization in `form`; returns the bytes saved."""
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    float_dtype = np.float16 if qdq.float_type(model) == TensorProto.FLOAT16 else np.float32
    new_inits: list[TensorProto] = []
    before: dict[str, list[onnx.NodeProto]] = {}
    replaced: dict[str, onnx.NodeProto] = {}
    saved = 0
    for s in sites:
        q = quants[s.node]
        base = "lm_head.weight" if s.transposed else s.weight
        matmul = nodes[s.node]
        if form == "dq":
            tensors, dq = dq_tensors(q, base, float_dtype)
            before[s.node] = [dq]
            matmul.input[1] = dq.output[0]
        else:
            tensors, replaced[s.node] = nbits_node(q, base, matmul.input[0], matmul.output[0], float_dtype,
                                                   accuracy_level)
        new_inits += tensors
        saved += init[s.weight].ByteSize() - sum(t.ByteSize() for t in tensors)
    if replaced:
        kept = [replaced.get(n.name, n) for n in graph.node]
        del graph.node[:]
        graph.node.extend(kept)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    qdq._insert_before(graph, before)
    qdq._drop_unused(graph)
    graph.initializer.extend(new_inits)
    if any(a.name == "block_size" for n in before.values() for a in n[0].attribute):
        raise_opset(model, BLOCKED_DQ_OPSET)
    return saved


def raise_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset of the graph and its local functions (opset 19 -> 21
    changed only the types some ops accept, so nothing else in the graph changes)."""
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx") and o.version < version:
                o.version = version
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(
        [helper.make_opsetid("", version)], ignore_unknown=True))
