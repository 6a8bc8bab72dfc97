"""Speed of a model source, SAISA against the LLaVA-1.5 layout on the same backbone.

SAISA runs through the real runtime (Session, visual cache): time to first token for a
new image (cold) and a cached one, the vision and visual-K/V stages, prefill and decode
rates, across prompt lengths and batch sizes. The baseline runs the same backend with
the image's N visual tokens going through every decoder layer as LLaVA-1.5 does: N
extra tokens in the prefill, and a text cache N longer while decoding. Its vision stage
is the same graph, timed again; its outputs are not meaningful, its cost is (one
projector aside, under 1% of LLaVA's prefill).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from saisa_edge.backends import Backend
from saisa_edge.inputs.conversation import Template
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.runtime.kv import TextCache
from saisa_edge.runtime.session import Request, Session
from saisa_edge.runtime.visual_cache import VisualCache

STAGES = ("vision", "visual_kv", "prefill")  # what a first token waits for
WORDS = "describe the colours shapes and objects you can see in this picture with care".split()


@dataclass
class Point:
    layout: str  # saisa or llava-1.5
    prompt_tokens: int
    batch: int
    ttft_cold_ms: float
    ttft_cached_ms: float | None  # SAISA only
    vision_ms: float
    visual_kv_ms: float
    prefill_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    stages_cold_ms: dict[str, float] = field(default_factory=dict)


def _question(tokenizer: PromptTokenizer, tokens: int) -> str:
    """A question of about `tokens` tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words.append(WORDS[len(words) % len(WORDS)])
    return " ".join(words)


def _best(runs: list[dict[str, float]], key: str) -> float:
    return min(r[key] for r in runs)


def _saisa(backend: Backend, tokenizer: PromptTokenizer, template: Template, pixels: np.ndarray, text: int,
           batch: int, decode: int, repeats: int) -> tuple[Point, int]:
    question = _question(tokenizer, text)
    requests = [Request(question, pixels, max_new_tokens=decode + 1)] * batch
    cold, cached = [], []
    cache_bytes = 0
    for _ in range(repeats):
        cache = VisualCache(backend.config.text, backend.identity, backend.dtype, 2**40)
        session = Session(backend, tokenizer, template, cache)
        cold.append(session.generate_batch(requests)[0])
        cached.append(session.generate_batch(requests)[0])
        cache_bytes = cache.nbytes
    c = [r.timings_ms for r in cold]
    h = [r.timings_ms for r in cached]
    prompt = len(cold[0].prompt_tokens) - 1  # the image marker is not a token
    steps = max(len(cold[0].tokens) - 1, 1)
    point = Point("saisa", prompt, batch, _best(c, "first_token"), _best(h, "first_token"), _best(c, "vision"),
                  _best(c, "visual_kv"), _best(h, "prefill"), batch * prompt / (_best(h, "prefill") / 1000),
                  batch * steps / (_best(h, "decode") / 1000),
                  {k: _best(c, k) for k in STAGES})
    return point, cache_bytes


def _llava(backend: Backend, pixels: np.ndarray, prompt: int, batch: int, decode: int, repeats: int) -> Point:
    cfg = backend.config
    n = cfg.num_visual_tokens + prompt
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.vision(np.broadcast_to(pixels[None], (batch, *pixels.shape)))
        vision = time.perf_counter() - t0
        ids = np.zeros((batch, n), dtype=np.int64)
        pos = np.tile(np.arange(n, dtype=np.int64), (batch, 1))
        t1 = time.perf_counter()
        logits, cache = backend.forward(ids, pos, TextCache.empty(cfg.text, batch, backend.dtype), None)
        prefill = time.perf_counter() - t1
        first = time.perf_counter() - t0
        t2 = time.perf_counter()
        for step in range(decode):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            logits, cache = backend.forward(token, np.full((batch, 1), n + step, dtype=np.int64), cache, None)
        runs.append({"vision": vision * 1000, "prefill": prefill * 1000, "first": first * 1000,
                     "decode": (time.perf_counter() - t2) * 1000})
    return Point("llava-1.5", prompt, batch, _best(runs, "first"), None, _best(runs, "vision"), 0.0,
                 _best(runs, "prefill"), batch * n / (_best(runs, "prefill") / 1000),
                 batch * decode / (_best(runs, "decode") / 1000),
                 {"vision": _best(runs, "vision"), "visual_kv": 0.0, "prefill": _best(runs, "prefill")})


