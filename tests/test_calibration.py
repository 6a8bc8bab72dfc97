"""Calibration: statistics, recipes, data, Q/DQ surgery and calibrated artifacts (tiny preset)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from saisa_edge.artifacts import MANIFEST_NAME, open_artifact
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.calibration import qdq
from saisa_edge.calibration.calibrate import calibrate
from saisa_edge.calibration.data import pairs, read_prompts
from saisa_edge.resources import asset
from saisa_edge.calibration.recipe import make_recipe
from saisa_edge.calibration.stats import BINS, TensorStats, pick_amax
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.checkpoint.presets import tiny, write_checkpoint
from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.runtime.kv import TextCache
from tests.conftest import DEMO_IMAGE


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory, tiny_gqa_dir):
    out = tmp_path_factory.mktemp("calib") / "fp32"
    export_artifact(open_checkpoint(tiny_gqa_dir), out, ExportOptions())
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, float_artifact):
    """An int8 (SmoothQuant, cpu target) and an fp8 (h100) artifact, vision included."""
    root = tmp_path_factory.mktemp("calibrated")
    cfg = open_artifact(float_artifact).config
    data = pairs(cfg.vision, 4)
    out = {}
    for precision, target in (("int8", "cpu"), ("fp8", "h100")):
        recipe = make_recipe(precision, target, keep=(), smoothquant=0.5)  # one alpha: test_int8_sq has auto
        out[precision] = root / precision
        calibrate(float_artifact, out[precision], recipe, data, decode_steps=2)
    return out


# --- statistics ---------------------------------------------------------------------------------


def test_growing_histogram_matches_one_histogram():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((50, 8)).astype(np.float32) * scale for scale in (0.1, 1.0, 7.0)]
    s = TensorStats(channels=True)
    for c in chunks:
        s.update(c)
    everything = np.abs(np.concatenate(chunks))
    assert s.amax == pytest.approx(float(everything.max()))
    np.testing.assert_allclose(s.channel_amax, everything.max(axis=0))
    direct, _ = np.histogram(everything, bins=BINS, range=(0, s.top))
    np.testing.assert_array_equal(s.hist, direct)  # merged bins lose nothing
    assert s.count == everything.size


@pytest.mark.parametrize("method, top", [("percentile", 20.0), ("entropy", 20.0), ("mse", 40.0)])
def test_clipping_methods_clip_a_lone_outlier(method, top):
    """MSE weighs the outlier's own clipping error too, so it clips less."""
    rng = np.random.default_rng(1)
    s = TensorStats()
    for _ in range(20):
        s.update(rng.standard_normal((256, 64)).astype(np.float32))
    s.update(np.array([[80.0]], np.float32))
    amax = pick_amax(s, method, 127)
    assert pick_amax(s, "max", 127) == pytest.approx(80.0)
    assert 2.5 < amax < top, amax


def test_non_finite_activations_are_reported():
    with pytest.raises(FloatingPointError):
        TensorStats().update(np.array([1.0, np.inf], np.float32))


# --- recipes and data ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("fp8", "orin-nano"), "use --precision int8"),
    (("fp8", "orin-agx"), "no FP8 tensor cores"),
    (("fp8", "a100"), "use --precision int8"),
    (("int4", "h100"), "--precision 'int4'"),
    (("int8", "tpu"), "--target 'tpu' is unknown"),
])
def test_recipe_refusals(args, message):
    with pytest.raises(SaisaError, match=message):
        make_recipe(*args)


def test_recipe_options_are_checked():
    with pytest.raises(SaisaError, match="use --method max"):
        make_recipe("fp8", "h100", method="entropy")
    with pytest.raises(SaisaError, match="--method 'median'"):
        make_recipe("int8", "h100", method="median")
    with pytest.raises(SaisaError, match="--keep 'norms'"):
        make_recipe("int8", "h100", keep=("norms",))
    with pytest.raises(SaisaError, match="alpha"):
        make_recipe("int8", "h100", smoothquant=1.5)
    assert make_recipe("fp8", "l4").smoothquant is None  # FP8 is never smoothed
    assert make_recipe("int8", "cpu").weight_levels == 63 and make_recipe("int8", "orin-nx").weight_levels == 127


def test_bundled_sets_are_distinct_and_usable(tiny_ckpt):
    cal, val = pairs(tiny_ckpt.config.vision, 12), pairs(tiny_ckpt.config.vision, 6, bundled="validation")
    assert not {p.prompt for p in cal} & {p.prompt for p in val}
    assert all(p.pixels.shape == (3, 32, 32) or p.pixels.shape[0] == 3 for p in cal)
    assert len({p.image.name for p in cal}) == 12 and all(p.image.parent == asset("calibration") for p in cal)


def test_bad_calibration_data(tmp_path, tiny_ckpt):
    vision = tiny_ckpt.config.vision
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(DEMO_IMAGE.read_bytes())
    with pytest.raises(SaisaError, match="1 image.*at least 2"):
        pairs(vision, 4, images=folder)
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SaisaError, match="--images .*b.jpg: cannot decode"):
        pairs(vision, 4, images=folder)
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n   \n")
    with pytest.raises(SaisaError, match="no usable prompt"):
        read_prompts(empty)
    with pytest.raises(SaisaError, match="file not found"):
        read_prompts(tmp_path / "missing.txt")


