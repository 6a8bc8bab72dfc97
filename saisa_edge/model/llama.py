"""LLaMA decoder with SAISA's per-layer projectors, named as the checkpoint names its tensors.

The modules only hold weights and do the per-token maths (norms, projections, FFN);
how positions attend to each other is the business of `original` and `split`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from saisa_edge.config import SaisaConfig, TextConfig
from saisa_edge.model import rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttention(nn.Module):
    """Q/K/V/O projections; `query` and `key_value` return heads-first tensors with RoPE applied."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, h, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.attention_bias)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:2], n, self.head_dim).transpose(1, 2)

    def query(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope.apply(self._heads(self.q_proj(h), self.num_heads), cos, sin)

    def key_value(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = rope.apply(self._heads(self.k_proj(h), self.num_kv_heads), cos, sin)
        return k, self._heads(self.v_proj(h), self.num_kv_heads)


def build_projector(mm_hidden: int, hidden: int, depth: int) -> nn.Module:
    """LLaVA's `linear` (depth 0) or `mlp{depth}x_gelu` projector."""
    if depth == 0:
        return nn.Linear(mm_hidden, hidden)
    layers: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SaisaConfig):
        super().__init__()
        t = cfg.text
        self.self_attn = SelfAttention(t)
        self.mlp = MLP(t)
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.mm_projector = build_projector(cfg.mm.mm_hidden_size, t.hidden_size, cfg.mm.projector_depth)

    def residual(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The text positions' block after attention: output projection, then the FFN."""
        x = x + self.self_attn.o_proj(attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: SaisaConfig):
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)


class SaisaLM(nn.Module):
    """The decoder side of a SAISA checkpoint (`model.*` and `lm_head`)."""

    def __init__(self, cfg: SaisaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def layers(self) -> Sequence[DecoderLayer]:
        return cast(Sequence[DecoderLayer], self.model.layers)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope.cos_sin(rope.inverse_frequencies(self.config.text), positions, dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))
