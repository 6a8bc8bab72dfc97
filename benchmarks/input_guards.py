"""Cost of the input guards, as JSON: the per-tensor weight check (against the mask-based
check it replaced), the manifest's sha256, a whole guarded checkpoint load against the same
load with both guards disabled, and the peak memory of thin images through preprocessing.

    python -m benchmarks.input_guards                   # the tiny preset
    python -m benchmarks.input_guards --smol DIR        # also a smol checkpoint (real sizes)

Each image runs in its own process: peak RSS over the RSS before it (tests/memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from saisa_edge.artifacts import sha256_file
from saisa_edge.checkpoint import loader, tensors
from saisa_edge.checkpoint.presets import tiny, write_checkpoint


def _best(fn: Any, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def weight_check() -> dict[str, Any]:
    """GiB/s of the check on a 108 MiB tensor per dtype, and of `isfinite(t).all()`."""
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.randn(113_246_208 * 8 // torch.finfo(dtype).bits).to(dtype)  # 108 MiB
        gib = t.numel() * t.element_size() / 2**30
        aminmax = _best(lambda: tensors.check_weight(t, "t", Path("f")))
        mask = _best(lambda: bool(torch.isfinite(t).all()))
        out[str(dtype).removeprefix("torch.")] = {"check_gib_s": round(gib / aminmax, 2),
                                                   "isfinite_all_gib_s": round(gib / mask, 2)}
    return out


def sha256_rate() -> float:
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(256 << 20))
        f.flush()
        return round(0.25 / _best(lambda: sha256_file(Path(f.name)), 2), 2)


def load_cost(ckpt: Path) -> dict[str, Any]:
    """Seconds to load with the guards, and with the weight check and the manifest check off."""
    guarded = _best(lambda: loader.load_checkpoint(ckpt), 2)
    with mock.patch.object(tensors, "check_weight", lambda *a: None), \
            mock.patch.object(loader, "verify_manifest", lambda folder: None):
        bare = _best(lambda: loader.load_checkpoint(ckpt), 2)
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20
    return {"folder_mib": round(size, 1), "load_s": round(guarded, 2), "load_without_guards_s": round(bare, 2)}


_IMAGE_CHILD = """import json, sys, time
from saisa_edge.config import VisionConfig
from saisa_edge.inputs.image import load_image, preprocess
from tests.memory import peak_growth_mb
t0 = time.perf_counter()
grew = peak_growth_mb(lambda: preprocess(load_image(sys.argv[1]), VisionConfig()))
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "peak_growth_mib": round(grew, 1)}))
"""


def thin_images() -> dict[str, Any]:
    from tests.imagefiles import png

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in [(1, 20000), (100000, 1), (4000, 3000)]:
            path = Path(tmp) / f"{w}x{h}.png"
            path.write_bytes(png(w, h))
            run = subprocess.run([sys.executable, "-c", _IMAGE_CHILD, str(path)], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(run.stderr)
            out[f"{w}x{h}"] = {"file_bytes": path.stat().st_size, **json.loads(run.stdout)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", type=Path, help="a smol checkpoint folder (make-checkpoint --preset smol)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    report: dict[str, Any] = {"weight_check": weight_check(), "sha256_gib_s": sha256_rate(),
                              "thin_images": thin_images()}
    with tempfile.TemporaryDirectory() as tmp:
        report["load_tiny"] = load_cost(write_checkpoint(tiny(), Path(tmp) / "tiny", dtype="fp32"))
    if args.smol:
        report["load_smol"] = load_cost(args.smol)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
