"""Put the smol preset's untrained image path into the text model's own distribution.

No vision weights are reachable, so the projectors cannot carry information about the
image. Left at random, their outputs are nothing SmolLM2's layers ever see (the text
after the image then degenerates into loops). Here each layer's last projector linear
is fitted by weighted ridge least squares so that P_l(F) of the bundled fit images
reproduces SmolLM2's own layer-l input hidden states of one passage of varied text placed
where the image goes: an image then reads, at every layer, like that passage. If P_l(F)
equalled those states exactly, every visual K/V would be the plain model's K/V for the
passage (tests/test_fit_projectors.py checks this identity). One passage for every image,
not one each: the map cannot send several images' features to several passages (relative
error 0.5-0.9 per layer), but sending them all towards one passage teaches it the part of
the features that images share, so images it never saw land near the passage too. The
passage ends in a line break because the original's tokenisation drops the first token
after `<image>` (the "\\n" of "<image>\\n") whenever the prompt starts with the BOS, as
SmolLM2's chatml prompt does: without it the question runs on from the passage and SmolLM2
continues the passage instead of answering. The map is affine in the projector's hidden
activations, so different images still give different visual K/V.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from saisa_edge.model import split
from saisa_edge.model.llama import SaisaLM

RIDGE = 1e-1
"""Ridge on the activations' covariance, in units of its mean variance: keeps the solve
well posed in directions the fit images barely span, so that unseen images are not
thrown far off by them."""


def text_passages(ids: list[int], count: int, length: int, end: list[int]) -> torch.Tensor:
    """[count, length] consecutive windows of the token stream `ids` (repeated as often as
    needed), each cut to leave room for `end`, which closes it."""
    body = length - len(end)
    stream = ids * -(-count * body // len(ids))
    return torch.tensor([stream[i * body : (i + 1) * body] + end for i in range(count)])


@torch.no_grad()
def layer_inputs(lm: SaisaLM, prefix: list[int], passages: torch.Tensor) -> torch.Tensor:
    """Each layer's input hidden states at the passages' positions, after `prefix`:
    [layers, count, length, hidden] (the states a visual token replaces, at its positions)."""
    states: list[list[torch.Tensor]] = [[] for _ in lm.layers]
    n = len(prefix)

    def keep(i: int):  # noqa: ANN202 - a forward pre-hook
        return lambda _module, args: states[i].append(args[0][0, n:].float())

    hooks = [layer.input_layernorm.register_forward_pre_hook(keep(i)) for i, layer in enumerate(lm.layers)]
    try:
        for passage in passages.tolist():
            ids = torch.tensor([prefix + passage])
            positions = torch.arange(ids.shape[1])[None]
            split.forward_text(lm, ids, positions, split.TextCache.empty(lm.config.text, 1, lm.lm_head.weight.dtype))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.stack(s) for s in states])


def ridge_linear(acts: torch.Tensor, targets: torch.Tensor, ridge: float = RIDGE,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) minimising sum_r w_r |acts_r @ weight.T + bias - targets_r|^2 + ridge *
    mean variance * |weight|^2 over rows [..., d] -> [..., hidden] (row weights `weights`
    [...], all 1 if None; the bias is not penalised)."""
    a = acts.reshape(-1, acts.shape[-1]).double()
    t = targets.reshape(-1, targets.shape[-1]).double()
    w = torch.ones(len(a), dtype=a.dtype) if weights is None else weights.reshape(-1).double()
    w = (w / w.sum())[:, None]
    m, mu = (w * a).sum(0), (w * t).sum(0)
    a = a - m
    c = a.T @ (w * a)
    c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    weight = torch.linalg.solve(c, a.T @ (w * (t - mu))).T
    return weight.float(), (mu - weight @ m).float()


@torch.no_grad()
def fit_projectors(lm: SaisaLM, features: torch.Tensor, targets: torch.Tensor,
                   image_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """New `model.layers.{l}.mm_projector.2.{weight,bias}` for features [images, N_v, mm_hidden]
    and targets [layers, images or 1 (one passage for every image), N_v, hidden]
    (`layer_inputs`), each image's rows weighted by `image_weights` [images] (all 1 if None);
    the first linear stays as drawn."""
    images, n = features.shape[:2]
    weights = None if image_weights is None else image_weights[:, None].expand(images, n)
    fitted: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(lm.layers):
        first = cast(nn.Linear, cast(nn.Sequential, layer.mm_projector)[0])
        weight, bias = ridge_linear(F.gelu(first(features.float())), targets[i].expand(images, -1, -1), weights=weights)
        fitted[f"model.layers.{i}.mm_projector.2.weight"] = weight
        fitted[f"model.layers.{i}.mm_projector.2.bias"] = bias
    return fitted
