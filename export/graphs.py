"""The three graphs of an artifact, built from a checkpoint (their I/O names: `saisa_edge.artifacts.names`)."""

from __future__ import annotations

import torch
from onnx import TensorProto
from torch import nn

from saisa_edge.artifacts.names import (
    FEATURES, INPUT_IDS, LOGITS, PAST_POSITIONS, PIXEL_VALUES, POSITION_IDS, PRESENT_POSITIONS, VISUAL_END,
    VISUAL_START, past, present, visual,
)
from saisa_edge.checkpoint.loader import CheckpointSource
from saisa_edge.config import SaisaConfig, TextConfig
from saisa_edge.export import naavit
from saisa_edge.export.graph import ELEM_TYPE, Graph
from saisa_edge.export.layers import (
    Weights, apply_rope, from_heads, gelu, layer_norm, linear, linears, projector, quick_gelu, rms_norm,
    rope_tables, rotate_half_matrix, to_heads,
)
from saisa_edge.model.clip import ClipVisionTower
from saisa_edge.model.llama import SaisaLM

I64 = TensorProto.INT64


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_vision(source: CheckpointSource, dtype: torch.dtype, opset: int) -> Graph:
    cfg = source.config
    v = cfg.vision
    with torch.device("meta"):
        tower = ClipVisionTower(cfg)
    g = Graph(name="saisa_vision")
    w = Weights(g, source, _shapes(tower), dtype)
    el = ELEM_TYPE[dtype]
    pixels = g.input(PIXEL_VALUES, el, ["batch", v.num_channels, v.crop_size, v.crop_size])
    prefix = "vision_model.embeddings"
    kernel = w(f"{prefix}.patch_embedding.weight")
    conv_bf16 = dtype != torch.bfloat16 or opset >= 22  # Conv takes bf16 from opset 22: else convolve in fp32
    x_in, k_in = (pixels, kernel) if conv_bf16 else (g.op("Cast", pixels, to=TensorProto.FLOAT),
                                                     g.op("Cast", kernel, to=TensorProto.FLOAT))
    patches = g.op("Conv", x_in, k_in, kernel_shape=[v.patch_size] * 2, strides=[v.patch_size] * 2)
    patches = patches if conv_bf16 else g.op("Cast", patches, to=el)
    patches = g.op("Transpose", g.op("Reshape", patches, g.const([0, v.hidden_size, -1])), perm=[0, 2, 1])
    batch = g.shape(pixels, 0, 1)
    cls = g.op("Expand", g.op("Reshape", w(f"{prefix}.class_embedding"), g.const([1, 1, -1])),
               g.op("Concat", batch, g.const([1, 1]), axis=0))
    x = g.op("Add", g.op("Concat", cls, patches, axis=1), w(f"{prefix}.position_embedding.weight"))
    x = layer_norm(g, w, x, "vision_model.pre_layrnorm", v.layer_norm_eps)
    heads, head_dim = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    act = quick_gelu if v.hidden_act == "quick_gelu" else gelu
    for i in range(cfg.vision_layers_used()):
        p = f"vision_model.encoder.layers.{i}"
        h = layer_norm(g, w, x, f"{p}.layer_norm1", v.layer_norm_eps)
        q, k, val = (to_heads(g, linear(g, w, h, f"{p}.self_attn.{n}_proj"), heads, head_dim) for n in "qkv")
        scale = g.op("CastLike", g.const(head_dim**-0.5, "float32"), q)
        scores = g.op("MatMul", g.op("Mul", q, scale), g.op("Transpose", k, perm=[0, 1, 3, 2]))
        attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), val)
        x = g.op("Add", x, linear(g, w, from_heads(g, attn), f"{p}.self_attn.out_proj"))
        h = layer_norm(g, w, x, f"{p}.layer_norm2", v.layer_norm_eps)
        x = g.op("Add", x, linear(g, w, act(g, linear(g, w, h, f"{p}.mlp.fc1")), f"{p}.mlp.fc2"))
    if cfg.mm.select_feature == "patch":
        x = g.op("Slice", x, g.const([1]), g.const([2**62]), g.const([1]), out=FEATURES)
    g.output(x, FEATURES, el, ["batch", cfg.num_visual_tokens, v.hidden_size])
    return g


def lm_weights(g: Graph, source: CheckpointSource, dtype: torch.dtype) -> Weights:
    with torch.device("meta"):
        lm = SaisaLM(source.config)
    return Weights(g, source, _shapes(lm), dtype)


