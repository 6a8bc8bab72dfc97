"""Start-up cost of the runtime, as JSON: wall time of `saisa-edge --help`, and wall time
and peak RSS of `saisa-edge run` on an artifact folder, text-only and with the demo image.

    python -m benchmarks.startup ARTIFACT [--repeats 5] [--tree SOURCE_TREE] [--without torch,onnx]

Each command runs in a fresh process (`python -m saisa_edge ...`, so the numbers do not
depend on a console script's shebang) with `--tree` as its working directory, so an older
checkout can be measured with the same script; the best of `--repeats` runs is kept, since
the machine may be shared. Peak RSS is the child's own (`ru_maxrss` of the waited process).
`modules` lists which heavy libraries `--help` and `run` import. `--without` makes modules
unimportable in the child (as if not installed: a runtime-only install without the
[export] extra), so that case is measured on a machine that has them.
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

ROOT = Path(__file__).resolve().parents[1]
DEMO_IMAGE = ROOT / "saisa_edge" / "assets" / "demo.png"  # not imported: this process stays small
HEAVY = ("torch", "transformers", "onnx", "saisa_edge.export")
PROMPT = "What is in the picture?"

# Runs the CLI in-process and reports which heavy modules it imported (to stderr, as JSON).
_PROBE = """import json, sys, runpy
for name in {without!r}:
    sys.modules[name] = None
sys.argv = ["saisa-edge", *sys.argv[1:]]
try:
    runpy.run_module("saisa_edge", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("MODULES " + json.dumps(sorted(m for m in {heavy!r} if sys.modules.get(m) is not None)), file=sys.stderr)
sys.exit(code)
"""


def _once(tree: Path, args: list[str], without: tuple[str, ...]) -> dict[str, Any]:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err_file:
        t0 = time.perf_counter()
        probe = _PROBE.format(heavy=HEAVY, without=without)
        proc = subprocess.Popen([sys.executable, "-c", probe, *args], stdout=out, stderr=err_file, cwd=tree, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_file.seek(0)
        err = err_file.read()
    modules = next((json.loads(line[8:]) for line in err.splitlines() if line.startswith("MODULES ")), None)
    if modules is None or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{err[-2000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "modules": modules}


def best(tree: Path, args: list[str], repeats: int, without: tuple[str, ...] = ()) -> dict[str, Any]:
    runs = [_once(tree, args, without) for _ in range(repeats)]
    return {"wall_s": min(r["wall_s"] for r in runs), "peak_rss_mib": min(r["peak_rss_mib"] for r in runs),
            "modules": runs[0]["modules"], "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tree", type=Path, default=ROOT, help="Source tree to measure (default: this one).")
    p.add_argument("--without", default="", help="Comma list of modules made unimportable in the child.")
    a = p.parse_args()
    without = tuple(m for m in a.without.split(",") if m)
    run = ["run", str(a.artifact.resolve()), "--prompt", PROMPT, "--max-new-tokens", "8", "--json"]
    report = {
        "artifact": str(a.artifact), "without": list(without),
        "help": best(a.tree, ["--help"], a.repeats, without),
        "run_text": best(a.tree, run, a.repeats, without),
        "run_image": best(a.tree, [*run, "--image", str(DEMO_IMAGE)], a.repeats, without),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
