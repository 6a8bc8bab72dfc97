"""Quantized artifacts against their float source on ONNX Runtime (CPU), one run, as JSON.

    python -m benchmarks.quantized --float artifacts/smol --quantized artifacts/smol-int8 [...]

Decode tokens/s and prefill time (greedy, same image and question, a fixed token count,
best of repeats on every side, interleaved so no side gets a quieter moment), the graph
files' sizes, and the visual K/V cache's memory per image by storage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.runtime import QUESTION, decode_rates, session
from saisa_edge.artifacts import open_artifact
from saisa_edge.backends import open_model
from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
from saisa_edge.runtime.kv_storage import STORAGES, pack
from saisa_edge.runtime.session import Request


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if ".onnx" in f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--float", dest="base", type=Path, required=True)
    ap.add_argument("--quantized", type=Path, nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    sources = [args.base, *args.quantized]
    opened = {p: open_artifact(p) for p in sources}  # each folder read and hashed once
    models = {p: open_model(opened[p], "onnxruntime") for p in sources}
    pixels = preprocess(load_image(DEMO_IMAGE), models[args.base][0].config.vision)
    request = Request(QUESTION, pixels, max_new_tokens=args.tokens, ignore_eos=True)  # every format decodes as many
    sessions = {p: session(*models[p]) for p in sources}
    for s in sessions.values():
        s.generate(request)  # warm up, cache the image
    rates: dict[Path, list[float]] = {p: [] for p in sources}
    prefill: dict[Path, list[float]] = {p: [] for p in sources}
    for i in range(args.repeats):
        for p in sources:
            result = sessions[p].generate(request)
            rates[p] += decode_rates([result])
            prefill[p].append(result.timings_ms["prefill"])
        print(f"round {i + 1}/{args.repeats}", file=sys.stderr)
    base, base_prefill = max(rates[args.base]), min(prefill[args.base])
    report: dict[str, Any] = {"machine": {"threads": torch.get_num_threads()}, "tokens": args.tokens, "artifacts": {}}
    for p in sources:
        report["artifacts"][str(p)] = {
            "precision": opened[p].precision,
            "form": (opened[p].details.get("quantization") or {}).get("recipe", {}).get("form"),
            "decoder_form": opened[p].decoder_form,
            "decode_tokens_per_s": round(max(rates[p]), 2), "speedup_over_float": round(max(rates[p]) / base, 2),
            "prefill_ms": round(min(prefill[p]), 1), "prefill_speedup": round(base_prefill / min(prefill[p]), 2),
            "graphs_bytes": _bytes(p), "graphs_mib": round(_bytes(p) / 2**20, 1),
        }
    backend = models[args.base][0]
    kv = backend.visual_kv(backend.vision(pixels[None]), 0)
    native = pack(kv, "native").nbytes
    report["visual_cache_bytes_per_image"] = {
        s: {"bytes": pack(kv, s).nbytes, "fraction_of_native": round(pack(kv, s).nbytes / native, 3)} for s in STORAGES}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
