"""Runtime speed on one model, one machine, one run, as JSON.

    python benchmarks/runtime.py --artifact ART [--artifact ART2 ...] [--checkpoint CKPT]

Same prompt and image everywhere, greedy, a fixed number of tokens. Each artifact (a
decoder form, fp32 or weight-only) is measured in interleaved rounds, so every one sees
the same moments of this shared machine:
- decode tokens/s (best and median), and against the first artifact;
- decode against the memory-bandwidth bound: bytes read per token (the decoder's streamed
  weights as its graph stores them + the K/V it attends) over the read bandwidth measured
  now (target: at least 85%);
- time to first token with the image cached against the same question with no image
  (target: at most 1.25x), with and without the text before the image already cached
  (a new session sharing the image cache), and cold against cached with each stage's share;
- with --checkpoint, the PyTorch backend's decode rate and the first artifact's speedup over it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from saisa_edge.artifacts import Artifact, open_artifact
from saisa_edge.backends import Backend, open_model
from saisa_edge.inputs.conversation import get_template
from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
from saisa_edge.runtime.kv import NUMPY_DTYPES
from saisa_edge.runtime.session import Request, Result, Session
from saisa_edge.runtime.visual_cache import VisualCache

QUESTION = "Describe the picture in detail."


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a multi-threaded streaming read of a buffer far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def session(backend: Backend, tokenizer: Any) -> Session:
    cache = VisualCache(backend.config.text, backend.identity, backend.dtype, 2**32)
    return Session(backend, tokenizer, get_template(tokenizer.default_conv_mode()), cache)


def decode_rates(results: list[Result]) -> list[float]:
    return [len(r.tokens[1:]) / (r.timings_ms["decode"] / 1000) for r in results]


def kv_bytes_per_token(backend: Backend, prompt_tokens: int, generated: int) -> float:
    """Average bytes of K/V one decode step reads: visual + text, every layer."""
    t = backend.config.text
    per_position = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * NUMPY_DTYPES[backend.dtype].itemsize
    mean_text = prompt_tokens + generated / 2
    return per_position * (backend.config.num_visual_tokens + mean_text)


STREAMED_BY = {"MatMul", "MatMulNBits", "Transpose"}  # ops whose weight inputs are read whole every step


def streamed_bytes(decoder: Path) -> int:
    """Bytes of the weights a decode step reads whole (every matrix, as stored: fp32 or packed
    codes and scales); the embedding table counts only where the tied lm_head reads it."""
    graph = onnx.load(str(decoder), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in graph.initializer}
    read = {name for node in graph.node if node.op_type in STREAMED_BY for name in node.input if name in sizes}
    return sum(sizes[name] for name in read)


def label(art: Artifact) -> str:
    return f"{art.decoder_form}/{art.precision}"


def ttft(backend: Backend, tok: Any, pixels: Any, repeats: int) -> dict[str, Any]:
    s = session(backend, tok)
    cold = s.generate(Request(QUESTION, pixels, max_new_tokens=1))
    cached = [s.generate(Request(QUESTION, pixels, max_new_tokens=1)) for _ in range(repeats)]
    text_only = [s.generate(Request(QUESTION, None, max_new_tokens=1)) for _ in range(repeats)]
    image_only_cached = [  # a fresh session each time: the image is cached, the prompt text is not
        Session(backend, tok, s.template, s.cache).generate(Request(QUESTION, pixels, max_new_tokens=1))
        for _ in range(repeats)
    ]
    ttft_cached = statistics.median(r.timings_ms["first_token"] for r in cached)
    ttft_text = statistics.median(r.timings_ms["first_token"] for r in text_only)
    ttft_image_only = statistics.median(r.timings_ms["first_token"] for r in image_only_cached)
    stages = ("vision", "visual_kv", "prefill")
    return {
        "cold": round(cold.timings_ms["first_token"], 1), "cached_image": round(ttft_cached, 1),
        "no_image": round(ttft_text, 1), "cached_over_no_image": round(ttft_cached / ttft_text, 3),
        "cached_image_text_not_cached": round(ttft_image_only, 1),
        "cached_image_text_not_cached_over_no_image": round(ttft_image_only / ttft_text, 3),
        "target_cached_over_no_image": 1.25,
        "cold_stage_share": {k: round(cold.timings_ms[k] / cold.timings_ms["first_token"], 3) for k in stages},
        "cached_stage_share": {k: round(statistics.median(r.timings_ms[k] for r in cached) / ttft_cached, 3)
                               for k in stages},
        "visual_cache": [cold.visual_cache, cached[0].visual_cache, image_only_cached[0].visual_cache],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, action="append", required=True,
                    help="an artifact folder (repeat to compare decoder forms or precisions; the first is the base)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="also time the PyTorch backend on this checkpoint")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    artifacts = [open_artifact(a) for a in args.artifact]
    labels = [label(a) for a in artifacts]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--artifact: two folders are both {labels}; give different forms or precisions")
    opened = [open_model(a, "onnxruntime") for a in artifacts]
    backends: dict[str, Backend] = dict(zip(labels, (b for b, _ in opened)))
    tok = opened[0][1]
    if args.checkpoint is not None:
        backends["torch"] = open_model(args.checkpoint, "torch")[0]
    first = opened[0][0]
    pixels = preprocess(load_image(DEMO_IMAGE), first.config.vision)
    report: dict[str, Any] = {"machine": {"threads": torch.get_num_threads()}}
    # a fixed number of tokens: the model must not stop early for the rates to compare
    eos_free = Request(QUESTION, pixels, max_new_tokens=args.tokens, ignore_eos=True)
    sessions = {name: session(b, tok) for name, b in backends.items()}
    for s in sessions.values():
        s.generate(eos_free)  # warm up and cache the image
    runs: dict[str, list[Result]] = {name: [] for name in backends}
    for _ in range(args.repeats):  # interleaved: each round runs every backend once
        for name, s in sessions.items():
            runs[name].append(s.generate(eos_free))
    print("measured decode", file=sys.stderr)
    # this machine is shared: best-of-repeats for both the rates and the bandwidth, so
    # that neither side of a ratio is taken at a noisier moment than the other
    bandwidth = read_bandwidth()
    report["read_gb_per_s"] = round(bandwidth / 1e9, 2)
    base = max(decode_rates(runs[labels[0]]))
    for art, name in zip(artifacts, labels):
        rates = decode_rates(runs[name])
        per_token = streamed_bytes(art.graph("decoder")) + kv_bytes_per_token(
            backends[name], len(runs[name][0].prompt_tokens), len(runs[name][0].tokens))
        bound = bandwidth / per_token
        report[name] = {
            "tokens": len(runs[name][0].tokens), "decode_tokens_per_s": round(max(rates), 2),
            "decode_median": round(statistics.median(rates), 2), "over_first": round(max(rates) / base, 3),
            "bytes_per_token_mb": round(per_token / 1e6, 1), "bound_tokens_per_s": round(bound, 2),
            "fraction_of_bound": round(max(rates) / bound, 3), "target_fraction": 0.85,
            "time_to_first_token_ms": ttft(backends[name], tok, pixels, args.repeats),
        }
    if "torch" in runs:
        rate = max(decode_rates(runs["torch"]))
        report["torch"] = {"decode_tokens_per_s": round(rate, 2), "first_artifact_speedup": round(base / rate, 2),
                           "target_speedup": 2.0}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
