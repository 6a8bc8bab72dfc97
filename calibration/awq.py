"""AWQ (Lin et al., 2023): activation-aware scales and clipping for weight-only quantization.

A few input channels carry most of a layer's activation magnitude; their weights matter
most. Scaling weight row j up by s_j = mean|x_j|^alpha (and the activation down by the
same, folded into the RMSNorm before the layer where there is one) gives those rows finer
steps on the quantization grid. alpha is chosen per layer on the calibration activations
by the error of the layer's output, alpha = 0 (no scaling, round to nearest) included, so
the search never does worse than RTN on the data it sees. The clipping search then shrinks
each block's range where that lowers the output error of that block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
from onnx import numpy_helper

from saisa_edge.calibration import qdq
from saisa_edge.calibration.recipe import Recipe
from saisa_edge.calibration.stats import TensorStats
from saisa_edge.calibration.weight_only import WeightQuant, quantize, site_format

SCALE_GRID = 20  # alpha in 0, 0.05, ..., 0.95 (AWQ's grid)
CLIP_GRID = 20
MAX_SHRINK = 0.5  # the clipping search tries ranges down to half of the block's max |w|
ROWS = 1024  # activation rows kept per tensor for the searches


class RowSample(TensorStats):
    """Calibration statistics for AWQ: mean |x| per channel over every row seen, and a
    uniform sample (reservoir) of `ROWS` rows for the output-error searches."""

    def __init__(self, rows: int = ROWS, seed: int = 0):
        super().__init__()
        self.rows = rows
        self.rng = np.random.default_rng(seed)
        self.sample: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.seen = 0

    def update(self, x: np.ndarray) -> None:
        a = x.astype(np.float32, copy=False).reshape(-1, x.shape[-1])
        if a.size == 0:
            return
        if not np.isfinite(a).all():
            raise FloatingPointError("non-finite activation")
        total = np.abs(a).sum(axis=0, dtype=np.float64)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        if self.sample is None:
            self.sample = a[:self.rows].copy()
            start = len(self.sample)
        else:
            room = self.rows - len(self.sample)
            self.sample = np.concatenate([self.sample, a[:max(room, 0)]])
            start = max(room, 0)
        rest = np.arange(start, len(a))  # reservoir: row seen+i replaces a random slot w.p. rows/(seen+i+1)
        slots = self.rng.integers(0, self.seen + rest + 1)
        keep = slots < self.rows
        self.sample[slots[keep]] = a[rest[keep]]
        self.seen += len(a)
        self.count += a.size

    @property
    def mean_abs(self) -> np.ndarray:
        assert self.abs_sum is not None
        return (self.abs_sum / max(self.seen, 1)).astype(np.float32)


Quantizer = Callable[[np.ndarray], WeightQuant]


def search_scale(x: np.ndarray, mean_abs: np.ndarray, weights: list[np.ndarray], quant: Quantizer,
                 grid: int = SCALE_GRID) -> tuple[np.ndarray, float, dict[float, float]]:
    """The per-input-channel scale (s = mean|x|^alpha, normalised) minimising the squared
    error of x @ W over the layers that read `x` (weights [K, N_i]); returns it, its alpha,
    and the error of every alpha tried."""
    base = np.clip(mean_abs, 1e-4, None)
    candidates = {}
    for i in range(grid):
        s = base ** (i / grid)
        candidates[i / grid] = s / np.sqrt(s.max() * s.min())
    return pick_scale(x, weights, candidates, lambda xs, ws: xs @ quant(ws).dequantize())


Product = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pick_scale(x: np.ndarray, weights: list[np.ndarray], candidates: dict[float, np.ndarray], product: Product
               ) -> tuple[np.ndarray, float, dict[float, float]]:
    """Of the per-input-channel scales `candidates` (by alpha), the one whose quantized
    `product(x / s, W * s)` errs least (mean square) from x @ W over the layers reading `x`
    (weights [K, N_i]); returns it, its alpha, and every alpha's error. Shared by AWQ
    (weight-only) and SmoothQuant's per-input alpha (W8A8)."""
    w = np.concatenate(weights, axis=1).astype(np.float32)
    ref = x @ w
    errors: dict[float, float] = {}
    best = (np.inf, 0.0, np.ones(w.shape[0], np.float32))
    for alpha, s in candidates.items():
        err = float(np.mean((product(x / s, w * s[:, None]) - ref) ** 2))
        errors[alpha] = err
        if err < best[0]:
            best = (err, alpha, s.astype(np.float32))
    return best[2], best[1], errors


