"""SmoothQuant with its alpha chosen per input by measured W8A8 error (int8_sq).

One alpha for every layer (the paper's 0.5) over-smooths some inputs and under-smooths
others: a model's layers differ in how much of the range sits in a few activation
channels. For each input (the group of linears reading it) every alpha of `ALPHAS` is
tried on sampled calibration rows, alpha 0 meaning no smoothing: the activation scaled by
1/s and fake-quantized per tensor (int8, the recipe's range method on the scaled rows),
the weights scaled by s and fake-quantized per output channel, and the alpha whose output
errs least from the float x @ W is kept (AWQ's search, `awq.pick_scale`, with a W8A8
product). The rows are a uniform sample plus the rows holding the largest values (massive
activations: a few tokens' rows that set the ranges). Alpha 0 is a candidate, so an input
is never smoothed where smoothing hurts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from saisa_edge.calibration import qdq
from saisa_edge.calibration.awq import Product, RowSample, pick_scale
from saisa_edge.calibration.recipe import AUTO, Recipe
from saisa_edge.calibration.stats import TensorStats, pick_amax

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # 0: not smoothed


PEAK_ROWS = 16  # rows with the largest |x| kept besides the uniform sample


class RowsAndRanges(RowSample):
    """Pass-1 statistics for a per-input alpha: the histogram and per-channel amax of every
    row (TensorStats: ranges, SmoothQuant's scale), a uniform row sample (RowSample), and
    the `PEAK_ROWS` rows holding the largest values: a model's massive activations sit in
    a few tokens' rows that a uniform sample mostly misses, yet they set the ranges."""

    def __init__(self, peaks: int = PEAK_ROWS) -> None:
        super().__init__()
        self.channels = True
        self.peaks = peaks
        self.peak_rows: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        TensorStats.update(self, x)
        RowSample.update(self, x)
        self.count -= x.size  # counted by both
        a = x.astype(np.float32, copy=False).reshape(-1, x.shape[-1])
        both = a if self.peak_rows is None else np.concatenate([self.peak_rows, a])
        self.peak_rows = both[np.argsort(-np.abs(both).max(axis=1), kind="stable")[:self.peaks]].copy()

    @property
    def sample_rows(self) -> np.ndarray:
        """The rows the searches measure on: the uniform sample and the peak rows."""
        assert self.sample is not None and self.peak_rows is not None
        return np.concatenate([self.sample, self.peak_rows])


def picked_amax(x: np.ndarray, recipe: Recipe) -> float:
    """The activation range the recipe's method picks from x itself."""
    stats = TensorStats()
    stats.update(x)
    return pick_amax(stats, recipe.method, int(recipe.activation_levels), recipe.percentile)


def w8a8(recipe: Recipe, amax: float | None = None) -> Product:
    """x @ W as the Q/DQ graph computes it: activation per tensor (range `amax`, or picked
    from x), weights per output channel, both at the recipe's levels."""

    def product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        step = (picked_amax(x, recipe) if amax is None else amax) / recipe.activation_levels
        scale = qdq.weight_scale(w, recipe)
        return (qdq.int_codes(x, step, recipe.activation_levels) * step) @ (qdq.int_codes(w, scale, recipe.weight_levels) * scale)

    return product


@dataclass(frozen=True)
class Choice:
    scale: np.ndarray  # s per input channel (ones when alpha is 0)
    alpha: float
    errors: dict[float, float]  # mean squared output error per alpha tried


def choose(x: np.ndarray, channel_amax: np.ndarray, weights: list[np.ndarray], recipe: Recipe,
           alphas: tuple[float, ...] = ALPHAS) -> Choice:
    """The alpha of `alphas` (0: no smoothing) whose W8A8 output on the rows `x` errs least."""
    candidates = {a: qdq.smoothquant_scale(channel_amax, weights, a) if a else np.ones(x.shape[1], np.float32)
                  for a in alphas}
    scale, alpha, errors = pick_scale(x, weights, candidates, w8a8(recipe))
    return Choice(scale, alpha, errors)


def weight(init: dict[str, onnx.TensorProto], site: qdq.Site) -> np.ndarray:
    """The site's weight as [in, out], float32."""
    w = numpy_helper.to_array(init[site.weight]).astype(np.float32)
    return w.T if site.transposed else w


def choose_graph(model: onnx.ModelProto, sites: list[qdq.Site], stats: dict[str, TensorStats], recipe: Recipe
                 ) -> dict[str, Choice]:
    """A `Choice` per input of the graph that can be smoothed (a tied head cannot: its weight
    is the embedding too): searched (`recipe.smoothquant` AUTO) or the recipe's one alpha."""
    init = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list[qdq.Site]] = defaultdict(list)
    for site in sites:
        groups[site.activation].append(site)
    chosen = {}
    for act, group in groups.items():
        st = stats[act]
        if any(s.transposed for s in group) or st.channel_amax is None:
            continue
        weights = [weight(init, s) for s in group]
        if recipe.smoothquant == AUTO:
            assert isinstance(st, RowsAndRanges), act
            chosen[act] = choose(st.sample_rows, st.channel_amax, weights, recipe)
        else:
            assert isinstance(recipe.smoothquant, float)
            alpha = recipe.smoothquant
            chosen[act] = Choice(qdq.smoothquant_scale(st.channel_amax, weights, alpha), alpha, {})
    return chosen


def relative_errors(model: onnx.ModelProto, sites: list[qdq.Site], rows: dict[str, np.ndarray],
                    amax: dict[str, float], recipe: Recipe) -> dict[str, float]:
    """Per site (by node): ||Q(x) @ Q(W) - x @ W|| / ||x @ W|| on the rows `rows`
    (by the activation the site reads now, smoothed where it is), at the ranges `amax`
    the Q/DQ graph will use: how much of its output a layer loses to W8A8."""
    init = {t.name: t for t in model.graph.initializer}
    errors = {}
    for site in sites:
        x, w = rows[site.activation], weight(init, site)
        ref = x @ w
        err = w8a8(recipe, amax[site.activation])(x, w) - ref
        errors[site.node] = float(np.linalg.norm(err) / max(float(np.linalg.norm(ref)), 1e-12))
    return errors
