"""Seeded random mutations of an artifact's manifest, run end to end through `saisa-edge run`.

Every outcome must be exit 0 with the unmutated artifact's tokens, or exit 2 with one line
on stderr; never a traceback, and never a hang (each case has a wall-clock bound).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from saisa_edge.artifacts import MANIFEST_NAME
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.export.artifact import ExportOptions, export_artifact
from tests.conftest import DEMO_IMAGE

CASE_SECONDS = 60  # far above a case's few hundred milliseconds: only a hang reaches it
# Fields that are the artifact's own instructions for preprocessing and prompting: a valid
# new value there legitimately changes the answer (the graphs cannot contradict them).
CHANGES_THE_ANSWER = {("details", "conv_mode"), ("details", "config", "text", "eos_token_ids"),
                      ("details", "config", "vision", "image_mean"), ("details", "config", "vision", "image_std"),
                      ("details", "config", "vision", "resize_shortest_edge"),
                      ("details", "config", "mm", "image_aspect_ratio")}
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**31, 10**30, 1e308, math.nan, math.inf, "", "x",
                         "../../other/visual_kv.onnx", "/etc/passwd", [], {}, [1, 2], {"zz": 1}]


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "art"
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    return out


def _run(folder: Path) -> Any:
    args = ["run", str(folder), "--image", str(DEMO_IMAGE), "--prompt", "What is shown?", "--max-new-tokens", "3",
            "--json"]

    def hang(*_: Any) -> None:
        raise TimeoutError(f"a case ran past {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        return CliRunner().invoke(main, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _pick(rng: random.Random, node: Any) -> tuple[Any, ...]:
    """A random path into the JSON tree: each level stops here with some chance, else descends."""
    path: tuple[Any, ...] = ()
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.8):
        key = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
        path, node = path + (key,), node[key]
    return path


def _mutate(rng: random.Random, manifest: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    path = _pick(rng, manifest)
    parent: Any = manifest
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    op = rng.choice(["delete", "odd", "near", "extra"])
    if op == "delete":
        del parent[path[-1]]
    elif op == "extra" and isinstance(value, dict):
        value["zz_extra"] = 1
    elif op == "near" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[path[-1]] = rng.choice([value + 1, value - 1, value * 2, -value, value / 2])
    elif op == "near" and isinstance(value, str):
        parent[path[-1]] = rng.choice([value + "x", value.upper(), value[:-1], "../" + value])
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return path, op


def _check(r: Any, baseline: list[int], path: tuple[Any, ...], what: str) -> None:
    assert r.exception is None or isinstance(r.exception, SystemExit), (what, r.output, r.exc_info)
    if r.exit_code == 0:
        if not any(path[:n] in CHANGES_THE_ANSWER for n in range(1, len(path) + 1)):
            assert json.loads(r.stdout)["tokens"] == baseline, what
        return
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, r.output)


def _fuzz(art: Path, tmp_path: Path, seeds: range) -> None:
    base = _run(art)
    assert base.exit_code == 0, base.output
    baseline = json.loads(base.stdout)["tokens"]
    original = (art / MANIFEST_NAME).read_text()
    for seed in seeds:
        rng = random.Random(seed)
        folder = Path(shutil.copytree(art, tmp_path / f"case{seed}"))
        if rng.random() < 0.15:  # damage the text itself
            cut = rng.randrange(len(original))
            text = original[:cut] + rng.choice(["", "}", "\"", "\\", "\0", "9" * 5000]) + original[cut + 1:]
            path, what = ("<text>",), f"seed {seed}: text damaged at {cut}"
        else:
            manifest = json.loads(original)
            path, op = _mutate(rng, manifest)
            text, what = json.dumps(manifest), f"seed {seed}: {op} at {'/'.join(map(str, path))}"
        (folder / MANIFEST_NAME).write_text(text)
        _check(_run(folder), baseline, path, what)
        shutil.rmtree(folder)


def test_manifest_fuzz(art, tmp_path):
    _fuzz(art, tmp_path, range(40))


@pytest.mark.slow
def test_manifest_fuzz_long(art, tmp_path):
    _fuzz(art, tmp_path, range(40, 400))
