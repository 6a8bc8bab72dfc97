"""Measured agreement of the reference with itself and with transformers.

Each function returns the max abs error (or the tokens) so that tests bound them and
`benchmarks/equivalence.py` reports them. transformers is only imported here, for
checking: the reference never runs its model classes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.config import SaisaConfig
from saisa_edge.model import original, split
from saisa_edge.model.llama import SaisaLM


def split_prefill(
    lm: SaisaLM, ids: list[int], features: torch.Tensor | None, cache: split.TextCache | None = None,
    visual: split.VisualKV | None = None, offset: int = 0,
) -> tuple[torch.Tensor, split.TextCache, split.VisualKV | None, list[int]]:
    """One prompt (batch 1, positions from `offset`) through `split`: logits [n_text, vocab],
    the grown cache, the visual K/V and the text positions."""
    n_visual = features.shape[1] if features is not None else 0
    text, positions, start = split.text_layout(ids, n_visual)
    positions = [p + offset for p in positions]
    if features is not None and visual is None:
        visual = split.visual_kv(lm, features, start + offset)
    cache = cache if cache is not None else split.TextCache.empty(lm.config.text, 1, lm.lm_head.weight.dtype)
    logits, cache = split.forward_text(lm, torch.tensor([text]), torch.tensor([positions]), cache, visual)
    return logits[0], cache, visual, positions


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def split_vs_original(lm: SaisaLM, ids: list[int], features: torch.Tensor | None) -> float:
    """Prefill logits of the two formulations; `features` [1, N_v, mm_hidden] or None."""
    want = original.forward(lm, ids, None if features is None else features[0])
    return max_err(split_prefill(lm, ids, features)[0], want)


@torch.no_grad()
def split_greedy(lm: SaisaLM, ids: list[int], features: torch.Tensor | None, n: int) -> list[int]:
    """n greedy tokens from `split`, decoding on its caches (on the default device)."""
    logits, cache, visual, positions = split_prefill(lm, ids, features)
    tokens, pos = [], positions[-1] + 1
    for _ in range(n):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        out, cache = split.forward_text(lm, torch.tensor([[tok]]), torch.tensor([[pos]]), cache, visual)
        logits, pos = out[0], pos + 1
    return tokens


@torch.no_grad()
def greedy(lm: SaisaLM, ids: list[int], features: torch.Tensor | None, n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens from `split` (cached) and from `original` (recomputed every step)."""
    ours = split_greedy(lm, ids, features, n)
    theirs, seq = [], list(ids)
    for _ in range(n):
        tok = int(original.forward(lm, seq, None if features is None else features[0])[-1].argmax())
        theirs.append(tok)
        seq.append(tok)
    return ours, theirs


def to_transformers_llama(lm: SaisaLM) -> nn.Module:
    """transformers' `LlamaForCausalLM` with the reference's decoder weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = lm.config.text
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    cfg = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps, rope_parameters=rope, tie_word_embeddings=t.tie_word_embeddings,
        attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, head_dim=t.head_dim,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    model.to(dtype=lm.lm_head.weight.dtype)
    state = {k: v for k, v in lm.state_dict().items() if "mm_projector" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: {missing} {unexpected}")
    return model


@torch.no_grad()
def text_vs_transformers(lm: SaisaLM, ids: list[int]) -> float:
    """Text-only prefill logits against `LlamaForCausalLM`."""
    want = to_transformers_llama(lm)(torch.tensor([ids])).logits[0]
    return max_err(split_prefill(lm, ids, None)[0], want)


@torch.no_grad()
def vision_vs_transformers(tower: nn.Module, tower_path: Path, cfg: SaisaConfig, pixels: torch.Tensor) -> float:
    """Selected features against `CLIPVisionModel`'s hidden state at the select layer."""
    from transformers import CLIPVisionModel

    hf = CLIPVisionModel.from_pretrained(str(tower_path), dtype=torch.float32, attn_implementation="eager").eval()
    hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[cfg.mm.select_layer]
    want = hidden if cfg.mm.select_feature == "cls_patch" else hidden[:, 1:]
    return max_err(tower(pixels), want)


class _Fixed(nn.Module):
    """A projector that ignores the image and returns given hidden states [N, hidden]."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden.expand(*features.shape[:-1], -1)


@torch.no_grad()
def text_as_image_vs_transformers(lm: SaisaLM, before: list[int], passage: list[int], after: list[int]) -> dict[str, float]:
    """Feed each layer, as its "image", the hidden states LLaMA computes for an inline passage.

    The visual K/V are then exactly LLaMA's K/V for that passage, so both formulations'
    logits at the text positions must equal LLaMA's on the sequence with the passage
    inline: an end-to-end check of positions, RoPE offsets and masking.
    """
    out = to_transformers_llama(lm)(torch.tensor([before + passage + after]), output_hidden_states=True)
    span = range(len(before), len(before) + len(passage))
    lm = copy.deepcopy(lm)
    for layer, hidden in zip(lm.layers, out.hidden_states):
        layer.mm_projector = _Fixed(hidden[0, span.start : span.stop])
    ids = before + [IMAGE_TOKEN_INDEX] + after
    features = torch.zeros(1, len(passage), lm.config.mm.mm_hidden_size)
    want = out.logits[0, [i for i in range(out.logits.shape[1]) if i not in span]]
    return {
        "split": max_err(split_prefill(lm, ids, features)[0], want),
        "original": max_err(original.forward(lm, ids, features[0]), want),
    }
