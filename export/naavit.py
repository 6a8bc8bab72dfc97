"""`saisa::NAAViTAttention`: the attention of SAISA's decoder, one node per layer.

Contract (what the ONNX function body computes and the TensorRT plugin implements):

  inputs
    query          [B, H, T, D]    RoPE applied; T new text tokens
    key, value     [B, KV, S, D]   text keys/values: the cache followed by the T new ones
    visual_key,
    visual_value   [Bv, KV, N, D]  per-image keys/values, read-only; Bv is 1 (shared by
                                   the whole batch, broadcast, never copied) or B; N may be 0
    query_pos      [B, T]  int64   position of each query
    key_pos        [B, S]  int64   position of each text key; PAD_POSITION for padding
    visual_end     [Bv]    int64   position of the first text token after the image
  output
    out            [B, H, T, D]
  attributes
    num_heads H, num_kv_heads KV (H % KV == 0, GQA: query head h reads kv head h // (H/KV)),
    head_size D, scale (softmax scale, 1/sqrt(D)), plugin_namespace, plugin_version

  out[b, h, t] = softmax over the visible keys of scale * q.k, times their values, where
    visual key n is visible  iff  query_pos[b, t] >= visual_end[b or 0]
    text key s is visible    iff  key_pos[b, s] <= query_pos[b, t]
  Scores are taken in the input dtype (fp32, fp16, bf16) with the scale applied to the
  query first; the softmax runs in fp32; the output has the query's dtype. Every query
  sees at least its own key. Padding is expressed by positions alone: padded keys carry
  PAD_POSITION (visible to no real query), padded queries carry PAD_POSITION too (they
  see everything, stay finite, and their outputs are ignored).

Variants written by the exporter: `custom` (the node plus this function body, which
ONNX Runtime runs with no custom library), `plugin` (the node only, for TensorRT with
the plugin), `native` (ONNX's standard Attention, opset 23+, on the concatenated keys).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import FunctionProto, TensorProto, helper

from saisa_edge.export.graph import Builder

DOMAIN = "saisa"
DOMAIN_VERSION = 1
OP_TYPE = "NAAViTAttention"
PLUGIN_VERSION = "1"
INPUTS = ("query", "key", "value", "visual_key", "visual_value", "query_pos", "key_pos", "visual_end")
ATTRIBUTES = ("num_heads", "num_kv_heads", "head_size", "scale", "plugin_namespace", "plugin_version")
VARIANTS = ("custom", "plugin", "native")
NATIVE_MIN_OPSET = 23


def attributes(num_heads: int, num_kv_heads: int, head_size: int) -> dict[str, object]:
    return {
        "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_size": head_size,
        "scale": 1.0 / math.sqrt(head_size), "plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION,
    }


def _mask(b: Builder, visual_key: str, query_pos: str, key_pos: str, visual_end: str) -> str:
    """Visibility [B, T, N+S]: visual keys first, then text keys (the native variant's mask)."""
    q_col = b.op("Unsqueeze", query_pos, b.const([2]))  # [B, T, 1]
    text_mask = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([1])), q_col)  # [B, T, S]
    sees_image = b.op("GreaterOrEqual", q_col, b.op("Reshape", visual_end, b.const([-1, 1, 1])))  # [B, T, 1]
    visual_shape = b.op("Concat", b.shape(query_pos, 0, 2), b.shape(visual_key, 2, 3), axis=0)
    return b.op("Concat", b.op("Expand", sees_image, visual_shape), text_mask, axis=2)


def function(opset: int) -> FunctionProto:
    """The op's body in standard ONNX ops.

    Queries are grouped per K/V head ([B, KV, H/KV*T, D]) so GQA needs no repeated K/V,
    and each key segment is read where it lies: scores against the visual and the text
    keys are taken separately (MatMul broadcasts Bv = 1 over the batch), masked, joined
    for one softmax, and split again for the two value products. Shapes that depend on
    attributes only are constants once ONNX Runtime inlines the function.
    """
    b = Builder()
    q, key, value, vk, vv, qpos, kpos, vend = INPUTS
    heads = b.op("Unsqueeze", b.ref_int("num_heads"), b.const([0]))
    kv_heads = b.op("Unsqueeze", b.ref_int("num_kv_heads"), b.const([0]))
    groups = b.op("Div", heads, kv_heads)
    zero, rest = b.const([0]), b.const([-1])
    scaled = b.op("Mul", q, b.op("CastLike", b.ref_float("scale"), q))
    q4 = b.op("Reshape", scaled, b.op("Concat", zero, kv_heads, rest, zero, axis=0))  # [B, KV, G*T, D]

    def masked_scores(keys: str, visible: str) -> str:
        """Scores [B, KV, G*T, keys] where `visible` [B, T, keys or 1] allows, -inf elsewhere."""
        s = b.op("MatMul", q4, b.op("Transpose", keys, perm=[0, 1, 3, 2]))
        tiled = b.op("Tile", b.op("Unsqueeze", visible, b.const([1])),
                     b.op("Concat", b.const([1, 1]), groups, b.const([1]), axis=0))
        return b.op("Where", tiled, s, b.op("CastLike", b.const(-np.inf, np.float32), s))

    q_col = b.op("Unsqueeze", qpos, b.const([2]))  # [B, T, 1]
    sees_image = b.op("GreaterOrEqual", q_col, b.op("Reshape", vend, b.const([-1, 1, 1])))
    sees_text = b.op("LessOrEqual", b.op("Unsqueeze", kpos, b.const([1])), q_col)
    joined = b.op("Concat", masked_scores(vk, sees_image), masked_scores(key, sees_text), axis=-1)
    probs = b.op("CastLike", b.op("Softmax", b.op("Cast", joined, to=TensorProto.FLOAT), axis=-1), q)
    n = b.shape(vk, 2, 3)
    p_visual = b.op("Slice", probs, b.const([0]), n, b.const([-1]))
    p_text = b.op("Slice", probs, n, b.const([2**62]), b.const([-1]))
    out4 = b.op("Add", b.op("MatMul", p_visual, vv), b.op("MatMul", p_text, value))
    b.op("Reshape", out4, b.op("Concat", zero, heads, rest, zero, axis=0), out="out")  # [B, H, T, D]
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), ["out"], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
    )


def emit(b: Builder, variant: str, inputs: tuple[str, ...], attrs: dict[str, object]) -> str:
    """Attention for one layer into graph `b`: the custom node, or standard Attention."""
    if variant == "native":  # one key sequence: the visual segment is expanded and concatenated
        q, key, value, vk, vv, qpos, kpos, vend = inputs
        expand_to = b.op("Concat", b.shape(key, 0, 1), b.const([1, 1, 1]), axis=0)
        k = b.op("Concat", b.op("Expand", vk, expand_to), key, axis=2)
        v = b.op("Concat", b.op("Expand", vv, expand_to), value, axis=2)
        mask = b.op("Unsqueeze", _mask(b, vk, qpos, kpos, vend), b.const([1]))
        return b.op("Attention", q, k, v, mask, scale=attrs["scale"], softmax_precision=TensorProto.FLOAT,
                    name="attention")
    return b.op(OP_TYPE, *inputs, domain=DOMAIN, name="naavit", **attrs)
