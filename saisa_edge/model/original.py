"""SAISA as the public code computes it: the whole sequence, every layer, every step.

Visual positions are overwritten by each layer's projector output, have keys and
values but no query (attention output 0, FFN skipped), and the NAAViT mask decides
who sees whom. Nothing is cached: this is the formulation `split` must equal.
"""

from __future__ import annotations

import torch

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.model.attention import attend
from saisa_edge.model.llama import SaisaLM


def naavit_mask(n_before: int, n_visual: int, n_after: int) -> torch.Tensor:
    """[S, S] visibility for the layout before-text | visual | after-text.

    Text before the image: causal over text before the image. Text after the image:
    all text before, all visual positions, causal over text after. Visual rows have
    no query; they see only themselves so the softmax stays defined, and their
    output is discarded.
    """
    s = n_before + n_visual + n_after
    pos = torch.arange(s)
    visual = (pos >= n_before) & (pos < n_before + n_visual)
    after = pos >= n_before + n_visual
    causal_text = (pos[None, :] <= pos[:, None]) & ~visual[None, :] & ~visual[:, None]
    sees_image = after[:, None] & visual[None, :]
    itself = torch.eye(s, dtype=torch.bool) & visual[:, None]
    return causal_text | sees_image | itself


@torch.no_grad()
def forward(lm: SaisaLM, ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
    """Logits [n_text, vocab] at the text positions of `ids`, in order.

    `ids` holds at most one IMAGE_TOKEN_INDEX, where the `features` [N_v, mm_hidden]
    of one image go.
    """
    dtype = lm.lm_head.weight.dtype
    n_img = ids.count(IMAGE_TOKEN_INDEX)
    if n_img > 1 or (n_img == 1) != (features is not None):
        raise ValueError("ids must hold one image marker exactly when features are given")
    cut = ids.index(IMAGE_TOKEN_INDEX) if n_img else len(ids)
    before, after = ids[:cut], ids[cut + 1 :]
    n_visual = 0 if features is None else features.shape[0]
    embed = lm.model.embed_tokens
    x = torch.cat(
        (
            embed(torch.tensor(before, dtype=torch.long)),
            torch.zeros(n_visual, lm.config.text.hidden_size, dtype=dtype),
            embed(torch.tensor(after, dtype=torch.long)),
        )
    )[None]
    s = x.shape[1]
    visual = torch.zeros(s, dtype=torch.bool)
    visual[len(before) : len(before) + n_visual] = True
    mask = naavit_mask(len(before), n_visual, len(after))[None]
    cos, sin = lm.rope(torch.arange(s)[None], dtype)

    for layer in lm.layers:
        if features is not None:
            x[:, visual] = layer.mm_projector(features.to(dtype))
        h = layer.input_layernorm(x)
        q = layer.self_attn.query(h, cos, sin)
        k, v = layer.self_attn.key_value(h, cos, sin)
        attn = attend(q, k, v, mask).masked_fill(visual[None, :, None], 0.0)
        x = torch.where(visual[None, :, None], x, layer.residual(x, attn))
    return lm.logits(x[0, ~visual])
