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
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.artifacts import open_artifact
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.plugins import build
from saisa_edge.plugins.aot import DTYPES, PTX_VERSION, check_launchable, compile_naavit
from saisa_edge.plugins.naavit_kernel import MAX_HEAD_DIM, RUNTIME_ARGS, SHARED_LIMIT, runtime_args
from saisa_edge.targets import TARGETS, by_compute_capability

ROOT = Path(__file__).resolve().parents[1]


def selfcheck_interpreted(*args: str) -> tuple[int, dict]:
    """`selfcheck --device cpu ARGS` where Triton interprets: its exit status and report.

    Skips on one known fault of Triton itself: its interpreter up to 3.6 `int()`s the
    one-element array a scalar argument becomes, which numpy 2.5 refuses (later Triton
    squeezes it first); seen on a GPU machine, 2026-11-26."""
    done = subprocess.run([sys.executable, "-m", "saisa_edge.plugins.selfcheck", "--device", "cpu", *args],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
        import numpy
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot take scalar arguments under "
                    f"numpy {numpy.__version__}")
    assert done.returncode in (0, 1) and done.stdout, done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_kernel_matches_reference_under_the_interpreter():
    """Every case of `selfcheck` (image/no image, GQA, ragged tails, shared and per-row
    images, padding), fp32 and fp16, in a process where Triton interprets on the CPU."""
    status, report = selfcheck_interpreted("--dtypes", "fp32,fp16")
    failed = [(r["case"], r["dtype"], r["max_abs_error"]) for r in report["cases"] if not r["ok"]]
    assert status == 0 and not failed, failed
    assert len(report["cases"]) == 14


@pytest.mark.parametrize("sm, dtype, heads, kv, d", [(87, "fp16", 9, 3, 64), (90, "fp16", 32, 32, 128),
                                                      (87, "fp32", 4, 2, 32), (90, "bf16", 9, 3, 64)])