# --- graph surgery ------------------------------------------------------------------------------


def test_sites_are_the_linear_layers(float_artifact, tiny_gqa_ckpt):
    art = open_artifact(float_artifact)
    layers = tiny_gqa_ckpt.config.text.num_hidden_layers
    decoder = qdq.find_sites(onnx.load(str(art.graph("decoder"))))
    assert len(decoder) == 4 * layers + 1  # qkv, o, gate_up, down; the tied head
    assert [s.role for s in decoder].count(qdq.LM_HEAD) == 1
    assert not any("rope" in s.node for s in decoder)  # the rotate_half MatMul is not a linear layer


def test_tied_head_is_quantized_from_the_embedding(tmp_path):
    ckpt = write_checkpoint(tiny(seed=3, tie_word_embeddings=True), tmp_path / "tied", dtype="fp32", preset="tiny")
    export_artifact(open_checkpoint(ckpt), tmp_path / "fp32", ExportOptions())
    head = [s for s in qdq.find_sites(onnx.load(str(tmp_path / "fp32" / "decoder.onnx"))) if s.role == qdq.LM_HEAD]
    assert len(head) == 1 and head[0].transposed and head[0].weight == "model.embed_tokens.weight"
    cfg = open_artifact(tmp_path / "fp32").config
    calibrate(tmp_path / "fp32", tmp_path / "int8", make_recipe("int8", "h100", keep=()), pairs(cfg.vision, 2), 1)
    model = onnx.load(str(tmp_path / "int8" / "decoder.onnx"))
    assert not any(n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight" for n in model.graph.node)
    assert {t.name for t in model.graph.initializer} >= {"model.embed_tokens.weight", "lm_head.weight.quantized"}
    OrtBackend(open_artifact(tmp_path / "int8"))  # loads and checks


def _run_decoder(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feeds)[0]


def _decoder_feeds(art, ids):
    cfg = art.config.text
    cache = TextCache.empty(cfg, 1, "fp32")
    feeds = {"input_ids": np.array([ids]), "position_ids": np.arange(len(ids))[None],
             "past_positions": cache.positions, "visual_end": np.zeros(1, np.int64)}
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = cache.keys[i]
            feeds[f"visual_{kind}.{i}"] = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    return feeds


def test_smoothing_keeps_the_float_function(float_artifact):
    art = open_artifact(float_artifact)
    model = onnx.load(str(art.graph("decoder")))
    feeds = _decoder_feeds(art, [1, 5, 9, 3, 7])
    before = _run_decoder(model, feeds)
    sites = qdq.find_sites(model)
    rng = np.random.default_rng(0)
    acts = {s.activation for s in sites}
    width = {s.activation: numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == s.weight)).shape[0]
             for s in sites if not s.transposed}
    new_sites, smoothed = qdq.smooth(model, sites, {a: rng.uniform(0.1, 30, width[a]) for a in acts if a in width})
    layers = art.config.text.num_hidden_layers
    assert len(smoothed) == 4 * layers + 1  # qkv, o, gate_up, down inputs, and the head's
    folded = [a for a in smoothed if not a.endswith(".smoothed")]
    assert len(folded) == 2 * layers + 1  # RMSNorm outputs fold into the norm scale
    assert {s.activation for s in new_sites} >= set(smoothed)
    np.testing.assert_allclose(_run_decoder(model, feeds), before, rtol=1e-4, atol=1e-4)


def test_qdq_pattern_is_what_tensorrt_fuses(calibrated):
    for precision, folder in calibrated.items():
        model = onnx.load(str(folder / "decoder.onnx"))
        init = {t.name: t for t in model.graph.initializer}
        nodes = list(model.graph.node)
        qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
        dqs = [n for n in nodes if n.op_type == "DequantizeLinear"]
        assert qs and len(dqs) == 2 * len([n for n in nodes if n.op_type == "MatMul" and n.input[1].endswith(".dequantized")])
        elem = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
        for n in qs + dqs:
            zp = init[n.input[2]]
            assert zp.data_type == elem and set(zp.raw_data) == {0}  # symmetric: zero point 0
            scale = numpy_helper.to_array(init[n.input[1]])
            assert np.all(scale > 0)
        weight_dqs = [n for n in dqs if n.input[0].endswith(".weight.quantized")]
        for n in weight_dqs:
            axis = [a.i for a in n.attribute if a.name == "axis"]
            assert axis == [1]  # per output channel, INT8 and FP8 alike
            assert init[n.input[0]].data_type == elem


# --- calibrated artifacts -----------------------------------------------------------------------


