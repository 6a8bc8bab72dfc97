"""Put the smol preset's untrained image path into the text model's own distribution.

No vision weights are reachable, so the projectors cannot carry information about the
image. Left at random, their outputs are nothing SmolLM2's layers ever see (the text
after the image then degenerates into loops). Here each layer's last projector linear
is set so that an image reads, at every layer, like a passage of text: over the bundled
images, P_l(F) gets the mean and covariance of SmolLM2's layer-l inputs on passages of
the bundled calibration prompts placed where the image goes. (Random-token passages,
tried first, leave the model rambling: it does not answer the question after them.) The map is affine in the projector's
hidden activations, so different images still give different visual K/V.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from saisa_edge.model import split
from saisa_edge.model.llama import SaisaLM

BETWEEN_IMAGE_WEIGHT = 8.0
"""How much more the fit weighs variation between images than variation within one.

The random vision tower varies mostly from image to image and little from patch to
patch; matched as one covariance, that would make each image a near-constant
sequence (576 copies of one "word", which SmolLM2 does not answer after). Counting the
between-image part this many times over moves the matched variance onto the patches."""
SHRINK = 1e-3
"""Ridge on the activations' covariance, in units of its mean variance: keeps the
whitening finite in directions the bundled images barely span."""


def text_passages(ids: list[int], count: int, length: int) -> torch.Tensor:
    """[count, length] consecutive windows of the token stream `ids`, repeated as often as needed."""
    stream = ids * -(-count * length // len(ids))
    return torch.tensor(stream[: count * length]).view(count, length)


@torch.no_grad()
def layer_inputs(lm: SaisaLM, prefix: list[int], passages: torch.Tensor) -> torch.Tensor:
    """Each layer's input hidden states at the passages' positions, after `prefix`:
    [layers, count * length, hidden] (the states a visual token replaces, at its positions)."""
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
    return torch.stack([torch.cat(s) for s in states])


def _sqrtm(c: torch.Tensor, power: float) -> torch.Tensor:
    """c ** power for a symmetric positive semi-definite matrix."""
    e, u = torch.linalg.eigh(c)
    return (u * e.clamp_min(1e-9 * float(e.max())).pow(power)) @ u.T


def matching_linear(acts: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the linear taking activations [images, tokens, d] to outputs with
    the targets' [n, hidden] mean and covariance.

    weight = Sigma^(1/2) C^(-1/2), bias = mu - weight m, where m is the activations' mean
    and C = W + BETWEEN_IMAGE_WEIGHT * B their within- plus weighted between-image covariance.
    """
    a = acts.double()
    t = targets.double()
    image_means = a.mean(1)
    within = torch.cov((a - image_means[:, None]).reshape(-1, a.shape[-1]).T)
    between = torch.cov(image_means.T) if a.shape[0] > 1 else torch.zeros_like(within)
    c = within + BETWEEN_IMAGE_WEIGHT * between
    c = c + SHRINK * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    weight = _sqrtm(torch.cov(t.T), 0.5) @ _sqrtm(c, -0.5)
    bias = t.mean(0) - weight @ a.reshape(-1, a.shape[-1]).mean(0)
    return weight.float(), bias.float()


@torch.no_grad()
def fit_projectors(lm: SaisaLM, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """New `model.layers.{l}.mm_projector.2.{weight,bias}` for features [images, N_v, mm_hidden]
    and targets [layers, n, hidden] (`layer_inputs`); the first linear stays as drawn."""
    fitted: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(lm.layers):
        first = cast(nn.Linear, cast(nn.Sequential, layer.mm_projector)[0])
        acts = F.gelu(first(features.float()))
        weight, bias = matching_linear(acts, targets[i])
        fitted[f"model.layers.{i}.mm_projector.2.weight"] = weight
        fitted[f"model.layers.{i}.mm_projector.2.bias"] = bias
    return fitted
