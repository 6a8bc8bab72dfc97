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
  Scores and softmax are computed in fp32 whatever the input dtype (fp32, fp16, bf16);
  the output has the query's dtype. Every query sees at least its own key. Padding is
  expressed by positions alone: padded keys carry PAD_POSITION (visible to no real
  query), padded queries carry PAD_POSITION too (they see everything, stay finite, and
  their outputs are ignored).

Variants written by the exporter: `custom` (the node plus this function body, which
ONNX Runtime runs with no custom library), `plugin` (the node only, for TensorRT with
the plugin), `native` (ONNX's standard Attention, opset 23+, on the concatenated keys).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import FunctionProto, TensorProto, helper

from saisa_edge.export.graph import Builder
from saisa_edge.model.split import PAD_POSITION

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


def _segments(b: Builder, key: str, value: str, visual_key: str, visual_value: str, query_pos: str,
              key_pos: str, visual_end: str) -> tuple[str, str, str]:
    """Visual then text keys/values, concatenated, and the visibility mask [B, 1, T, N+S]."""
    batch = b.shape(key, 0, 1)
    ones = b.const([1, 1, 1])
    expand_to = b.op("Concat", batch, ones, axis=0)
    k = b.op("Concat", b.op("Expand", visual_key, expand_to), key, axis=2)
    v = b.op("Concat", b.op("Expand", visual_value, expand_to), value, axis=2)
    q_col = b.op("Unsqueeze", query_pos, b.const([2]))  # [B, T, 1]
    text_mask = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([1])), q_col)  # [B, T, S]
    end = b.op("Reshape", visual_end, b.const([-1, 1, 1]))  # [Bv, 1, 1]
    sees_image = b.op("GreaterOrEqual", q_col, end)  # [B, T, 1]
    visual_shape = b.op("Concat", b.shape(query_pos, 0, 2), b.shape(visual_key, 2, 3), axis=0)
    mask = b.op("Concat", b.op("Expand", sees_image, visual_shape), text_mask, axis=2)
    return k, v, b.op("Unsqueeze", mask, b.const([1]))


def function(opset: int) -> FunctionProto:
    """The op's body in standard ONNX ops (GQA by broadcasting, no copies of K/V heads)."""
    b = Builder()
    q, key, value, vk, vv, qpos, kpos, vend = INPUTS
    k, v, mask = _segments(b, key, value, vk, vv, qpos, kpos, vend)
    # [B, H, T, D] -> [B, KV, H/KV, T, D]; keys [B, KV, S', D] -> [B, KV, 1, S', D]
    b_, kv, t, d = b.shape(q, 0, 1), b.shape(k, 1, 2), b.shape(q, 2, 3), b.shape(q, 3, 4)
    q5 = b.op("Reshape", q, b.op("Concat", b_, kv, b.const([-1]), t, d, axis=0))
    k5 = b.op("Unsqueeze", k, b.const([2]))
    v5 = b.op("Unsqueeze", v, b.const([2]))
    scores = b.op("MatMul", b.op("Cast", q5, to=TensorProto.FLOAT),
                  b.op("Transpose", b.op("Cast", k5, to=TensorProto.FLOAT), perm=[0, 1, 2, 4, 3]))
    scores = b.op("Mul", scores, b.ref_float("scale"))
    neg_inf = b.const(-np.inf, np.float32)
    probs = b.op("Softmax", b.op("Where", b.op("Unsqueeze", mask, b.const([1])), scores, neg_inf), axis=-1)
    out5 = b.op("MatMul", b.op("CastLike", probs, q), v5)
    b.op("Reshape", out5, b.shape(q, 0), out="out")
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), ["out"], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
    )


def emit(b: Builder, variant: str, inputs: tuple[str, ...], attrs: dict[str, object]) -> str:
    """Attention for one layer into graph `b`: the custom node, or standard Attention."""
    if variant == "native":
        q, key, value, vk, vv, qpos, kpos, vend = inputs
        k, v, mask = _segments(b, key, value, vk, vv, qpos, kpos, vend)
        return b.op("Attention", q, k, v, mask, scale=attrs["scale"], softmax_precision=TensorProto.FLOAT,
                    name="attention")
    return b.op(OP_TYPE, *inputs, domain=DOMAIN, name="naavit", **attrs)
