"""validate, bench and flops; quantized visual K/V storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.evaluation.flops import CONFIGS, report
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.kv_storage import pack, unpack
from saisa_edge.runtime.visual_cache import VisualCache
from tests.conftest import DEMO_IMAGE


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_gqa_dir):
    out = tmp_path_factory.mktemp("evaluation") / "fp32"
    export_artifact(open_checkpoint(tiny_gqa_dir), out, ExportOptions())
    return out


def test_flops_reproduce_the_headline():
    r = report(CONFIGS["vicuna-7b"], 32, "vicuna-7b")
    assert 0.64 <= r["reduction"] <= 0.68  # the paper: 66% fewer inference FLOPs
    assert r["saisa"]["stages_gflops"]["decoder_linears"] < r["llava_1_5"]["stages_gflops"]["decoder_linears"] / 10
    assert r["saisa"]["stages_gflops"]["projector"] == pytest.approx(32 * r["llava_1_5"]["stages_gflops"]["projector"], rel=0.01)
    longer = report(CONFIGS["vicuna-7b"], 512, "vicuna-7b")
    assert longer["reduction"] < r["reduction"]  # the saving is in the image, so it shrinks as text grows
    gqa = report(CONFIGS["llama3-8b"], 32, "llama3-8b")
    assert gqa["reduction"] > r["reduction"]  # 8 K/V heads: visual K/V cost 4x less


def test_cli_flops(tiny_gqa_dir):
    runner = CliRunner()
    out = runner.invoke(main, ["flops", "--config", "vicuna-7b", "--json"])
    assert out.exit_code == 0 and 0.64 < json.loads(out.output)["reduction"] < 0.68
    out = runner.invoke(main, ["flops", str(tiny_gqa_dir), "--text-tokens", "8"])
    assert out.exit_code == 0 and "fewer FLOPs" in out.output
    out = runner.invoke(main, ["flops"])
    assert out.exit_code == 2 and "CHECKPOINT folder or --config" in out.output
    out = runner.invoke(main, ["flops", "--config", "gpt-4"])
    assert out.exit_code == 2 and "vicuna-7b" in out.output


def test_validate_fp32_artifact_passes_and_names_the_worst(artifact):
    runner = CliRunner()
    out = runner.invoke(main, ["validate", str(artifact), "--samples", "2", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["passed"] and r["precision"] == "fp32"
    assert r["summary"]["logit_cosine_min"] > 0.99999 and r["summary"]["top1"] == 1.0
    assert r["summary"]["greedy_match"] == 1.0 and r["summary"]["visual_kv_max_abs"] < 1e-4
    assert "layer" in r["worst_layer"] and r["worst_sample"]["image"].endswith(".png")
    assert len(r["samples"]) == 2 and len(r["samples"][0]["reference_tokens"]) > 0


def test_validate_fails_against_another_model(artifact, tmp_path):
    from saisa_edge.checkpoint.presets import tiny, write_checkpoint

    other = write_checkpoint(tiny(seed=7, num_attention_heads=6, num_key_value_heads=2, hidden_size=48),
                             tmp_path / "other", dtype="fp32", preset="tiny")
    out = CliRunner().invoke(main, ["validate", str(artifact), "--reference", str(other), "--samples", "1"])
    assert out.exit_code == 1 and "FAILED" in out.output


def test_validate_needs_a_reference(tmp_path):
    out = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert out.exit_code == 2 and "no saisa-edge-manifest.json" in out.output


def test_bench_measures_both_layouts_and_plots(artifact, tmp_path):
    png = tmp_path / "stages.png"
    out = CliRunner().invoke(main, ["bench", str(artifact), "--prompt-lengths", "4", "--batches", "1,2",
                                    "--decode-tokens", "2", "--repeats", "1", "--json", "--plot", str(png)])
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert [p["layout"] for p in r["points"]] == ["saisa", "llava-1.5"] * 2
    assert all(p["decode_tokens_per_s"] > 0 and p["ttft_cold_ms"] > 0 for p in r["points"])
    assert r["visual_cache_bytes_per_image"] > 0 and len(r["saisa_over_llava"]) == 2
    assert png.stat().st_size > 1000
    bad = CliRunner().invoke(main, ["bench", str(artifact), "--batches", "0"])
    assert bad.exit_code == 2 and "--batches" in bad.output


# --- quantized visual K/V storage ---------------------------------------------------------------


@pytest.fixture
def visual(tiny_gqa_ckpt):
    backend = TorchBackend(tiny_gqa_ckpt)
    pixels = preprocess(load_image(DEMO_IMAGE), tiny_gqa_ckpt.config.vision)
    return backend, pixels, backend.visual_kv(backend.vision(pixels[None]), 3)


@pytest.mark.parametrize("storage, bound", [("int8", 0.01), ("fp8", 0.07)])
def test_packed_kv_is_close_and_smaller(visual, storage, bound):
    _, _, kv = visual
    packed = pack(kv, storage)
    back = unpack(packed, "fp32")
    for a, b in zip((*kv.keys, *kv.values), (*back.keys, *back.values)):
        assert float(np.abs(a - b).max() / np.abs(a).max()) < bound
    fp16 = pack(kv, "native").nbytes / 2
    assert packed.nbytes < 0.6 * fp16  # half of fp16, plus the scales
    assert np.array_equal(back.starts, kv.starts)


def test_cache_with_int8_storage_round_trips_on_disk(visual, tmp_path):
    backend, pixels, kv = visual
    cfg = backend.config.text
    cache = VisualCache(cfg, backend.identity, "fp32", 2**30, tmp_path, storage="int8")
    first, hit = cache.get(pixels, 3, lambda: kv)
    assert not hit and cache.nbytes == pack(kv, "int8").nbytes
    again = VisualCache(cfg, backend.identity, "fp32", 2**30, tmp_path, storage="int8")
    second, hit = again.get(pixels, 3, lambda: pytest.fail("should come from disk"))
    assert hit and all(np.array_equal(a, b) for a, b in zip(first.keys, second.keys))  # a miss equals a hit
    native = VisualCache(cfg, backend.identity, "fp32", 2**30, tmp_path)
    _, hit = native.get(pixels, 3, lambda: kv)
    assert not hit  # another storage is another entry


def test_cli_kv_storage_flags(artifact, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["validate", str(artifact), "--samples", "1", "--kv-storage", "int8", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["summary"]["top1"] > 0.5
    args = ["run", str(artifact), "--image", str(DEMO_IMAGE), "--prompt", "hi", "--max-new-tokens", "3",
            "--cache-storage", "int8", "--cache-dir", str(tmp_path / "cache"), "--json"]
    first, second = runner.invoke(main, args), runner.invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    assert json.loads(first.stdout)["visual_cache"] == "miss" and json.loads(second.stdout)["visual_cache"] == "hit"
    assert json.loads(first.stdout)["tokens"] == json.loads(second.stdout)["tokens"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