def test_calibrated_artifacts_run_close_to_float(calibrated, float_artifact, tiny_gqa_ckpt):
    from saisa_edge.inputs.image import load_image, preprocess

    fp = OrtBackend(open_artifact(float_artifact))
    pixels = preprocess(load_image(DEMO_IMAGE), tiny_gqa_ckpt.config.vision)[None]
    ids, pos = np.array([[3, 8, 2, 6, 1, 4]]), np.arange(6)[None] + 2
    cfg = tiny_gqa_ckpt.config.text

    def logits(backend):
        kv = backend.visual_kv(backend.vision(pixels), 2)
        out, _ = backend.forward(ids, pos, TextCache.empty(cfg, 1, "fp32"), kv)
        return out.flatten()

    ref = logits(fp)
    for precision, folder in calibrated.items():
        art = open_artifact(folder)
        assert art.details["quantization"]["recipe"]["precision"] == precision
        got = logits(OrtBackend(art))
        cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
        assert cos > 0.99, (precision, cos)
        assert not np.array_equal(ref, got)  # quantized for real


def test_fp8_artifacts_run_with_quant_qdq_fusions_off(calibrated):
    """ONNX Runtime's CPU has no fused FP8 Q/DQ kernels: the runtime turns the fusions off for FP8 only."""
    entry = "session.disable_quant_qdq"
    fp8 = OrtBackend(open_artifact(calibrated["fp8"])).sessions["decoder"].get_session_options()
    assert fp8.get_session_config_entry(entry) == "1"
    int8 = OrtBackend(open_artifact(calibrated["int8"])).sessions["decoder"].get_session_options()
    with pytest.raises(Exception, match="does not have configuration"):
        int8.get_session_config_entry(entry)  # int8 keeps ORT's fused integer kernels


def test_already_quantized_and_bf16_are_refused(calibrated, tmp_path, tiny_gqa_dir):
    recipe = make_recipe("int8", "cpu")
    with pytest.raises(SaisaError, match="already quantized.*calibrate the float artifact"):
        calibrate(calibrated["int8"], tmp_path / "again", recipe, [])
    bf16 = tmp_path / "bf16"
    export_artifact(open_checkpoint(tiny_gqa_dir), bf16, ExportOptions(dtype="bf16"))
    with pytest.raises(SaisaError, match="bf16 artifact.*--dtype fp32 or fp16"):
        calibrate(bf16, tmp_path / "q", recipe, [])


def test_manifest_records_the_calibration(calibrated):
    details = json.loads((calibrated["int8"] / MANIFEST_NAME).read_text())["details"]
    q = details["quantization"]
    assert q["samples"] == 4 and len(q["data_sha256"]) == 64 and q["ranges"]
    assert q["recipe"]["smoothquant_alpha"] == 0.5 and q["recipe"]["target"] == "cpu"
    assert details["graphs"]["decoder"]["smoothed_inputs"] > 0
    assert details["graphs"]["vision"]["quantized_linears"] > 0


def test_cli_calibrate_reports_and_refuses(tmp_path, float_artifact):
    runner = CliRunner()
    out = tmp_path / "int8"
    result = runner.invoke(main, ["calibrate", str(float_artifact), "-o", str(out), "--precision", "int8",
                                  "--samples", "2", "--decode-steps", "1", "--report-samples", "1",
                                  "--min-cosine", "0.5", "--min-top1", "0.5", "--min-greedy", "0",
                                  "--max-perplexity-increase", "10"])
    assert result.exit_code == 0, result.output  # random tiny weights: thresholds of a real model do not apply
    assert "int8 (text only): logit cosine" in result.output and "PASSED" in result.output  # prompts alone
    assert "perplexity (stdlib docstrings)" in result.output
    result = runner.invoke(main, ["validate", str(out), "--samples", "1", "--min-top1", "1.01"])
    assert result.exit_code == 1 and "< 1.01" in result.output and "FAILED" in result.output
    assert "perplexity (stdlib docstrings)" in result.output  # image+prompt reports carry it too
    result = runner.invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "f"), "--precision", "fp8",
                                  "--target", "orin-nx"])
    assert result.exit_code == 2 and "use --precision int8" in result.output
    empty = tmp_path / "p.txt"
    empty.write_text("\n")
    result = runner.invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "g"), "--precision", "int8",
                                  "--prompts", str(empty)])
    assert result.exit_code == 2 and "no usable prompt" in result.output


def test_cli_recipe_flags_reach_the_manifest(tmp_path, float_artifact):
    out = tmp_path / "entropy"
    result = CliRunner().invoke(main, [
        "calibrate", str(float_artifact), "-o", str(out), "--precision", "int8", "--target", "orin-nx",
        "--method", "entropy", "--keep", "", "--smoothquant", "0", "--max-noise", "1000", "--samples", "2",
        "--decode-steps", "1", "--report-samples", "0", "--search-budget", "0"])
    assert result.exit_code == 0, result.output
    q = json.loads((out / MANIFEST_NAME).read_text())["details"]["quantization"]
    assert q["recipe"]["method"] == "entropy" and q["recipe"]["keep"] == [] and q["recipe"]["target"] == "orin-nx"
    assert q["recipe"]["smoothquant_alpha"] is None and q["recipe"]["max_noise"] == 1000
    assert q["samples"] == 2 and q["decode_steps"] == 1 and "sensitivity" not in q  # --search-budget 0
    assert "validating" not in result.output and "logit cosine" not in result.output  # --report-samples 0
