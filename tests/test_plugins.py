"""The NAAViT kernel (Triton interpreter, AOT PTX), and engine-build logic without TensorRT."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.artifacts import open_artifact
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.plugins import build
from saisa_edge.plugins.aot import PTX_VERSION, RUNTIME_ARGS, compile_naavit, runtime_values
from saisa_edge.targets import TARGETS, by_compute_capability

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_matches_reference_under_the_interpreter():
    """Every case of `selfcheck` (image/no image, GQA, ragged tails, shared and per-row
    images, padding), fp32 and fp16, in a process where Triton interprets on the CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "saisa_edge.plugins.selfcheck", "--device", "cpu",
                           "--dtypes", "fp32,fp16"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    report = json.loads(done.stdout)
    failed = [(r["case"], r["dtype"], r["max_abs_error"]) for r in report["cases"] if not r["ok"]]
    assert done.returncode == 0 and not failed, failed
    assert len(report["cases"]) == 14


@pytest.mark.parametrize("sm, dtype, heads, kv, d", [(87, "fp16", 9, 3, 64), (90, "fp16", 32, 32, 128),
                                                      (87, "fp32", 4, 2, 32), (90, "bf16", 9, 3, 64)])
def test_aot_ptx_for_orin_and_hopper(sm, dtype, heads, kv, d, tmp_path):
    k = compile_naavit(sm, dtype, heads, kv, d, d**-0.5)
    assert k.name == "naavit_attention_kernel"
    assert k.ptx_version == f"{PTX_VERSION // 10}.{PTX_VERSION % 10}"  # JetPack 6 (CUDA 12.6) loads ISA 8.5
    target = re.search(r"^\.target (\S+)", k.ptx, re.M).group(1)
    assert target.startswith(f"sm_{sm}")
    assert k.params == 9 + len(RUNTIME_ARGS) + 2  # 9 tensors, the sizes, Triton's two scratch pointers
    assert 0 < k.shared_bytes <= 48 * 1024  # fits without opting in to large shared memory
    assert f".entry {k.name}" in k.ptx
    ptxas = shutil.which("ptxas")
    if ptxas:  # the CUDA toolkit assembles it for that GPU
        (tmp_path / "k.ptx").write_text(k.ptx)
        arch = target if target.endswith("a") else f"sm_{sm}"
        done = subprocess.run([ptxas, f"-arch={arch}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_runtime_values_are_the_strides_of_contiguous_tensors():
    b, h, kv, t, s, n, d, vb = 2, 6, 2, 5, 11, 7, 16, 2
    q, k, vk = torch.empty(b, h, t, d), torch.empty(b, kv, s, d), torch.empty(vb, kv, n, d)
    qpos, kpos = torch.empty(b, t), torch.empty(b, s)
    expected = [t, s, n, vb, q.stride(0), q.stride(1), k.stride(0), k.stride(1), vk.stride(0), vk.stride(1),
                q.stride(0), q.stride(1), qpos.stride(0), kpos.stride(0)]
    assert runtime_values(h, kv, d, t, s, n, vb) == expected


def test_aot_refuses_bad_heads():
    with pytest.raises(ValueError, match="multiple"):
        compile_naavit(87, "fp16", 9, 2, 64, 0.125)


# --- engine-build logic -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_gqa_dir):
    out = tmp_path_factory.mktemp("plugins") / "art"
    export_artifact(open_checkpoint(tiny_gqa_dir), out, ExportOptions())
    return open_artifact(out)


@pytest.mark.parametrize("requested, variant, version, chosen", [
    ("auto", "custom", "10.16.0", "plugin"), ("auto", "custom", "10.3.0", "decomposed"),
    ("auto", "native", "10.16.0", "native"), ("decomposed", "custom", "10.3.0", "decomposed"),
    ("plugin", "plugin", "10.9.0", "plugin"), ("native", "native", "10.14.1", "native"),
])
def test_attention_modes(requested, variant, version, chosen):
    assert build.resolve_attention(requested, variant, version) == chosen


@pytest.mark.parametrize("requested, variant, version, message", [
    ("plugin", "native", "10.16.0", "has no saisa::NAAViTAttention node"),
    ("plugin", "custom", "10.3.0", "no AOT Python plugins"),
    ("native", "custom", "10.16.0", "export the artifact with --attention native"),
    ("native", "native", "10.13.0", "cannot parse ONNX Attention"),
    ("decomposed", "plugin", "10.16.0", "has no function body"),
    ("fast", "custom", "10.16.0", "choose one of"),
])
def test_attention_mode_refusals(requested, variant, version, message):
    with pytest.raises(SaisaError, match=message):
        build.resolve_attention(requested, variant, version)


def test_profiles_cover_prefill_decode_and_text_only(artifact):
    cfg = artifact.config
    n = cfg.num_visual_tokens
    context = artifact.details["max_context"]
    prefill, decode = build.profiles(artifact, "decoder", 4, context)
    lo, opt, hi = decode.shapes["input_ids"]
    assert lo == (1, 1) and hi == (4, 1)
    assert prefill.shapes["input_ids"][2] == (4, context - n)
    assert decode.shapes["past_key.0"][2] == (4, cfg.text.num_key_value_heads, context - n - 1, cfg.text.head_dim)
    assert prefill.shapes["visual_key.0"][0][2] == 0 and prefill.shapes["visual_key.0"][2][2] == n
    assert set(prefill.shapes) == set(decode.shapes)
    assert len(prefill.shapes) == 4 + 4 * cfg.text.num_hidden_layers
    (vision,) = build.profiles(artifact, "vision", 2, context)
    assert vision.shapes["pixel_values"][2][0] == 2
    with pytest.raises(SaisaError, match="--max-context"):
        build.profiles(artifact, "decoder", 1, n)
    with pytest.raises(SaisaError, match="--max-batch"):
        build.profiles(artifact, "decoder", 0, context)


def test_memory_budget(artifact):
    nano = build.BuildOptions(TARGETS["orin-nano"], max_batch=1)
    build.check_fits(artifact, nano, 10**6, 512)
    with pytest.raises(SaisaError, match="lower --max-batch or --max-context"):
        build.check_fits(artifact, nano, 6 * 2**30, 512)


def test_targets():
    assert by_compute_capability(8, 7).name.startswith("orin") and by_compute_capability(9, 0).name == "h100"
    with pytest.raises(SaisaError, match="no preset for compute capability 7.5"):
        by_compute_capability(7, 5)
    assert all("fp8" not in t.precisions for t in TARGETS.values() if t.is_jetson)


def test_precision_checks_before_a_build(artifact, tmp_path):
    build.check_precision_for(artifact, TARGETS["orin-nx"])
    fp8 = dataclasses.replace(artifact, precision="fp8", details={**artifact.details, "quantization": {
        "recipe": {"precision": "fp8", "target": "h100"}}})
    with pytest.raises(SaisaError, match="--precision fp8.*use --precision int8"):
        build.check_precision_for(fp8, TARGETS["orin-agx"])
    cpu = dataclasses.replace(artifact, precision="int8", details={**artifact.details, "quantization": {
        "recipe": {"precision": "int8", "target": "cpu"}}})
    with pytest.raises(SaisaError, match="calibrated for --target cpu"):
        build.check_precision_for(cpu, TARGETS["h100"])


def test_cli_without_tensorrt(artifact):
    runner = CliRunner()
    pytest.importorskip("saisa_edge.backends.tensorrt")
    from saisa_edge.backends.tensorrt import import_tensorrt

    try:
        import_tensorrt("probe")
        pytest.skip("TensorRT is installed here")
    except SaisaError:
        pass
    result = runner.invoke(main, ["build", str(artifact.path), "-o", "unused"])
    assert result.exit_code == 2 and "TensorRT is not installed" in result.output
    result = runner.invoke(main, ["run", str(artifact.path), "--backend", "tensorrt", "--prompt", "hi"])
    assert result.exit_code == 2 and "not an engine folder" in result.output
    result = runner.invoke(main, ["run", str(artifact.path), "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0  # the rest of the CLI keeps working