def build_visual_kv(source: CheckpointSource, dtype: torch.dtype) -> Graph:
    cfg = source.config
    t = cfg.text
    g = Graph(name="saisa_visual_kv")
    w = lm_weights(g, source, dtype)
    el = ELEM_TYPE[dtype]
    feats = g.input(FEATURES, el, ["batch", "visual_length", cfg.mm.mm_hidden_size])
    start = g.input(VISUAL_START, I64, ["batch"])
    n = g.shape(feats, 1, 2)
    steps = g.op("Range", g.const(0), g.op("Squeeze", n), g.const(1))
    positions = g.op("Add", g.op("Unsqueeze", start, g.const([1])), g.op("Unsqueeze", steps, g.const([0])))
    cos, sin = rope_tables(g, t, positions, dtype)
    rotate = rotate_half_matrix(g, t.head_dim, dtype)
    dims = ["batch", t.num_key_value_heads, "visual_length", t.head_dim]
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}"
        h = rms_norm(g, w, projector(g, w, feats, f"{p}.mm_projector", cfg.mm.projector_depth),
                     f"{p}.input_layernorm", t.rms_norm_eps)
        k, v = linears(g, w, h, [f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"], f"{p}.self_attn.kv_proj")
        k = apply_rope(g, to_heads(g, k, t.num_key_value_heads, t.head_dim), cos, sin, rotate, out=visual("key", i))
        v = to_heads(g, v, t.num_key_value_heads, t.head_dim, out=visual("value", i))
        g.output(k, visual("key", i), el, dims)
        g.output(v, visual("value", i), el, dims)
    return g


def build_decoder(source: CheckpointSource, dtype: torch.dtype, attention: str) -> Graph:
    cfg: SaisaConfig = source.config
    t = cfg.text
    g = Graph(name="saisa_decoder")
    w = lm_weights(g, source, dtype)
    el = ELEM_TYPE[dtype]
    kvh, d = t.num_key_value_heads, t.head_dim
    ids = g.input(INPUT_IDS, I64, ["batch", "query_length"])
    pos = g.input(POSITION_IDS, I64, ["batch", "query_length"])
    past_pos = g.input(PAST_POSITIONS, I64, ["batch", "past_length"])
    vis_end = g.input(VISUAL_END, I64, ["visual_batch"])
    key_pos = g.op("Concat", past_pos, pos, axis=1, out=PRESENT_POSITIONS)
    g.output(key_pos, PRESENT_POSITIONS, I64, ["batch", "total_length"])
    x = g.op("Gather", w("model.embed_tokens.weight"), ids, axis=0)
    cos, sin = rope_tables(g, t, pos, dtype)
    rotate = rotate_half_matrix(g, d, dtype)
    attrs = naavit.attributes(t.num_attention_heads, kvh, d)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}"
        cache_dims = ["batch", kvh, "past_length", d]
        visual_dims = ["visual_batch", kvh, "visual_length", d]
        past_k, past_v = g.input(past("key", i), el, cache_dims), g.input(past("value", i), el, cache_dims)
        vis_k, vis_v = g.input(visual("key", i), el, visual_dims), g.input(visual("value", i), el, visual_dims)
        h = rms_norm(g, w, x, f"{p}.input_layernorm", t.rms_norm_eps)
        q, k, v = linears(g, w, h, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"{p}.self_attn.qkv_proj")
        q = apply_rope(g, to_heads(g, q, t.num_attention_heads, d), cos, sin, rotate)
        k = apply_rope(g, to_heads(g, k, kvh, d), cos, sin, rotate)
        v = to_heads(g, v, kvh, d)
        k_all = g.op("Concat", past_k, k, axis=2, out=present("key", i))
        v_all = g.op("Concat", past_v, v, axis=2, out=present("value", i))
        g.output(k_all, present("key", i), el, ["batch", kvh, "total_length", d])
        g.output(v_all, present("value", i), el, ["batch", kvh, "total_length", d])
        attn = naavit.emit(g, attention, (q, k_all, v_all, vis_k, vis_v, pos, key_pos, vis_end), attrs)
        x = g.op("Add", x, linear(g, w, from_heads(g, attn), f"{p}.self_attn.o_proj"))
        h = rms_norm(g, w, x, f"{p}.post_attention_layernorm", t.rms_norm_eps)
        gate, up = linears(g, w, h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
        silu = g.op("Mul", gate, g.op("Sigmoid", gate), name="silu")
        x = g.op("Add", x, linear(g, w, g.op("Mul", silu, up), f"{p}.mlp.down_proj"))
    lm_head(g, w, rms_norm(g, w, x, "model.norm", t.rms_norm_eps), t)
    return g


def lm_head(g: Graph, w: Weights, x: str, t: TextConfig) -> None:
    """The final hidden states -> the fp32 `logits` output [B, T, vocab]."""
    if t.tie_word_embeddings:  # read the embedding once; no transposed copy in the file
        logits = g.op("MatMul", x, g.op("Transpose", w("model.embed_tokens.weight"), perm=[1, 0]))
    else:
        logits = linear(g, w, x, "lm_head")
    logits = g.op("Cast", logits, to=TensorProto.FLOAT, out=LOGITS)
    g.output(logits, LOGITS, TensorProto.FLOAT, ["batch", "query_length", t.vocab_size])
