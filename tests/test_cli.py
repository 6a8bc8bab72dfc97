"""The `saisa-edge` command: happy paths, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from saisa_edge import __version__
from saisa_edge.cli import main
from tests.conftest import DEMO_IMAGE


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0 and "make-checkpoint" in r.output and "run" in r.output
    assert invoke("--version").output.strip() == f"saisa-edge, version {__version__}"


def test_make_checkpoint_then_run_json(tmp_path):
    out = tmp_path / "tiny"
    r = invoke("make-checkpoint", "--preset", "tiny", "-o", out, "--shard-mb", "0.2", "--format", "bin")
    assert r.exit_code == 0, r.output
    assert (out / "pytorch_model.bin.index.json").exists() and (out / "clip-vision-tower" / "config.json").exists()
    r = invoke("run", out, "--image", DEMO_IMAGE, "--prompt", "What is shown?", "--max-new-tokens", "5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["backend"] == "torch" and data["visual_cache"] == "miss" and data["conv_mode"] == "vicuna_v1"
    assert data["prompt_tokens"].count(-200) == 1 and len(data["tokens"]) == 5
    assert set(data["timings_ms"]) >= {"load", "vision", "visual_kv", "prefill", "first_token", "decode", "total"}
    assert isinstance(data["text"], str)


def test_run_streams_text_and_samples_reproducibly(tiny_dir):
    args = ("run", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9",
            "--top-k", "50", "--seed", "3")
    a, b = invoke(*args), invoke(*args)
    assert a.exit_code == 0 and a.stdout == b.stdout and a.stdout.endswith("\n")
    j = json.loads(invoke(*args, "--json").stdout)
    assert j["visual_cache"] == "none" and j["text"] == a.stdout.strip()


def _broken(tmp_path, tiny_dir, how: str):
    ck = tmp_path / "c"
    shutil.copytree(tiny_dir, ck)
    (ck / "saisa-edge-manifest.json").unlink()  # edited by hand: no longer make-checkpoint's folder
    cfg = json.loads((ck / "config.json").read_text())
    if how == "no-weights":
        (ck / "model.safetensors").unlink()
    elif how == "truncated":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[:1000])
    elif how == "projector":
        cfg["mm_projector_type"] = "resampler"
    elif how == "anyres":
        cfg["mm_patch_merge_type"] = "spatial_unpad"
    elif how == "hub":
        cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    elif how == "tower-size":
        tower = json.loads((ck / "clip-vision-tower" / "config.json").read_text())
        tower["hidden_size"] = 32
        (ck / "clip-vision-tower" / "config.json").write_text(json.dumps(tower))
    elif how == "shape":
        cfg["intermediate_size"] = 128
    elif how == "shard":
        index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
        (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


@pytest.mark.parametrize(
    "how, message",
    [
        ("no-weights", "no weights found"),
        ("truncated", "model.safetensors: truncated or corrupt"),
        ("projector", "mm_projector_type 'resampler' is not supported"),
        ("anyres", "not supported yet"),
        ("hub", "pass --vision-tower"),
        ("tower-size", "does not match the projectors' mm_hidden_size"),
        ("shape", "has shape .* but config.json implies"),
        ("shard", "index.json: lists shard model-00002-of-00002.safetensors, which is missing"),
    ],
)
def test_bad_checkpoints(tmp_path, tiny_dir, how, message):
    ck = _broken(tmp_path, tiny_dir, how)
    r = invoke("run", ck, "--image", DEMO_IMAGE, "--prompt", "Hi")
    _one_line_error(r, message)


def _one_line_error(r, message: str):
    import re

    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in r.output, err
    assert re.search(message, err), err


def test_bad_requests(tmp_path, tiny_dir):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _one_line_error(invoke("run", tiny_dir, "--image", broken, "--prompt", "Hi"), f"--image {broken}: cannot decode")
    _one_line_error(invoke("run", tiny_dir, "--prompt", "word " * 3000), "--prompt is too long")
    _one_line_error(invoke("run", tiny_dir, "--prompt", "Hi", "--conv-mode", "alpaca"), "--conv-mode 'alpaca'")
    _one_line_error(invoke("run", tmp_path, "--prompt", "Hi"), "neither a SAISA checkpoint .* nor an artifact folder")
    _one_line_error(invoke("run", tiny_dir, "--prompt", "Hi", "--vision-tower", tmp_path), "--vision-tower .*no config")


def test_make_checkpoint_refuses_existing(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    _one_line_error(invoke("make-checkpoint", "--preset", "tiny", "-o", tmp_path / "x"), "already exists; pass --force")


def test_console_script_one_line_error(tmp_path):
    exe = shutil.which("saisa-edge") or pytest.skip("console script not installed (pip install -e .)")
    r = subprocess.run([exe, "run", str(tmp_path), "--prompt", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    v = subprocess.run([sys.executable, "-m", "saisa_edge", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and __version__ in v.stdout
