"""The decoder as ONNX Runtime's fused `com.microsoft` ops (the `contrib` decoder form).

SAISA's decode is ordinary causal attention once the K/V of a request sit in slot order:
slot p of a row holds the K/V of position p, so the image's K/V (from visual_kv.onnx,
already rotated for positions s..s+N_v-1) fill slots s..s+N_v-1, text before the image
(slots < s) cannot see them and text after it sees them all. One GroupQueryAttention per
layer then does the whole attention: RoPE of the new tokens at their slot (= position),
the write of their K/V into a buffer shared by past and present (updated in place) and
causal attention up to each row's `seqlens_k`. Each residual add and the RMSNorm after it
become one SkipSimplifiedLayerNormalization (the first norm, written out, is fused into a
SimplifiedLayerNormalization by ONNX Runtime at load); the linears stay MatMuls on
`<name>.weight` initializers, so calibration's weight-only rewrite turns them into
MatMulNBits as it does for the standard form.
"""

from __future__ import annotations

import torch
from onnx import TensorProto, helper

from saisa_edge.artifacts.names import INPUT_IDS, SEQLENS_K, TOTAL_LENGTH, past, present
from saisa_edge.checkpoint.loader import CheckpointSource
from saisa_edge.config import TextConfig
from saisa_edge.export.graph import ELEM_TYPE, Graph
from saisa_edge.export.graphs import lm_head, lm_weights
from saisa_edge.export.layers import Weights, joined_linear, linear, linears, rms_norm
from saisa_edge.model import rope

MS_DOMAIN = "com.microsoft"
ROTARY_MULTIPLE = 16  # GroupQueryAttention rotates heads whose size is a multiple of 16


def rope_caches(g: Graph, t: TextConfig, context: int) -> tuple[str, str]:
    """cos and sin [context, head_dim / 2]: the reference's angles (fp32) for every slot."""

    def table(i: int) -> torch.Tensor:
        both = rope.cos_sin(rope.inverse_frequencies(t), torch.arange(context), torch.float32)
        return both[i][:, : t.head_dim // 2]

    shape = (context, t.head_dim // 2)
    return (g.weight("rope.cos_cache", shape, torch.float32, lambda: table(0)),
            g.weight("rope.sin_cache", shape, torch.float32, lambda: table(1)))


def _skip_norm(g: Graph, w: Weights, x: str, residual: str, prefix: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual): a residual add and the next norm in one node."""
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", x, residual, w(f"{prefix}.weight"), outputs=4,
                               domain=MS_DOMAIN, epsilon=eps, name="skip_rms_norm")
    return normed, total


def build_contrib_decoder(source: CheckpointSource, dtype: torch.dtype, context: int) -> Graph:
    """The decoder over a K/V buffer of `context` slots per row (names: `artifacts.names`)."""
    t = source.config.text
    g = Graph(name="saisa_decoder_contrib")
    w = lm_weights(g, source, dtype)
    el = ELEM_TYPE[dtype]
    ids = g.input(INPUT_IDS, TensorProto.INT64, ["batch", "query_length"])
    seqlens = g.input(SEQLENS_K, TensorProto.INT32, ["batch"])
    total = g.input(TOTAL_LENGTH, TensorProto.INT32, [])
    cos, sin = rope_caches(g, t, context)
    buffer_dims = ["batch", t.num_key_value_heads, context, t.head_dim]
    residual = g.op("Gather", w("model.embed_tokens.weight"), ids, axis=0)
    # SimplifiedLayerNormalization sits in ONNX's own domain, which onnx's checker refuses: the
    # first norm is written out, in the form ONNX Runtime fuses into that op at load
    h = rms_norm(g, w, residual, "model.layers.0.input_layernorm", t.rms_norm_eps)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}"
        past_k, past_v = g.input(past("key", i), el, buffer_dims), g.input(past("value", i), el, buffer_dims)
        qkv = joined_linear(g, w, h, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"{p}.self_attn.qkv_proj")
        attn = g.fresh("gqa")
        # present K/V are graph outputs by name (an Identity would copy the whole buffer every step)
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total, cos, sin],
            [attn, present("key", i), present("value", i)], name=g.fresh("gqa_node"), domain=MS_DOMAIN,
            num_heads=t.num_attention_heads, kv_num_heads=t.num_key_value_heads, do_rotary=1))
        for kind in ("key", "value"):
            g.output(present(kind, i), present(kind, i), el, buffer_dims)
        h, residual = _skip_norm(g, w, linear(g, w, attn, f"{p}.self_attn.o_proj"), residual,
                                 f"{p}.post_attention_layernorm", t.rms_norm_eps)
        gate, up = linears(g, w, h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
        silu = g.op("Mul", gate, g.op("Sigmoid", gate), name="silu")
        after = f"model.layers.{i + 1}.input_layernorm" if i + 1 < t.num_hidden_layers else "model.norm"
        h, residual = _skip_norm(g, w, linear(g, w, g.op("Mul", silu, up), f"{p}.mlp.down_proj"), residual,
                                 after, t.rms_norm_eps)
    lm_head(g, w, h, t)
    return g