def test_aot_ptx_for_orin_and_hopper(sm, dtype, heads, kv, d, tmp_path):
    k = compile_naavit(sm, dtype, heads, kv, d, d**-0.5)
    assert k.name == "naavit_attention_kernel"
    assert k.ptx_version == f"{PTX_VERSION // 10}.{PTX_VERSION % 10}"  # JetPack 6 (CUDA 12.6) loads ISA 8.5
    target = re.search(r"^\.target (\S+)", k.ptx, re.M).group(1)
    assert target.startswith(f"sm_{sm}")
    # TensorRT's AOT launch: the 8 input pointers, the int32 extra args, the output pointer;
    # then Triton's scratch pointers, which TensorRT does not pass (both size 0, checked at compile)
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", k.ptx, re.S).group(1)
    kinds = re.findall(r"\.param \.(\w+)", entry)
    assert kinds == ["u64"] * 8 + ["u32"] * len(RUNTIME_ARGS) + ["u64"] + ["u64"] * k.hidden_params
    assert k.params == len(kinds) and k.hidden_params == 2
    assert 0 < k.shared_bytes <= SHARED_LIMIT  # fits without opting in to large shared memory
    # all of it dynamic, so the launch's shared_mem (the metadata's size) is what it gets
    assert re.findall(r"^\s*(?:\.extern\s+)?\.shared\b.*$", k.ptx, re.M) == [".extern .shared .align 16 .b8 global_smem[];"]
    assert f".entry {k.name}" in k.ptx
    ptxas = shutil.which("ptxas")
    if ptxas:  # the CUDA toolkit assembles it for that GPU
        (tmp_path / "k.ptx").write_text(k.ptx)
        arch = target if target.endswith("a") else f"sm_{sm}"
        done = subprocess.run([ptxas, f"-arch={arch}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_ptx_launch_arguments_match_the_ptx_parameters():
    """The driver launch of `selfcheck --ptx` passes one value of the PTX's type per parameter."""
    import ctypes

    from saisa_edge.plugins.ptx_launch import kernel_args

    k = compile_naavit(87, "fp16", 9, 3, 64, 0.125)
    values, types = kernel_args(k, list(range(100, 108)), [5, 11, 7, 1], 200)
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", k.ptx, re.S).group(1)
    ptx_types = {"u64": ctypes.c_void_p, "u32": ctypes.c_int32}
    assert [ptx_types[kind] for kind in re.findall(r"\.param \.(\w+)", entry)] == list(types)
    assert values == (*range(100, 108), 5, 11, 7, 1, 200, 0, 0)


@pytest.mark.gpu
def test_aot_ptx_runs_through_the_cuda_driver():
    """The PTX for this GPU, loaded by the driver and launched with TensorRT's layout."""
    done = subprocess.run([sys.executable, "-m", "saisa_edge.plugins.selfcheck", "--device", "cuda", "--ptx",
                           "--dtypes", "fp32,fp16,bf16"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _block_d_head_sizes():
    """One head size per BLOCK_D (16 ... MAX_HEAD_DIM): the compiled variants differ by it."""
    sizes, d = [], 16
    while d <= MAX_HEAD_DIM:
        sizes.append(d)
        d *= 2
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("sm", sorted({t.compute_capability[0] * 10 + t.compute_capability[1]
                                       for t in TARGETS.values() if t.compute_capability}))
@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_memory_of_every_variant(sm, dtype):
    """Every (GPU of a target, dtype, BLOCK_D) variant fits 48 KiB of shared memory,
    read from the compiled kernel's metadata (heads and scale do not change the tiles)."""
    for d in _block_d_head_sizes():
        k = compile_naavit(sm, dtype, 2, 1, d, d**-0.5)
        assert 0 < k.shared_bytes <= SHARED_LIMIT, (sm, dtype, d, k.shared_bytes)


def test_launch_checks_refuse_scratch_memory_and_large_shared_memory():
    """TensorRT passes no pointers for Triton's scratch buffers, and its launch gets 48 KiB."""
    ptx = ".entry k(\n.param .u64 a,\n.param .u32 b,\n.param .u64 c,\n.param .u64 d\n)"
    ok = SimpleNamespace(name="k", shared=SHARED_LIMIT, global_scratch_size=0, profile_scratch_size=0)
    assert check_launchable(ok, ptx, 2) == (4, 2)
    with pytest.raises(RuntimeError, match="scratch memory"):
        check_launchable(SimpleNamespace(**{**vars(ok), "global_scratch_size": 256}), ptx, 2)
    with pytest.raises(RuntimeError, match="scratch memory"):
        check_launchable(SimpleNamespace(**{**vars(ok), "profile_scratch_size": 64}), ptx, 2)
    with pytest.raises(RuntimeError, match="bytes of shared memory"):
        check_launchable(SimpleNamespace(**{**vars(ok), "shared": SHARED_LIMIT + 1}), ptx, 2)


def test_runtime_args_are_the_sizes_in_kernel_order():
    b, h, kv, t, s, n, d, vb = 2, 6, 2, 5, 11, 7, 16, 1
    assert RUNTIME_ARGS == ("T", "S", "N", "VB")
    assert runtime_args((b, h, t, d), (b, kv, s, d), (vb, kv, n, d)) == [t, s, n, vb]


def test_aot_refuses_bad_heads():
    with pytest.raises(ValueError, match="multiple"):
        compile_naavit(87, "fp16", 9, 2, 64, 0.125)
    with pytest.raises(ValueError, match="head size"):
        compile_naavit(87, "fp16", 2, 1, MAX_HEAD_DIM * 2, 0.125)


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
    ("auto", "plugin", "10.9.0", "plugin"),
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


# TensorRT on each JetPack for Orin: 6.0 has 8.6.2, 6.1 and 6.2 have 10.3.0, 7.2 has 10.16
JETPACK_6_0, JETPACK_6_2, JETPACK_7_2 = "8.6.2.3", "10.3.0.30", "10.16.1.11"


@pytest.mark.parametrize("trt_version, custom, plugin, native", [
    (JETPACK_6_0, "decomposed", None, None), (JETPACK_6_2, "decomposed", None, None),
    (JETPACK_7_2, "plugin", "plugin", "native"),
])
def test_attention_auto_per_jetpack(trt_version, custom, plugin, native):
    """`auto` on each JetPack: JetPack 6 has no AOT plugins, so custom artifacts fall back to
    the decomposed body and plugin artifacts are refused in one line; 7.2 takes the plugin."""
    assert build.resolve_attention("auto", "custom", trt_version) == custom
    for variant, chosen in (("plugin", plugin), ("native", native)):
        if chosen is None:
            with pytest.raises(SaisaError, match=r"^--attention (plugin|native): TensorRT [\d.]+ (has no AOT|cannot)"):
                build.resolve_attention("auto", variant, trt_version)
        else:
            assert build.resolve_attention("auto", variant, trt_version) == chosen
    if plugin is None:
        with pytest.raises(SaisaError, match="no AOT Python plugins \\(10.9\\+\\); use --attention decomposed$") as e:
            build.resolve_attention("plugin", "custom", trt_version)
        assert "\n" not in str(e.value)


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


def test_gpu_selftest_runs_every_check_then_fails(tmp_path):
    """One failing check (here the kernel selfcheck) must not hide the others: the script
    runs them all, lists the failures and exits non-zero. `python` is a stand-in that logs
    its arguments; TensorRT looks absent to it."""
    log, bin_dir = tmp_path / "calls.log", tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'case "$*" in *--timing*) exit 3;; *"import tensorrt"*) exit 1;; esac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(log)}
    env.pop("PYTHON", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_selftest.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    calls = log.read_text()
    assert "-m pytest -q -m gpu" in calls and "tests/test_trt_plugin_qdp.py" in calls
    assert done.returncode == 1
    assert "## summary: 4 passed, 1 failed" in done.stdout
    assert "FAILED: kernel vs reference, and timing (exit 3)" in done.stdout
