"""The projector fit on synthetic data: what `matching_linear` promises, exactly."""

from __future__ import annotations

import torch

from saisa_edge.checkpoint import fit_projectors as fit


def _weighted_cov(x: torch.Tensor) -> torch.Tensor:
    means = x.mean(1)
    within = torch.cov((x - means[:, None]).reshape(-1, x.shape[-1]).T)
    return within + fit.BETWEEN_IMAGE_WEIGHT * torch.cov(means.T)


def test_matching_linear_gives_the_targets_mean_and_covariance():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.eye(16, dtype=torch.float64) + 0.2 * torch.randn(16, 16, generator=gen, dtype=torch.float64)
    acts = torch.randn(5, 200, 16, generator=gen, dtype=torch.float64) @ mixing  # well conditioned: the ridge is small
    acts = acts + 0.5 * torch.randn(5, 1, 16, generator=gen, dtype=torch.float64)  # images differ as a whole
    targets = 7 + torch.randn(900, 16, generator=gen, dtype=torch.float64) @ torch.randn(16, 16, generator=gen, dtype=torch.float64)
    weight, bias = fit.matching_linear(acts, targets)
    out = acts @ weight.double().T + bias.double()
    torch.testing.assert_close(out.reshape(-1, 16).mean(0), targets.mean(0), atol=1e-4, rtol=1e-4)
    # the covariance it matches weighs between-image variation BETWEEN_IMAGE_WEIGHT times
    want = torch.cov(targets.T)
    assert (_weighted_cov(out) - want).norm() < 0.01 * want.norm()  # the ridge's share
    assert (out[0] - out[1]).abs().mean() > 0.1  # different inputs, different outputs


def test_text_passages_are_windows_of_the_repeated_stream():
    assert fit.text_passages([1, 2, 3], 2, 4).tolist() == [[1, 2, 3, 1], [2, 3, 1, 2]]
