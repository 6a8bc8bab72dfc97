"""Export cost and accuracy, as JSON: time, peak RSS and graph sizes of `saisa-edge export`,
and ONNX Runtime's errors against the PyTorch reference.

    python benchmarks/export_cost.py                    # the tiny preset
    python benchmarks/export_cost.py --smol DIR         # also a smol checkpoint

Each export runs in its own process (peak RSS is that process's). Errors: max abs
difference of vision features, every layer's visual K/V, prefill logits and 32
teacher-forced decode steps (fp32); logit cosine and top-1 agreement (fp16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saisa_edge.artifacts import open_artifact
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.checkpoint.presets import tiny, write_checkpoint
from saisa_edge.inputs.conversation import get_template
from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
from saisa_edge.runtime.kv import TextCache, text_layout
from saisa_edge.runtime.session import user_message



# The child reports its own peak RSS; exports run before this process grows, since on
# Linux a child's peak includes what its parent had resident when it was spawned.
_CHILD = """import resource, sys
from saisa_edge.cli import main
try:
    main()
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def timed_export(ckpt: Path, out: Path, dtype: str) -> dict[str, object]:
    cmd = [sys.executable, "-c", _CHILD, "export", str(ckpt), "-o", str(out), "--dtype", dtype, "--force"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    peak = int(run.stderr.strip().splitlines()[-1]) / 2**10  # KiB -> MiB
    sizes = {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(out.iterdir()) if ".onnx" in p.name}
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1), "files_mib": sizes}


def errors(ckpt_dir: Path, artifact: Path) -> dict[str, object]:
    ckpt = load_checkpoint(ckpt_dir)
    ref, ort_b = TorchBackend(ckpt), OrtBackend(open_artifact(artifact))
    pixels = preprocess(load_image(DEMO_IMAGE), ckpt.config.vision)[None]
    feats = ref.vision(pixels)
    tok = ckpt.tokenizer
    ids = tok.encode(get_template(tok.default_conv_mode()).prompt([(user_message("Describe it.", True), None)]))
    text, positions, start = text_layout(ids, feats.shape[1])
    feats_ort = ort_b.vision(pixels)
    vis_ref, vis_ort = ref.visual_kv(feats, start), ort_b.visual_kv(feats_ort, start)

    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())

    out: dict[str, object] = {
        "vision": diff(feats_ort, feats),
        "visual_kv": max(max(diff(a, b) for a, b in zip(vis_ort.keys, vis_ref.keys)),
                         max(diff(a, b) for a, b in zip(vis_ort.values, vis_ref.values))),
    }
    c_ref = TextCache.empty(ckpt.config.text, 1, "fp32")
    c_ort = TextCache.empty(ckpt.config.text, 1, ort_b.dtype)
    step_ids, step_pos = np.array([text], dtype=np.int64), np.array([positions], dtype=np.int64)
    worst, cos, agree, steps = 0.0, 1.0, 0, 0
    for i in range(33):
        l_ref, c_ref = ref.forward(step_ids, step_pos, c_ref, vis_ref)
        l_ort, c_ort = ort_b.forward(step_ids, step_pos, c_ort, vis_ort)
        if i == 0:
            out["prefill_logits"] = diff(l_ort, l_ref)
        worst = max(worst, diff(l_ort, l_ref))
        cos = min(cos, float(torch.nn.functional.cosine_similarity(
            torch.from_numpy(l_ort[0]), torch.from_numpy(l_ref[0]), dim=-1).min()))
        agree += int((l_ort[0].argmax(-1) == l_ref[0].argmax(-1)).sum())
        steps += l_ref.shape[1]
        step_ids, step_pos = l_ref[:, -1:].argmax(-1).astype(np.int64), step_pos[:, -1:] + 1
    out.update(logits_max_abs=worst, logit_cosine_min=cos, top1_agreement=agree / steps,
               logit_scale=float(np.abs(l_ref).max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", type=Path, help="a checkpoint made with `make-checkpoint --preset smol`")
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": {"cpus": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoints = {"tiny": write_checkpoint(tiny(), root / "tiny", dtype="fp32")}
        if args.smol:
            checkpoints["smol"] = args.smol
        runs = [(name, ckpt, dtype) for name, ckpt in checkpoints.items() for dtype in ("fp32", "fp16")]
        exports = {(name, dtype): timed_export(ckpt, root / f"{name}-{dtype}", dtype) for name, ckpt, dtype in runs}
        for name, ckpt, dtype in runs:
            entry = {**exports[name, dtype], "errors": errors(ckpt, root / f"{name}-{dtype}")}
            report.setdefault(name, {})[dtype] = entry
            print(f"measured {name} {dtype}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
