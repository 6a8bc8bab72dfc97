"""Analytic inference FLOPs of SAISA and of the LLaVA-1.5 layout on the same model.

Convention: FLOPs = 2 x multiply-accumulates of the matrix products (norms, softmax,
activations and RoPE are left out: they are a fraction of a percent); causal attention
counts the keys each query actually sees; one prefill of the image plus `text_tokens`
prompt tokens, the vision encoder included, logits for the last token only.

LLaVA-1.5: one projector; the N visual tokens run through every decoder layer with the
text (Q/K/V/O, MLP, attention over everything before them). SAISA (NAAViT): a projector
per layer; visual tokens only get their K/V projections there; text tokens attend to
the N visual keys plus the text before them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from saisa_edge.config import SaisaConfig
from saisa_edge.errors import SaisaError

DEFAULT_TEXT_TOKENS = 32  # a short question: LLaVA-Bench style prompts run 20-60 tokens


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int  # layers actually run (LLaVA stops at the penultimate)
    patches: int  # N visual tokens
    patch_pixels: int  # 3 x patch x patch
    projector_depth: int

    @classmethod
    def of(cls, cfg: SaisaConfig) -> "Shapes":
        t, v = cfg.text, cfg.vision
        return cls(t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                   t.num_key_value_heads, t.head_dim, t.vocab_size, v.hidden_size, v.intermediate_size,
                   cfg.vision_layers_used(), cfg.num_visual_tokens, v.num_channels * v.patch_size**2,
                   cfg.mm.projector_depth)


_CLIP_L_336 = dict(vision_hidden=1024, vision_intermediate=4096, vision_layers=23, patches=576,
                   patch_pixels=3 * 14 * 14, projector_depth=2)
CONFIGS = {
    "vicuna-7b": Shapes(4096, 11008, 32, 32, 32, 128, 32000, **_CLIP_L_336),
    "llama3-8b": Shapes(4096, 14336, 32, 32, 8, 128, 128256, **_CLIP_L_336),
}


def _vision(s: Shapes) -> float:
    tokens = s.patches + 1  # with CLS
    per_layer = tokens * (4 * s.vision_hidden**2 + 2 * s.vision_hidden * s.vision_intermediate) \
        + 2 * tokens * tokens * s.vision_hidden  # QK^T and AV, no mask
    return 2.0 * (s.vision_layers * per_layer + s.patches * s.patch_pixels * s.vision_hidden)


def _projector(s: Shapes) -> float:
    depth = max(s.projector_depth, 1)
    return 2.0 * s.patches * (s.vision_hidden * s.hidden + (depth - 1) * s.hidden**2)


def _token_linears(s: Shapes) -> float:
    """Per token and layer: Q, K, V, O and the gated MLP."""
    qo = 2 * s.hidden * s.heads * s.head_dim
    kv = 2 * s.hidden * s.kv_heads * s.head_dim
    return 2.0 * (qo + kv + 3 * s.hidden * s.intermediate)


def _attention(s: Shapes, queries: int, keys_seen: float) -> float:
    """QK^T and AV for `queries` queries that see `keys_seen` keys in all."""
    return 2.0 * 2 * s.heads * s.head_dim * keys_seen if queries else 0.0


def llava(s: Shapes, text: int) -> dict[str, float]:
    n = s.patches + text
    return {
        "vision": _vision(s),
        "projector": _projector(s),
        "decoder_linears": s.layers * n * _token_linears(s),
        "decoder_attention": s.layers * _attention(s, n, n * (n + 1) / 2),
        "lm_head": 2.0 * s.hidden * s.vocab,
    }


def saisa(s: Shapes, text: int) -> dict[str, float]:
    kv = 2.0 * 2 * s.hidden * s.kv_heads * s.head_dim
    return {
        "vision": _vision(s),
        "projector": s.layers * _projector(s),  # one per layer
        "visual_kv": s.layers * s.patches * kv,
        "decoder_linears": s.layers * text * _token_linears(s),
        "decoder_attention": s.layers * _attention(s, text, text * s.patches + text * (text + 1) / 2),
        "lm_head": 2.0 * s.hidden * s.vocab,
    }


def report(s: Shapes, text: int, name: str) -> dict[str, Any]:
    if text < 0:
        raise SaisaError(f"--text-tokens {text}: must be 0 or more")
    a, b = llava(s, text), saisa(s, text)
    total_a, total_b = sum(a.values()), sum(b.values())
    return {
        "config": name, "text_tokens": text, "visual_tokens": s.patches, "shapes": asdict(s),
        "convention": "2 x MACs of matrix products; one prefill of image + text; vision encoder included; "
                      "causal attention counts visible keys only; logits for the last token",
        "llava_1_5": {"total_gflops": round(total_a / 1e9, 1), "stages_gflops": {k: round(v / 1e9, 1) for k, v in a.items()}},
        "saisa": {"total_gflops": round(total_b / 1e9, 1), "stages_gflops": {k: round(v / 1e9, 1) for k, v in b.items()}},
        "reduction": round(1 - total_b / total_a, 4),
        "reduction_without_vision": round(1 - (total_b - b["vision"]) / (total_a - a["vision"]), 4),
    }


def table(r: dict[str, Any]) -> str:
    stages = list(dict.fromkeys([*r["llava_1_5"]["stages_gflops"], *r["saisa"]["stages_gflops"]]))
    rows = [f"{r['config']}: {r['visual_tokens']} visual + {r['text_tokens']} text tokens (GFLOPs)",
            f"{'stage':<20} {'LLaVA-1.5':>12} {'SAISA':>12}"]
    for k in stages:
        rows.append(f"{k:<20} {r['llava_1_5']['stages_gflops'].get(k, 0.0):12.1f} {r['saisa']['stages_gflops'].get(k, 0.0):12.1f}")
    rows.append(f"{'total':<20} {r['llava_1_5']['total_gflops']:12.1f} {r['saisa']['total_gflops']:12.1f}")
    rows.append(f"SAISA needs {100 * r['reduction']:.1f}% fewer FLOPs ({100 * r['reduction_without_vision']:.1f}% "
                "without the shared vision encoder)")
    return "\n".join(rows)
