"""The device runtime imports neither torch nor onnx nor the exporter: `saisa-edge run` on an
ONNX artifact, with those made unimportable, gives the tokens it gives with them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.export.artifact import ExportOptions, export_artifact
from tests.conftest import DEMO_IMAGE

BLOCKED = (
    "torch",
    "onnx",
    "saisa_edge.export",
    "transformers",
)
ROOT = Path(__file__).resolve().parents[1]

# `None` in sys.modules makes `import X` raise ImportError and `importlib.util.find_spec(X)`
# answer None, exactly as when X is not installed (libraries that probe for torch see no torch).
_WRAPPER = """import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = ["saisa-edge", *sys.argv[1:]]
runpy.run_module("saisa_edge", run_name="__main__")
"""


def _cli(args: list[str], blocked: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WRAPPER.format(blocked=blocked), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("torch-free") / "tiny"
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    return out


def test_the_blocker_blocks():
    probe = _cli(["--help"], BLOCKED)
    assert probe.returncode == 0, probe.stderr
    for module in ("torch", "onnx", "saisa_edge.export.graphs"):
        code = _WRAPPER.format(blocked=BLOCKED).split("sys.argv")[0] + f"import {module}\n"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, proc.stderr


def test_help_needs_no_torch():
    blocked, normal = _cli(["--help"], BLOCKED), _cli(["--help"], ())
    assert blocked.returncode == 0, blocked.stderr
    assert blocked.stdout == normal.stdout and "run" in blocked.stdout


@pytest.mark.parametrize("image", [False, True])
def test_run_needs_no_torch_and_gives_the_same_tokens(artifact, image):
    args = ["run", str(artifact), "--prompt", "What is shown?", "--max-new-tokens", "12", "--json"]
    if image:
        args += ["--image", str(DEMO_IMAGE)]
    blocked, normal = _cli(args, BLOCKED), _cli(args, ())
    assert blocked.returncode == 0, blocked.stderr
    assert normal.returncode == 0, normal.stderr
    a, b = json.loads(blocked.stdout), json.loads(normal.stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) > 0
    assert a["prompt_tokens"] == b["prompt_tokens"] and a["visual_cache"] == ("miss" if image else "none")
