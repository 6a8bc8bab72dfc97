"""The NAAViT kernel against its PyTorch reference, and (on a GPU) its speed.

    TRITON_INTERPRET=1 python -m saisa_edge.plugins.selfcheck --device cpu   # Triton's interpreter
    python -m saisa_edge.plugins.selfcheck --device cuda --timing            # a GPU

`--ptx` runs the plugin's AOT PTX through the CUDA driver instead (a GPU; TensorRT's
argument layout). `--launches FILE` instead launches each case as a TensorRT engine would: with the grid
and extra args that the plugin's `aot_impl` returned for the case's shapes (a JSON list
of {"case", "dtype", "grid", "extra_args"}, as tests/test_trt_plugin_qdp.py writes it).
Prints one JSON object; exits 1 if any case errs beyond its dtype's tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saisa_edge.model.split import PAD_POSITION
from saisa_edge.plugins.naavit_torch import DTYPE_NAMES, launch, naavit_attention, naavit_reference

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    kv_heads: int
    new: int  # T: queries
    past: int  # text keys before them
    visual: int  # N: 0 without an image
    head_dim: int
    image_at: int = 3  # text tokens before the image
    per_row_images: bool = False  # Bv = B (different images) instead of 1 (shared)
    padded: bool = False  # the first row shorter, padded with PAD_POSITION


CASES = (
    Case("prefill with image, MHA", 1, 4, 4, 21, 0, 40, 32),
    Case("decode step with image, GQA 6/2", 2, 6, 2, 1, 30, 40, 24),
    Case("no image", 2, 4, 2, 17, 5, 0, 16),
    Case("ragged tails (T, S, N off the block sizes)", 1, 9, 3, 19, 67, 71, 64),
    Case("batch of different images", 3, 4, 2, 5, 9, 33, 32, per_row_images=True),
    Case("padded batch", 2, 4, 2, 7, 0, 20, 32, padded=True),
    Case("query before the image (sees no visual key)", 1, 2, 1, 4, 0, 16, 16, image_at=8),
)


def inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    b, t, s = case.batch, case.new, case.past + case.new
    vb = b if case.per_row_images else 1

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    q, k, v = rand(b, case.heads, t, case.head_dim), rand(b, case.kv_heads, s, case.head_dim), \
        rand(b, case.kv_heads, s, case.head_dim)
    vk, vv = rand(vb, case.kv_heads, case.visual, case.head_dim), rand(vb, case.kv_heads, case.visual, case.head_dim)
    start = min(case.image_at, s)
    positions = torch.tensor([i if i < start else i + case.visual for i in range(s)])
    kpos = positions.repeat(b, 1)
    if case.image_at >= s:  # every text token precedes the image
        kpos = torch.arange(s).repeat(b, 1)
    if case.padded:
        kpos[0, :2] = PAD_POSITION
    qpos = kpos[:, case.past:].clone()
    vend = torch.full((vb,), start + case.visual)
    return q, k, v, vk, vv, qpos.to(device), kpos.to(device), vend.to(device), 1 / math.sqrt(case.head_dim)


def check(case: Case, dtype: torch.dtype, device: str, kernel: Callable[..., torch.Tensor] = naavit_attention,
          ) -> dict[str, Any]:
    """`kernel` (default: the PyTorch launcher) on `case`, against the reference."""
    args = inputs(case, dtype, device)
    got = kernel(*args).float().cpu()
    want = naavit_reference(*args).float().cpu()
    if case.padded:  # padded queries' outputs are ignored by contract
        got[0, :, :2], want[0, :, :2] = 0, 0
    err = float((got - want).abs().max())
    return {"case": case.name, "dtype": str(dtype).removeprefix("torch."), "max_abs_error": err,
            "tolerance": TOLERANCE[dtype], "ok": err <= TOLERANCE[dtype]}


def _replay(tensorrt_launch: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """The kernel launched with a TensorRT launch's grid and extra args."""
    def run(*args: Any) -> torch.Tensor:
        return launch(args[:8], tensorrt_launch["extra_args"], tuple(tensorrt_launch["grid"]), args[8])
    return run


def _per_call_us(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float]:
    """Microseconds per call two ways: the host clock over eager launches (what a Python
    loop sees, launch overhead included), and CUDA events around one replay of a CUDA graph
    of `repeats` calls (the GPU's own time, as inside a TensorRT engine)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / repeats * 1e6
    side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return eager, start.elapsed_time(end) / repeats * 1e3


def timing(dtype: torch.dtype, repeats: int = 50) -> list[dict[str, Any]]:
    """Kernel against PyTorch's scaled_dot_product_attention on the keys concatenated
    (what a standard attention needs), SmolLM2 and Vicuna-7B layer shapes; host clock and
    CUDA-graph event times (see _per_call_us)."""
    out = []
    for name, heads, kv, d in (("smol 9/3x64", 9, 3, 64), ("vicuna-7b 32/32x128", 32, 32, 128)):
        for phase, t, past in (("prefill", 64, 0), ("decode", 1, 512), ("decode", 1, 4096)):
            case = Case(name, 1, heads, kv, t, past, 576, d)
            args = inputs(case, dtype, "cuda")
            q, k, v, vk, vv = args[:5]

            def sdpa() -> torch.Tensor:
                keys = torch.cat([vk, k], dim=2).repeat_interleave(heads // kv, dim=1)
                values = torch.cat([vv, v], dim=2).repeat_interleave(heads // kv, dim=1)
                return torch.nn.functional.scaled_dot_product_attention(q, keys, values)

            row: dict[str, Any] = {"shape": name, "phase": phase, "queries": t, "text_keys": past + t, "visual": 576}
            for label, fn in (("naavit", lambda: naavit_attention(*args)), ("sdpa_concat", sdpa)):
                eager, graphed = _per_call_us(fn, repeats)
                row[f"{label}_us"], row[f"{label}_graph_us"] = round(eager, 1), round(graphed, 1)
            row["speedup"] = round(row["sdpa_concat_us"] / row["naavit_us"], 2)
            row["speedup_graph"] = round(row["sdpa_concat_graph_us"] / row["naavit_graph_us"], 2)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,fp16", help="Comma list of fp32, fp16, bf16.")
    ap.add_argument("--timing", action="store_true", help="Also time the kernel against SDPA (GPU).")
    ap.add_argument("--launches", help="JSON file of TensorRT launches to replay instead (see above).")
    ap.add_argument("--ptx", action="store_true", help="Run the AOT PTX through the CUDA driver instead (GPU).")
    args = ap.parse_args()
    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    if args.launches:
        by_name = {c.name: c for c in CASES}
        with open(args.launches) as f:
            results = [check(by_name[r["case"]], dtypes[r["dtype"]], args.device, _replay(r)) for r in json.load(f)]
    else:
        kernel: Callable[..., torch.Tensor] = naavit_attention
        if args.ptx:
            from saisa_edge.plugins import ptx_launch  # cuda-python: only where it runs

            kernel = ptx_launch.ptx_attention
        results = [check(c, dtypes[d], args.device, kernel) for d in args.dtypes.split(",") for c in CASES]
    report: dict[str, Any] = {"device": args.device, "cases": results, "passed": all(r["ok"] for r in results),
                              "case_shapes": [asdict(c) for c in CASES]}
    if args.timing:
        report["timing"] = timing(torch.float16)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
