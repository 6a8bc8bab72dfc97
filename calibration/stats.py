"""Activation statistics and the ranges (amax) that calibration methods pick from them.

Each tapped tensor keeps an exact amax, a histogram of |x| whose range doubles as
larger values arrive (bins merge pairwise, so nothing is re-read), and, where
SmoothQuant needs it, the amax of every channel (last axis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BINS = 2048
METHODS = ("max", "percentile", "entropy", "mse")


@dataclass
class TensorStats:
    channels: bool = False  # keep per-channel amax (SmoothQuant candidates)
    amax: float = 0.0
    top: float = 0.0  # the histogram covers [0, top)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    channel_amax: np.ndarray | None = None
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        a = np.abs(x.astype(np.float32, copy=False)).reshape(-1, x.shape[-1] if x.ndim else 1)
        if a.size == 0:
            return
        peak = float(a.max())
        if not np.isfinite(peak):
            raise FloatingPointError("non-finite activation")
        if self.channels:
            col = a.max(axis=0)
            self.channel_amax = col if self.channel_amax is None else np.maximum(self.channel_amax, col)
        self.amax = max(self.amax, peak)
        if self.top == 0.0:
            self.top = peak if peak > 0 else 1e-8
        while peak >= self.top:
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2)])
            self.top *= 2
        self.hist += np.bincount(np.minimum((a.ravel() * (BINS / self.top)).astype(np.int64), BINS - 1),
                                 minlength=BINS)
        self.count += a.size


def pick_amax(stats: TensorStats, method: str, levels: int, percentile: float = 99.99) -> float:
    """The clipping range for a symmetric quantizer with `levels` steps each side of zero."""
    if stats.amax == 0.0:
        return 1e-8
    if method == "max":
        return stats.amax
    edges = np.linspace(0.0, stats.top, BINS + 1)
    last = int(np.searchsorted(edges, stats.amax, side="left"))  # bins past amax are empty
    hist = stats.hist[:max(last, 1)]
    if method == "percentile":
        cdf = np.cumsum(hist) / hist.sum()
        return float(min(edges[int(np.searchsorted(cdf, percentile / 100)) + 1], stats.amax))
    if method == "mse":
        return _mse(hist, edges, levels, stats.amax)
    if method == "entropy":
        return _entropy(hist, edges, levels, stats.amax)
    raise ValueError(method)


def _candidates(n: int, levels: int) -> np.ndarray:
    start = min(levels, n)
    return np.unique(np.linspace(start, n, num=min(n - start + 1, 128)).astype(np.int64))


def _mse(hist: np.ndarray, edges: np.ndarray, levels: int, amax: float) -> float:
    """The clip that minimises the expected squared error of fake-quantizing bin centres."""
    centres = (edges[:-1] + edges[1:])[:len(hist)] / 2
    best, best_err = amax, np.inf
    for i in _candidates(len(hist), levels):
        clip = float(edges[i])
        step = clip / levels
        q = np.minimum(np.round(centres / step), levels) * step
        err = float(np.sum(hist * (centres - q) ** 2))
        if err < best_err:
            best, best_err = clip, err
    return min(best, amax)


def _entropy(hist: np.ndarray, edges: np.ndarray, levels: int, amax: float) -> float:
    """TensorRT's entropy calibration: the clip whose `levels`-bin quantized histogram
    loses the least information (KL divergence) against the clipped reference."""
    best, best_kl = amax, np.inf
    for i in _candidates(len(hist), levels):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()  # outliers saturate into the last bin
        chunks = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for c in chunks:
            nonzero = hist[c] > 0
            if nonzero.any():
                q[c[nonzero]] = hist[c].sum() / nonzero.sum()
        mask = p > 0
        q = np.where(mask & (q == 0), 1e-4, q)  # smoothed: a saturated bin may have no quantized mass
        ps, qs = p[mask] / p.sum(), q[mask] / q.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best, best_kl = float(edges[i]), kl
    return min(best, amax)


def noise_ratio(stats: TensorStats, amax: float, levels: float) -> float:
    """Quantization noise over signal (RMS) of fake-quantizing the measured |x| with range
    `amax`: how much of a layer's input int8 would lose. A few massive activations
    stretch the range until most values round to zero; this number shows it."""
    if stats.amax == 0.0:
        return 0.0
    centres = (np.arange(BINS) + 0.5) * (stats.top / BINS)
    step = amax / levels
    q = np.minimum(np.round(centres / step), levels) * step
    signal = float(np.sum(stats.hist * centres**2))
    return float(np.sqrt(np.sum(stats.hist * (centres - q) ** 2) / signal)) if signal > 0 else 0.0