def bench(backend: Backend, tokenizer: PromptTokenizer, template: Template, pixels: np.ndarray,
          prompt_lengths: tuple[int, ...], batches: tuple[int, ...], decode: int, repeats: int,
          progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    points: list[Point] = []
    cache_bytes = 0
    for text in prompt_lengths:
        for batch in batches:
            progress(f"prompt {text} tokens, batch {batch}")
            point, cache_bytes = _saisa(backend, tokenizer, template, pixels, text, batch, decode, repeats)
            points += [point, _llava(backend, pixels, point.prompt_tokens, batch, decode, repeats)]
    pairs = [(a, b) for a, b in zip(points[::2], points[1::2])]
    return {
        "backend": backend.name, "dtype": backend.dtype, "threads": os.cpu_count(), "decode_tokens": decode,
        "repeats": repeats,
        "visual_tokens": backend.config.num_visual_tokens,
        "visual_cache_bytes_per_image": cache_bytes,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "points": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(p).items()} for p in points],
        "saisa_over_llava": [{
            "prompt_tokens": a.prompt_tokens, "batch": a.batch,
            "ttft_cold": round(a.ttft_cold_ms / b.ttft_cold_ms, 3),
            "ttft_cached": round((a.ttft_cached_ms or 0.0) / b.ttft_cold_ms, 3),
            "decode_speedup": round(a.decode_tokens_per_s / b.decode_tokens_per_s, 3),
        } for a, b in pairs],
        "median_decode_speedup": round(statistics.median(
            a.decode_tokens_per_s / b.decode_tokens_per_s for a, b in pairs), 3),
    }


def table(report: dict[str, Any]) -> str:
    """The report as the `bench` command prints it."""
    rows = [f"{'layout':<10} {'prompt':>6} {'batch':>5} {'ttft cold':>10} {'cached':>8} {'vision':>8} "
            f"{'vis kv':>7} {'prefill/s':>10} {'decode/s':>9}"]
    for p in report["points"]:
        cached = f"{p['ttft_cached_ms']:8.1f}" if p["ttft_cached_ms"] is not None else f"{'-':>8}"
        rows.append(f"{p['layout']:<10} {p['prompt_tokens']:6d} {p['batch']:5d} {p['ttft_cold_ms']:10.1f} {cached} "
                    f"{p['vision_ms']:8.1f} {p['visual_kv_ms']:7.1f} {p['prefill_tokens_per_s']:10.1f} "
                    f"{p['decode_tokens_per_s']:9.1f}")
    rows.append(f"visual cache {report['visual_cache_bytes_per_image'] / 2**20:.1f} MiB per image; "
                f"peak RSS {report['peak_rss_mib']:.0f} MiB; median decode speed-up over LLaVA-1.5 "
                f"{report['median_decode_speedup']}x")
    return "\n".join(rows)


def plot(report: dict[str, Any], path: str) -> None:
    """Stacked time-to-first-token stages per prompt length (batch 1): SAISA cold, SAISA
    cached, LLaVA-1.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in report["points"] if p["batch"] == min(q["batch"] for q in report["points"])]
    labels, stacks = [], []
    for p in rows:
        s = p["stages_cold_ms"]
        if p["layout"] == "saisa":
            labels += [f"SAISA cold\n{p['prompt_tokens']} tok", f"SAISA cached\n{p['prompt_tokens']} tok"]
            stacks += [s, {"vision": 0.0, "visual_kv": 0.0, "prefill": p["ttft_cached_ms"]}]
        else:
            labels.append(f"LLaVA-1.5\n{p['prompt_tokens']} tok")
            stacks.append(s)
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4))
    bottom = [0.0] * len(labels)
    for stage in STAGES:
        values = [s[stage] for s in stacks]
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{report['backend']} {report['dtype']}, {report['threads']} threads: stage breakdown")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
