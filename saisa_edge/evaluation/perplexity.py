"""Perplexity over held-out real prose: the docstrings of standard-library modules.

They ship with every Python, are English prose about code (close to what a chat model
reads), and nothing here calibrates on them. The set is fixed (`MODULES`); their text
varies a little between Python versions, so a report carries the text's sha256 and
perplexities are compared only within one report (candidate against reference).
The text is tokenised once (BOS first when the tokenizer has one), cut into chunks of
`context` tokens, and each chunk is scored teacher-forced from an empty cache.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass

import numpy as np

from saisa_edge.backends import Backend
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.runtime.kv import TextCache

# Prose-heavy docstrings (no regex or command tables), in this order, blank-line separated
MODULES = ("argparse", "heapq", "statistics", "csv", "pydoc", "unittest", "sched", "json", "copy", "itertools",
           "subprocess", "ast", "inspect", "doctest", "typing", "difflib", "smtplib", "ftplib", "random", "tokenize")
CONTEXT = 256
CHUNKS = 16


def corpus() -> str:
    return "\n\n".join((importlib.import_module(m).__doc__ or "").strip() for m in MODULES)


@dataclass(frozen=True)
class Chunks:
    ids: list[list[int]]  # each `context` tokens long
    sha256: str  # of the text

    @classmethod
    def of(cls, tokenizer: PromptTokenizer, context: int = CONTEXT, chunks: int = CHUNKS,
           text: str | None = None) -> "Chunks":
        """The first `chunks` whole chunks of `text` (default: this module's held-out corpus)."""
        text = corpus() if text is None else text
        ids = tokenizer.tokenize(text)
        cut = [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)][:chunks]
        return cls(cut, hashlib.sha256(text.encode()).hexdigest())


def _logits(backend: Backend, chunk: list[int]) -> np.ndarray:
    ids = np.asarray([chunk], dtype=np.int64)
    logits, _ = backend.forward(ids, np.arange(len(chunk), dtype=np.int64)[None],
                                TextCache.empty(backend.config.text, 1, backend.dtype), None)
    return logits[0, :-1].astype(np.float64)


def _nll(z: np.ndarray, chunk: list[int]) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))
    return log_norm - z[np.arange(len(chunk) - 1), chunk[1:]]


def negative_log_likelihoods(backend: Backend, chunk: list[int]) -> np.ndarray:
    """-log p(token t+1 | tokens <= t) for every position of `chunk` but the last (float64)."""
    return _nll(_logits(backend, chunk), chunk)


@dataclass(frozen=True)
class ProseScore:
    """One backend teacher-forced over the chunks: its perplexity, and its argmax at every
    position. Compared with the reference's, the argmaxes give a top-1 agreement over
    thousands of positions (16 x 255 by default), where `validate`'s prompts give about 175."""
    perplexity: float
    top: np.ndarray  # int64 [positions]


def score(backend: Backend, chunks: Chunks) -> ProseScore:
    nll, top = [], []
    for chunk in chunks.ids:
        z = _logits(backend, chunk)
        nll.append(_nll(z, chunk))
        top.append(z.argmax(axis=-1))
    return ProseScore(float(math.exp(np.concatenate(nll).mean())), np.concatenate(top))


def perplexity(backend: Backend, chunks: Chunks) -> float:
    return score(backend, chunks).perplexity
