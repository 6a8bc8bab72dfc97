"""Next-token choice: greedy, or temperature with top-k / top-p, reproducible by seed.

Sampling draws from a seeded `numpy.random.Generator` (PCG64): a seed reproduces its
tokens run after run, but draws other tokens than the same seed did when sampling used
a torch.Generator (before the runtime dropped torch). Parameters are checked here, once,
for the library and the CLI alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from saisa_edge.errors import SaisaError

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SaisaError(f"--temperature {self.temperature}: give a finite number >= 0 (0: greedy)")
        if not _integer(self.top_k) or self.top_k < 0:
            raise SaisaError(f"--top-k {self.top_k}: give an integer >= 0 (0: no limit)")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise SaisaError(f"--top-p {self.top_p}: give a number in (0, 1]")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise SaisaError(f"--seed {self.seed}: give an integer from 0 to 2**64-1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_seed(text: str | None) -> int | None:
    """A seed as typed on the command line (`--seed 1e20` is refused, not rounded)."""
    if text is None:
        return None
    try:
        seed = int(text)
    except ValueError:
        raise SaisaError(f"--seed {text}: give an integer from 0 to 2**64-1") from None
    return SamplingParams(seed=seed).seed


def make_generator(params: SamplingParams) -> np.random.Generator:
    return np.random.default_rng(params.seed)


def sample(logits: np.ndarray, params: SamplingParams, gen: np.random.Generator) -> int:
    """Pick a token from logits [vocab]."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.greedy:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k > 0:
        kth = np.partition(scaled, -min(params.top_k, scaled.size))[-min(params.top_k, scaled.size)]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = np.cumsum(sorted_probs) - sorted_probs >= params.top_p
        kept = np.zeros_like(probs)
        kept[order[~drop]] = sorted_probs[~drop]
        probs = kept / kept.sum()
    return int(gen.choice(probs.size, p=probs))