def search_clip(x: np.ndarray, w: np.ndarray, bits: int, block: int, grid: int = CLIP_GRID,
                max_shrink: float = MAX_SHRINK, asymmetric: bool = False) -> np.ndarray:
    """Per (block of K, output column): the fraction of the block's range, from 1 down to
    1 - max_shrink, whose quantization gives that block's slice of x @ W the least squared error."""
    k, n = w.shape
    blocks = -(-k // block)
    shrink = np.ones((blocks, n), np.float32)
    for g in range(blocks):
        rows = slice(g * block, min((g + 1) * block, k))
        wg, xg = w[rows], x[:, rows]
        best_err = np.full(n, np.inf)
        for i in range(int(grid * max_shrink)):
            cand = np.full((1, n), 1 - i / grid, np.float32)
            err = np.mean((xg @ (wg - quantize(wg, bits, wg.shape[0], cand, asymmetric).dequantize())) ** 2, axis=0)
            better = err < best_err
            best_err[better], shrink[g, better] = err[better], cand[0, better]
    return shrink


def quantize_layer(x: np.ndarray, w: np.ndarray, bits: int, block: int, clip: bool,
                   asymmetric: bool = False) -> WeightQuant:
    """RTN of `w` [K, N], with AWQ's clipping search on `x` when `clip`."""
    shrink = search_clip(x, w, bits, block, asymmetric=asymmetric) if clip else None
    return quantize(w, bits, block, shrink, asymmetric)


def quantize_graph(model: onnx.ModelProto, sites: list[qdq.Site], stats: dict[str, TensorStats], recipe: Recipe
                   ) -> tuple[list[qdq.Site], list[str], dict[str, WeightQuant], dict[str, float]]:
    """Quantize every site's weight (AWQ: search and fold the scales first, with qdq.smooth's
    folding, then search the clipping); returns the sites as they now read their inputs,
    the scaled inputs, the quantization per MatMul and the alpha chosen per scaled input."""
    init = {t.name: t for t in model.graph.initializer}

    def weight(site: qdq.Site) -> np.ndarray:
        w = numpy_helper.to_array(init[site.weight]).astype(np.float32)
        return w.T if site.transposed else w

    def rtn(site: qdq.Site, w: np.ndarray) -> WeightQuant:
        f = site_format(recipe, site, w.shape[0])
        return quantize(w, f.bits, f.block, asymmetric=f.asymmetric)

    if not recipe.awq:
        return sites, [], {s.node: rtn(s, weight(s)) for s in sites}, {}
    groups: dict[str, list[qdq.Site]] = defaultdict(list)
    for site in sites:
        groups[site.activation].append(site)
    scales, alphas = {}, {}
    for act, group in groups.items():
        if any(s.transposed for s in group):
            continue  # a tied head's weight is the embedding too: nothing to fold it into
        st = stats[act]
        assert isinstance(st, RowSample) and st.sample is not None, act
        scale, alpha, _ = search_scale(st.sample, st.mean_abs, [weight(s) for s in group],
                                       partial(rtn, group[0]))  # a group's sites share an input and a format
        if alpha > 0:
            scales[act], alphas[act] = scale, alpha
    new_sites, scaled = qdq.smooth(model, sites, scales)
    quants = {}
    for old, site in zip(sites, new_sites):
        x = getattr(stats[old.activation], "sample")
        if old.activation in scales:
            x = x / scales[old.activation]
        w = weight(site)  # smoothed in place: rows scaled by s
        f = site_format(recipe, site, w.shape[0])
        quants[site.node] = quantize_layer(x, w, f.bits, f.block, clip=True, asymmetric=f.asymmetric)
    return new_sites, scaled, quants, alphas
