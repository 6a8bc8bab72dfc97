"""The projector fit: what `ridge_linear` promises on synthetic data, and the identity the
fit relies on (a layer's input hidden states fed as the image reproduce the plain model)."""

from __future__ import annotations

import copy

import torch

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.checkpoint import fit_projectors as fit
from saisa_edge.model.equivalence import _Fixed, split_prefill


def test_ridge_linear_recovers_an_affine_map():
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 300, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    targets = acts @ weight.T + 5
    w, b = fit.ridge_linear(acts, targets, ridge=1e-9)
    torch.testing.assert_close(w.double(), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.double(), torch.full((8,), 5.0, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    shrunk, _ = fit.ridge_linear(acts, targets, ridge=1.0)  # the ridge pulls the weight towards 0
    assert 0.3 < float(shrunk.norm() / w.norm()) < 0.7


def test_ridge_row_weights_count_as_repeated_rows():
    """A row of weight 3 pulls the fit as three copies of it would: the smol fit weighs the demo
    image's rows above the other fit images'."""
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(2, 50, 6, generator=gen, dtype=torch.float64)
    targets = torch.randn(2, 50, 4, generator=gen, dtype=torch.float64)
    weights = torch.tensor([3.0, 1.0])[:, None].expand(2, 50)
    w, b = fit.ridge_linear(acts, targets, ridge=0.1, weights=weights)
    rw, rb = fit.ridge_linear(torch.cat([acts[0]] * 3 + [acts[1]]), torch.cat([targets[0]] * 3 + [targets[1]]), ridge=0.1)
    torch.testing.assert_close((w, b), (rw, rb))
    plain, _ = fit.ridge_linear(acts, targets, ridge=0.1)
    assert float((w - plain).norm()) > 1e-3


def test_text_passages_are_windows_closed_by_the_end_tokens():
    assert fit.text_passages([1, 2, 3], 2, 4, [9]).tolist() == [[1, 2, 3, 9], [1, 2, 3, 9]]
    assert fit.text_passages([1, 2, 3, 4, 5], 2, 3, [9]).tolist() == [[1, 2, 9], [3, 4, 9]]


def test_layer_inputs_as_the_image_reproduce_the_plain_model(tiny_ckpt):
    """If P_l(F) equals the layer inputs of a passage, the text after the image sees exactly
    the plain model's K/V for it: same logits as with the passage inline."""
    lm = copy.deepcopy(tiny_ckpt.lm)
    before, passage, after = [1, 40, 41], [50, 51, 52, 53, 54], [60, 61, 62]
    states = fit.layer_inputs(lm, before, torch.tensor([passage]))
    assert states.shape == (lm.config.text.num_hidden_layers, 1, len(passage), lm.config.text.hidden_size)
    features = torch.randn(1, len(passage), lm.config.mm.mm_hidden_size)
    fitted = fit.fit_projectors(lm, features, states)
    lm.load_state_dict(fitted, strict=False)
    # the ridge cannot make a fit on 5 rows exact: check the identity on the fitted states themselves
    for layer, target in zip(lm.layers, states):
        with torch.no_grad():
            out = layer.mm_projector(features)
        assert float((out - target).norm() / target.norm()) < 0.5  # the fit moves P_l onto the states
        layer.mm_projector = _Fixed(target[0])
    logits = split_prefill(lm, before + [IMAGE_TOKEN_INDEX] + after, features)[0]
    plain = split_prefill(lm, before + passage + after, None)[0]
    keep = list(range(len(before))) + list(range(len(before) + len(passage), len(before + passage + after)))
    torch.testing.assert_close(logits, plain[keep], atol=1e-5, rtol=1e-5)


def test_fitted_projectors_keep_images_apart(tiny_ckpt):
    lm = copy.deepcopy(tiny_ckpt.lm)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 20, lm.config.mm.mm_hidden_size, generator=gen)
    targets = torch.randn(lm.config.text.num_hidden_layers, 3, 20, lm.config.text.hidden_size, generator=gen)
    lm.load_state_dict(fit.fit_projectors(lm, features, targets), strict=False)
    with torch.no_grad():
        out = lm.layers[0].mm_projector(features)
    assert float((out[0] - out[1]).norm() / out[0].norm()) > 0.1
