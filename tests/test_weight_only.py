"""Weight-only formats (int8_wo, int4_rtn, int4_awq): the quantizer, AWQ's searches, the two
graph forms (DequantizeLinear for TensorRT, MatMulNBits for ONNX Runtime), calibrated tiny
artifacts, perplexity and `validate --text-only`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from saisa_edge.artifacts import MANIFEST_NAME
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.calibration import awq, weight_only
from saisa_edge.calibration.calibrate import calibrate
from saisa_edge.calibration.data import TEXT_CONTEXT, TEXT_TOPICS, calibration_text, pairs, text_chunks
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.calibration.recipe import DEFAULT_NBITS_ACCURACY, make_recipe
from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.evaluation import perplexity as ppl
from saisa_edge.artifacts import open_artifact
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.runtime.kv import TextCache
from saisa_edge.plugins.build import check_precision_for
from saisa_edge.targets import target
from tests.conftest import DEMO_IMAGE
from tests.test_calibration import float_artifact  # noqa: F401  (the tiny fp32 artifact fixture)


def _weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


# --- the quantizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, block, k", [(4, 128, 576), (4, 32, 96), (4, 128, 48), (8, 576, 576), (8, 100, 100)])
def test_round_to_nearest_is_within_half_a_step(bits, block, k):
    w = _weight(k, 24)
    q = weight_only.quantize(w, bits, block)
    assert q.scales.shape == (-(-k // block), 24)
    assert q.codes.min() >= -(2 ** (bits - 1)) and q.codes.max() <= 2 ** (bits - 1) - 1
    step = np.repeat(q.scales, block, axis=0)[:k]
    assert np.all(np.abs(w - q.dequantize()) <= step / 2 + 1e-6)
    # each block's largest weight lands on the grid's end: the range is used
    assert np.abs(q.codes).max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("block, k", [(128, 576), (32, 96), (128, 48), (16, 40)])
def test_asymmetric_rounding_is_within_half_a_step_and_spans_each_block(block, k):
    w = _weight(k, 24) + 0.3  # off-centre blocks: where a zero point pays
    q = weight_only.quantize(w, 4, block, asymmetric=True)
    assert q.codes.dtype == np.uint8 and q.codes.max() <= 15 and q.zeros is not None and q.zeros.max() <= 15
    step = np.repeat(q.scales, block, axis=0)[:k]
    assert np.all(np.abs(w - q.dequantize()) <= step / 2 + 1e-6)
    sym = weight_only.quantize(w, 4, block)
    assert np.abs(w - q.dequantize()).mean() < np.abs(w - sym.dequantize()).mean()


def test_asymmetric_g32_on_an_affine_4bit_source():
    """smol's weights are GGUF Q4_1 (d * q + m, q in 0..15, blocks of 32). An asymmetric g32
    grid takes the source's step d; it reproduces the source exactly where m is a whole
    number of steps, and otherwise sits off it by the fraction of m / d (an integer zero
    point cannot shift the grid by part of a step): at most d / 2 everywhere."""
    rng = np.random.default_rng(3)
    d = rng.uniform(0.01, 0.02, (4, 8))
    q = rng.integers(0, 16, (4, 32, 8))
    q[:, 0], q[:, 1] = 0, 15  # every block spans the full grid, as Q4_1's do
    for m in (-np.round(rng.uniform(3, 12, (4, 8))) * d, -rng.uniform(3, 12, (4, 8)) * d):  # blocks straddle 0
        w = (d[:, None] * q + m[:, None]).reshape(128, 8).astype(np.float32)
        asym = weight_only.quantize(w, 4, 32, asymmetric=True)
        np.testing.assert_allclose(asym.scales, d, rtol=1e-5)  # the source's own step
        err = np.abs(w - asym.dequantize())
        offset = np.abs(m / d - np.round(m / d)) * d  # how far the source's grid sits from one through 0
        np.testing.assert_allclose(err.reshape(4, 32, 8).max(axis=1), offset, atol=1e-5)
        assert np.all(offset <= d / 2 + 1e-7)


def _forms(q: weight_only.WeightQuant) -> tuple[np.ndarray, np.ndarray]:
    tensors, node = weight_only.dq_tensors(q, "w", np.float32)
    packed, scales, _ = weight_only.nbits_arrays(q)
    return weight_only.decode_dq(*tensors[:2], node, *tensors[2:]), weight_only.decode_nbits(packed, scales, q.codes.shape[0], q.bits,
                                                                           weight_only.nbits_zero_points(q))


@pytest.mark.parametrize("bits, block, k, asymmetric", [
    (4, 128, 576, False), (4, 64, 192, False), (4, 128, 48, False), (8, 576, 576, False), (8, 48, 48, False),
    (8, 100, 100, False), (4, 128, 576, True), (4, 32, 96, True), (4, 128, 48, True), (4, 16, 80, True)])
def test_both_forms_decode_to_the_same_weights(bits, block, k, asymmetric):
    q = weight_only.quantize(_weight(k, 10, seed=k) + 0.01, bits, block, asymmetric=asymmetric)
    dq, nbits = _forms(q)
    np.testing.assert_array_equal(dq, q.dequantize())
    np.testing.assert_array_equal(nbits, q.dequantize())


def _matmul_model(q: weight_only.WeightQuant, form: str) -> onnx.ModelProto:
    """x [2, 3, K] @ W in one of three forms: float (the dequantized weight), dq, nbits."""
    k, n = q.codes.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])
    opsets = [helper.make_opsetid("", 21)]
    if form == "float":
        inits = [numpy_helper.from_array(q.dequantize(), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    elif form == "dq":
        inits, dq = weight_only.dq_tensors(q, "w", np.float32)
        nodes = [dq, helper.make_node("MatMul", ["x", dq.output[0]], ["y"])]
    else:
        inits, node = weight_only.nbits_node(q, "w", "x", "y", np.float32)
        nodes = [node]
        opsets.append(helper.make_opsetid(weight_only.MS_DOMAIN, 1))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=opsets, ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("bits, block, k, asymmetric", [(4, 128, 576, False), (4, 32, 64, False), (8, 576, 576, False),
                                                        (8, 48, 48, False), (4, 128, 576, True), (4, 32, 96, True)])
def test_onnx_runtime_runs_both_forms_as_the_dequantized_float_graph(bits, block, k, asymmetric):
    q = weight_only.quantize(_weight(k, 40, seed=1) + 0.01, bits, block, asymmetric=asymmetric)
    x = np.random.default_rng(2).standard_normal((2, 3, k)).astype(np.float32)
    out = {}
    options = ort.SessionOptions()  # ORT fuses DQ -> MatMul into MatMulNBits at accuracy level 4 (int8
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # activations) unless told
    for form in ("float", "dq", "nbits"):
        sess = ort.InferenceSession(_matmul_model(q, form).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
        out[form] = sess.run(["y"], {"x": x})[0]
    scale = np.abs(out["float"]).max()
    for form in ("dq", "nbits"):
        np.testing.assert_allclose(out[form], out["float"], rtol=0, atol=1e-5 * scale, err_msg=form)


def test_nbits_layout_is_what_the_spec_says():
    """Spec: B [N, k_blocks, block*bits/8], low nibble first along K, codes + 2^(bits-1)."""
    codes = np.zeros((32, 2), np.int8)
    codes[0, 1], codes[1, 1] = -8, 7  # column 1, K 0 and 1: unsigned 0 and 15 -> one byte 0xF0
    q = weight_only.WeightQuant(codes, np.ones((1, 2), np.float32), 4, 32)
    packed, scales, block = weight_only.nbits_arrays(q)
    assert packed.shape == (2, 1, 16) and block == 32 and scales.shape == (2, 1)
    assert packed[1, 0, 0] == 0xF0 and packed[0, 0, 0] == 0x88  # zeros sit at the default zero point 8
    assert weight_only.nbits_zero_points(q) is None
    per_channel = weight_only.quantize(_weight(576, 4), 8, 576)  # int8 in blocks of 16: level 4's activation blocks
    assert weight_only.nbits_block(per_channel) == 16 and weight_only.nbits_arrays(per_channel)[0].shape == (4, 36, 16)


def test_nbits_zero_points_pack_two_blocks_a_byte():
    """Spec: zero_points [N, ceil(k_blocks * bits / 8)], block 0 in the low nibble."""
    codes = np.zeros((48, 1), np.uint8)
    zeros = np.array([[3], [12], [5]], np.uint8)  # three blocks of 16 along K
    q = weight_only.WeightQuant(codes, np.ones((3, 1), np.float32), 4, 16, zeros)
    packed = weight_only.nbits_zero_points(q)
    assert packed is not None and packed.shape == (1, 2) and packed[0, 0] == 0xC3 and packed[0, 1] == 0x05


# --- AWQ ------------------------------------------------------------------------------------------


def _outlier_layer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activations with a few input channels 30x larger than the rest (what AWQ is for)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    x[:, [3, 70, 141, 200]] *= 30.0
    return x, rng.standard_normal((256, 96)).astype(np.float32) * 0.05


def _output_error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.mean((x @ approx - x @ w) ** 2))


def test_awq_beats_round_to_nearest_on_outlier_channels():
    x, w = _outlier_layer()
    rtn = weight_only.quantize(w, 4, 128)
    s, alpha, errors = awq.search_scale(x, np.abs(x).mean(axis=0), [w], lambda v: weight_only.quantize(v, 4, 128))
    assert errors[0.0] == pytest.approx(_output_error(x, w, rtn.dequantize()), rel=1e-5)  # alpha 0 is RTN
    assert alpha > 0
    scaled = awq.quantize_layer(x / s, w * s[:, None], 4, 128, clip=True)
    awq_err = _output_error(x, w, scaled.dequantize() / s[:, None])
    rtn_err = _output_error(x, w, rtn.dequantize())
    assert awq_err < 0.5 * rtn_err, (awq_err, rtn_err)


def test_clipping_search_never_raises_the_error():
    x, w = _outlier_layer(seed=1)
    plain = weight_only.quantize(w, 4, 64)
    clipped = awq.quantize_layer(x, w, 4, 64, clip=True)
    assert _output_error(x, w, clipped.dequantize()) <= _output_error(x, w, plain.dequantize()) + 1e-9
    assert np.all(clipped.scales <= plain.scales + 1e-7)


def test_row_sample_keeps_a_bounded_uniform_sample_and_exact_means():
    s = awq.RowSample(rows=50)
    chunks = [np.full((30, 4), i, np.float32) for i in range(10)]
    for c in chunks:
        s.update(c[None])
    assert s.sample is not None and s.sample.shape == (50, 4) and s.seen == 300
    np.testing.assert_allclose(s.mean_abs, np.full(4, 4.5))
    assert len(set(s.sample[:, 0])) > 5  # rows from many chunks, not only the first ones


# --- recipes ------------------------------------------------------------------------------------


def test_weight_only_recipes():
    assert make_recipe("int8_sq", "cpu").precision == "int8"  # int8 is int8_sq's manifest name
    assert make_recipe("int4_awq", "cpu").form == "nbits" and make_recipe("int4_awq", "orin-nano").form == "dq"
    r = make_recipe("int4_awq", "orin-agx", group_size=64)
    assert r.weight_only and r.awq and r.weight_bits == 4 and r.as_json()["group_size"] == 64
    assert not make_recipe("int4_rtn", "cpu").awq and make_recipe("int8_wo", "a100").weight_bits == 8
    with pytest.raises(SaisaError, match="--group-size 96: must be a power of two"):
        make_recipe("int4_awq", "cpu", group_size=96)
    assert make_recipe("int4_rtn", "cpu").as_json()["nbits_accuracy_level"] == 4
    assert make_recipe("int8_wo", "cpu", nbits_accuracy=0).as_json()["nbits_accuracy_level"] == 0
    assert make_recipe("int4_rtn", "h100").as_json()["nbits_accuracy_level"] is None
    with pytest.raises(SaisaError, match="--nbits-accuracy 5"):
        make_recipe("int8_wo", "cpu", nbits_accuracy=5)
    # zero points: the cpu default for int4; TensorRT's INT4 is symmetric in blocks of 64 or 128
    assert make_recipe("int4_awq", "cpu").asymmetric and not make_recipe("int4_awq", "orin-agx").asymmetric
    assert not make_recipe("int4_awq", "cpu", asymmetric=False).asymmetric
    assert make_recipe("int4_rtn", "cpu").as_json()["weights"].startswith("uint4 asymmetric")
    with pytest.raises(SaisaError, match="--zero-point: TensorRT's INT4 DequantizeLinear is symmetric"):
        make_recipe("int4_awq", "orin-nx", asymmetric=True)
    with pytest.raises(SaisaError, match="--zero-point: int8_wo is symmetric"):
        make_recipe("int8_wo", "cpu", asymmetric=True)
    with pytest.raises(SaisaError, match="--group-size 32: TensorRT's INT4 blocks are 64 or 128"):
        make_recipe("int4_rtn", "h100", group_size=32)
    # int8: a scale per 32 rows on cpu (GenAI's int8), per output channel for TensorRT or with 0
    assert make_recipe("int8_wo", "cpu").group_size == 32 and make_recipe("int4_rtn", "cpu").group_size == 128
    assert make_recipe("int8_wo", "cpu").as_json()["weights"] == "int8 symmetric, a scale per 32 rows of K and output channel"
    assert make_recipe("int8_wo", "orin-agx").group_size is None and make_recipe("int8_wo", "cpu", group_size=0).group_size is None
    assert make_recipe("int8_wo", "a100").as_json()["weights"] == "int8 symmetric, a scale per output channel"
    with pytest.raises(SaisaError, match="--group-size 64: TensorRT's INT8 weight-only GEMM takes a scale per output"):
        make_recipe("int8_wo", "orin-agx", group_size=64)
    with pytest.raises(SaisaError, match="--group-size 0: must be a power of two"):
        make_recipe("int4_awq", "cpu", group_size=0)
    with pytest.raises(SaisaError, match="--group-size 24: must be a power of two, at least 16 .* or 0 for a scale per"):
        make_recipe("int8_wo", "cpu", group_size=24)
    # --lm-head-bits: int4 formats only, and not with the head kept float
    # the head: int8 by default for int4 on cpu, float elsewhere, else as --keep and --lm-head-bits say
    assert (make_recipe("int4_awq", "cpu").keep, make_recipe("int4_awq", "cpu").lm_head_bits) == ((), 8)
    assert (make_recipe("int4_awq", "orin-agx").keep, make_recipe("int4_awq", "orin-agx").lm_head_bits) == (("lm_head",), None)
    assert (make_recipe("int8_wo", "cpu").keep, make_recipe("int8_wo", "cpu").lm_head_bits) == (("lm_head",), None)
    assert make_recipe("int4_rtn", "cpu", keep=("lm_head",)).lm_head_bits is None
    assert make_recipe("int4_rtn", "cpu", lm_head_bits=4).as_json()["lm_head_bits"] == 4
    assert make_recipe("int4_rtn", "h100", keep=("vision",)).lm_head_bits == 4  # TensorRT: as the body
    assert make_recipe("int8_wo", "cpu", keep=()).lm_head_bits == 8 and make_recipe("int8", "cpu").keep == ("lm_head",)
    for precision, kept, said in (("int8_wo", (), "--lm-head-bits 8: int4_awq and int4_rtn may"),
                                  ("int4_rtn", ("lm_head",), "--lm-head-bits 8 with --keep lm_head"),
                                  ("fp8", (), "--lm-head-bits: fp8 quantizes activations too")):
        with pytest.raises(SaisaError, match=said):
            make_recipe(precision, "cpu" if precision != "fp8" else "h100", keep=kept, lm_head_bits=8)


# --- calibrated tiny artifacts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, float_artifact):
    root = tmp_path_factory.mktemp("wo-q")
    data = pairs(open_artifact(float_artifact).config.vision, 4)
    out = {}
    for precision in ("int4_awq", "int4_rtn", "int8_wo"):
        for tgt in ("cpu", "orin-agx"):  # symmetric on both: TensorRT's form takes no zero points
            out[precision, tgt] = root / f"{precision}-{tgt}"
            int4 = precision.startswith("int4")  # int8: per output channel, the head in int4 too: TensorRT's form
            calibrate(float_artifact, out[precision, tgt], make_recipe(
                precision, tgt, keep=(), group_size=64 if int4 else 0, asymmetric=False, lm_head_bits=4 if int4 else None),
                data, decode_steps=1)
    out["int4_awq", "cpu-zero-point"] = root / "int4_awq-cpu-zp"  # the cpu default: uint4 with zero points
    calibrate(float_artifact, out["int4_awq", "cpu-zero-point"], make_recipe("int4_awq", "cpu", keep=(), group_size=32),
              data, decode_steps=1)
    return out


def _logits(backend, pixels, cfg):
    kv = backend.visual_kv(backend.vision(pixels), 2)
    ids, pos = np.array([[3, 8, 2, 6, 1, 4]]), np.arange(6)[None] + 2
    out, _ = backend.forward(ids, pos, TextCache.empty(cfg, 1, "fp32"), kv)
    return torch.from_numpy(out.flatten())


# tiny's random weights: a bound per format on the logit cosine against fp32
COSINE_BOUND = {"int8_wo": 0.999, "int4_rtn": 0.97, "int4_awq": 0.97}


def test_weight_only_artifacts_run_close_to_float(quantized, float_artifact, tiny_gqa_ckpt):
    from saisa_edge.inputs.image import load_image, preprocess

    pixels = preprocess(load_image(DEMO_IMAGE), tiny_gqa_ckpt.config.vision)[None]
    cfg = tiny_gqa_ckpt.config.text
    ref = _logits(OrtBackend(open_artifact(float_artifact)), pixels, cfg)
    for (precision, tgt), folder in quantized.items():
        got = _logits(OrtBackend(open_artifact(folder)), pixels, cfg)
        cos = float(torch.nn.functional.cosine_similarity(ref, got, dim=0))
        assert COSINE_BOUND[precision] < cos < 1.0, (precision, tgt, cos)


def test_graph_forms_per_target(quantized):
    for (precision, tgt), folder in quantized.items():
        model = onnx.load(str(folder / "decoder.onnx"))
        ops = [n.op_type for n in model.graph.node]
        assert "QuantizeLinear" not in ops  # weight-only: activations stay float
        opset = next(o.version for o in model.opset_import if o.domain == "")
        if tgt.startswith("cpu"):
            nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
            assert nbits and "DequantizeLinear" not in ops
            levels = {helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "accuracy_level"}
            assert levels == {DEFAULT_NBITS_ACCURACY[precision]}  # per format: the level holding its mark
            body = [n for n in nbits if n.input[1] != "lm_head.weight.nbits"]  # the head: int8 by default, symmetric
            assert {len(n.input) for n in body} == {4 if tgt == "cpu-zero-point" else 3}  # zero points or none
        else:
            dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert dqs and "MatMulNBits" not in ops
            blocked = [n for n in dqs if any(a.name == "block_size" for a in n.attribute)]
            assert bool(blocked) == precision.startswith("int4") and opset == (21 if blocked else 19)
        details = json.loads((folder / MANIFEST_NAME).read_text())["details"]
        q = details["quantization"]
        assert q["recipe"]["form"] == ("nbits" if tgt.startswith("cpu") else "dq") and q["runs_on"]
        assert bool(q["awq_alpha"]) == (precision == "int4_awq")
        assert details["graphs"]["decoder"]["quantized_linears"] > 0


def _decoded_weights(folder) -> dict[str, np.ndarray]:
    """Every quantized weight of the decoder, decoded from whichever form the graph holds."""
    model = onnx.load(str(folder / "decoder.onnx"))
    init = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".quantized"):
            out[n.input[0].removesuffix(".quantized")] = weight_only.decode_dq(
                *(init[i] for i in n.input[:2]), n, init[n.input[2]] if len(n.input) > 2 else None)
        elif n.op_type == "MatMulNBits":
            zeros = numpy_helper.to_array(init[n.input[3]]) if len(n.input) > 3 else None
            out[n.input[1].removesuffix(".nbits")] = weight_only.decode_nbits(
                numpy_helper.to_array(init[n.input[1]]), numpy_helper.to_array(init[n.input[2]]), attrs["K"],
                attrs["bits"], zeros)
    return out


@pytest.mark.parametrize("precision", ["int4_awq", "int4_rtn", "int8_wo"])
def test_one_quantization_gives_both_forms(quantized, precision):
    cpu, trt = _decoded_weights(quantized[precision, "cpu"]), _decoded_weights(quantized[precision, "orin-agx"])
    assert cpu.keys() == trt.keys() and cpu
    for name in cpu:
        np.testing.assert_array_equal(cpu[name], trt[name], err_msg=name)


def test_lm_head_bits_quantize_the_head_at_int8_and_the_body_at_int4(tmp_path, float_artifact):
    """--lm-head-bits 8 (int4's default on cpu): the head as int8_wo takes it on the target (blocks
    of 32 on cpu, a scale per output channel for TensorRT), every other linear in the recipe's
    int4; logits nearer the float model's than with the head in int4."""
    data = pairs(open_artifact(float_artifact).config.vision, 2)
    formats = {}
    for name, tgt, bits in (("head8", "cpu", None), ("head4", "cpu", 4), ("head8-trt", "orin-agx", 8)):
        calibrate(float_artifact, tmp_path / name, make_recipe("int4_awq", tgt, keep=(), group_size=64,
                                                               asymmetric=False, lm_head_bits=bits), data, decode_steps=1)
        graph = onnx.load(str(tmp_path / name / "decoder.onnx")).graph
        init = {t.name: t for t in graph.initializer}
        found = {}
        for n in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "MatMulNBits":
                found[n.input[1].removesuffix(".nbits")] = (attrs["bits"], attrs["block_size"])
            elif n.op_type == "DequantizeLinear" and n.input[0].endswith(".quantized"):
                found[n.input[0].removesuffix(".quantized")] = (8 if init[n.input[0]].data_type == TensorProto.INT8 else 4,
                                                                attrs.get("block_size", "channel"))
        formats[name] = found
    head = "lm_head.weight"
    assert formats["head8"].pop(head) == (8, 32) and formats["head4"].pop(head) == (4, 64)
    assert formats["head8-trt"].pop(head) == (8, "channel")
    for name, found in formats.items():
        assert found and set(found.values()) == {(4, 64)}, name  # the body: int4 in blocks of 64
    recipe = json.loads((tmp_path / "head8" / MANIFEST_NAME).read_text())["details"]["quantization"]
    assert recipe["recipe"]["lm_head_bits"] == 8 and "LM head: ONNX Runtime >= 1.20 CPU (8-bit" in recipe["runs_on"]
    from saisa_edge.inputs.image import load_image, preprocess

    cfg = open_artifact(float_artifact).config
    pixels = preprocess(load_image(DEMO_IMAGE), cfg.vision)[None]
    ref = _logits(OrtBackend(open_artifact(float_artifact)), pixels, cfg.text)
    error = {name: float(torch.dist(ref, _logits(OrtBackend(open_artifact(tmp_path / name)), pixels, cfg.text)))
             for name in ("head8", "head4")}
    assert error["head8"] < error["head4"], error


def test_tensorrt_builds_accept_the_dq_form_only(quantized):
    art = open_artifact(quantized["int4_awq", "orin-agx"])
    check_precision_for(art, target("orin-nano"))
    art.details["quantization"]["recipe"]["group_size"] = 32  # as calibrations before the refusal wrote
    with pytest.raises(SaisaError, match="int4 in groups of 32; TensorRT's INT4 blocks are 64 or 128"):
        check_precision_for(art, target("orin-nano"))
    with pytest.raises(SaisaError, match="MatMulNBits: ONNX Runtime forms.*calibrate again with --target orin-agx"):
        check_precision_for(open_artifact(quantized["int4_awq", "cpu"]), target("orin-agx"))


# --- perplexity and validate --text-only ---------------------------------------------------------


def test_perplexity_text_is_fixed_prose_and_backends_agree(float_artifact, tiny_gqa_dir):
    tokenizer = PromptTokenizer.load(float_artifact)
    chunks = ppl.Chunks.of(tokenizer, context=64, chunks=3)
    assert len(chunks.ids) == 3 and all(len(c) == 64 for c in chunks.ids)
    assert chunks == ppl.Chunks.of(tokenizer, context=64, chunks=3)
    assert "argparse" in ppl.corpus().lower() and len(ppl.corpus().split()) > 2000
    ort_score = ppl.score(OrtBackend(open_artifact(float_artifact)), chunks)
    torch_score = ppl.score(TorchBackend(load_checkpoint(tiny_gqa_dir)), chunks)
    assert ort_score.perplexity == pytest.approx(torch_score.perplexity, rel=1e-4)
    assert ort_score.top.shape == (3 * 63,) and np.mean(ort_score.top == torch_score.top) > 0.99
    nll = ppl.negative_log_likelihoods(OrtBackend(open_artifact(float_artifact)), chunks.ids[0])
    assert nll.shape == (63,) and np.all(nll > 0)


def test_validate_text_only_reports_perplexity_and_applies_its_mark(quantized, tiny_gqa_dir):
    runner = CliRunner()
    folder = quantized["int4_rtn", "cpu"]
    result = runner.invoke(main, ["validate", str(folder), "--reference", str(tiny_gqa_dir), "--text-only",
                                  "--samples", "2", "--json", "--min-cosine", "0", "--min-top1", "0",
                                  "--min-greedy", "0", "--max-perplexity-increase", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["text_only"] and len(report["samples"]) == 2
    s = report["summary"]
    assert s["perplexity"] > 1 and s["reference_perplexity"] > 1 and s["perplexity"] != s["reference_perplexity"]
    assert 0 < s["prose_top1"] < 1  # int4 flips some of tiny's argmaxes over the prose, not all
    result = runner.invoke(main, ["validate", str(folder), "--reference", str(tiny_gqa_dir), "--text-only",
                                  "--samples", "1", "--min-cosine", "0", "--min-top1", "0", "--min-greedy", "0",
                                  "--max-perplexity-increase", "-1"])
    assert result.exit_code == 1 and "perplexity increase" in result.output and "(text only)" in result.output


# --- on paper: Orin -----------------------------------------------------------------------------


def test_orin_plan_by_hand():
    from saisa_edge.evaluation import orin

    assert orin.bytes_per_weight("int4_awq", 4096) == 0.5 + 2 / 128
    assert orin.bytes_per_weight("int8_wo", 4096) == 1 + 2 / 4096
    p = orin.plan("vicuna-7b", "fp16", "orin-agx")
    # decoder linears of LLaMA-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008) = 6.48e9 weights, 2 bytes each
    decoder = 32 * (4 * 4096**2 + 3 * 4096 * 11008) * 2
    kv = 2 * 32 * 32 * 128 * 2 * (576 + 2048)
    assert p.kv_gb == round(kv / 1e9, 2) and p.bytes_per_token_gb == round((decoder + 32000 * 4096 * 2 + kv) / 1e9, 3)
    assert p.tokens_per_s == round(204.8e9 / (decoder + 32000 * 4096 * 2 + kv), 1)
    assert p.fits and not orin.plan("vicuna-7b", "fp16", "orin-nx").fits  # 15 GB of fp16 weights
    assert orin.plan("vicuna-7b", "int4_awq", "orin-nx").fits
    four, sixteen = orin.plan("llama3-8b", "int4_awq", "orin-nano"), orin.plan("llama3-8b", "fp16", "orin-nano")
    assert 2.5 < four.tokens_per_s / sixteen.tokens_per_s < 4  # bandwidth-bound: the bytes decide
    assert not any(r["format"] == "fp8" for r in orin.table())  # no FP8 tensor cores on Orin


def test_calibration_prose_is_real_and_not_the_perplexity_text(float_artifact):
    text = calibration_text()
    assert len(text.split()) > 5000
    held_out = {p.strip() for p in ppl.corpus().split("\n\n") if len(p.split()) > 8}
    assert not any(p.strip() in held_out for p in text.split("\n\n")), "calibration prose overlaps the held-out text"
    tokenizer = PromptTokenizer.load(float_artifact)
    chunks = text_chunks(tokenizer, 3)
    assert chunks == text_chunks(tokenizer, 3) and [len(c) for c in chunks.ids] == [TEXT_CONTEXT] * 3
    assert [len(c) for c in text_chunks(tokenizer, 2, max_context=100).ids] == [100, 100]  # a short artifact


def test_a_python_without_pydoc_data_is_one_line(tmp_path, float_artifact, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import raises ImportError
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "x"), "--precision",
                                       "int4_awq", "--report-samples", "0"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "lacks pydoc_data" in result.output and "--text-chunks 0" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_prose_passages_reach_every_decoder_tap(tmp_path, float_artifact, monkeypatch):
    """Each prose token is one more row at every decoder linear's input, and at no other
    graph's: the AWQ searches see it. The manifest says what prose was seen."""
    calls: list[dict[str, int]] = []
    real = awq.quantize_graph

    def spy(model, sites, stats, recipe):
        calls.append({t: s.seen for t, s in stats.items()})
        return real(model, sites, stats, recipe)

    monkeypatch.setattr(awq, "quantize_graph", spy)
    data = pairs(open_artifact(float_artifact).config.vision, 2)
    text = text_chunks(PromptTokenizer.load(float_artifact), 2)
    recipe = make_recipe("int4_awq", "cpu", keep=(), group_size=32)
    details, rows = [], []
    for name, prose in (("pairs", None), ("prose", text)):
        calls.clear()
        details.append(calibrate(float_artifact, tmp_path / name, recipe, data, decode_steps=1, text=prose))
        rows.append(list(calls))
    added = [{n - before[t] for t, n in after.items()} for before, after in zip(*rows)]
    assert GRAPHS[-1] == "decoder" and added == [{0}] * (len(GRAPHS) - 1) + [{2 * TEXT_CONTEXT}]
    assert details[0]["quantization"]["text"] is None
    assert details[1]["quantization"]["text"] == {"source": "pydoc_data.topics", "topics": list(TEXT_TOPICS),
                                                  "passages": 2, "tokens": 2 * TEXT_CONTEXT, "sha256": text.sha256}


def test_cli_weight_only_flags_reach_the_graph(tmp_path, float_artifact):
    out = tmp_path / "int4"
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(out), "--precision", "int4_rtn",
                                       "--group-size", "16", "--nbits-accuracy", "0", "--report-samples", "0"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / MANIFEST_NAME).read_text())["details"]["quantization"]["recipe"]
    assert recipe["group_size"] == 16 and recipe["nbits_accuracy_level"] == 0
    node = next(n for n in onnx.load(str(out / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["block_size"] == 16 and attrs["accuracy_level"] == 0 and attrs["bits"] == 4
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "awq"), "--precision",
                                       "int4_awq", "--group-size", "32", "--samples", "2", "--text-chunks", "1",
                                       "--report-samples", "0"])
    assert result.exit_code == 0, result.output
    text = json.loads((tmp_path / "awq" / MANIFEST_NAME).read_text())["details"]["quantization"]["text"]
    assert text["passages"] == 1 and text["tokens"] == TEXT_CONTEXT
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "x"), "--precision",
                                       "int4_awq", "--group-size", "100"])
    assert result.exit_code == 2 and "--group-size 100: must be a power of two" in result.output
    # --lm-head-bits alone quantizes the head (the default --keep loses lm_head); with --keep lm_head: one line
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "h8"), "--precision",
                                       "int4_rtn", "--lm-head-bits", "8", "--report-samples", "0"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "h8" / MANIFEST_NAME).read_text())["details"]["quantization"]["recipe"]
    assert recipe["lm_head_bits"] == 8 and recipe["keep"] == []
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "h8b"), "--precision",
                                       "int4_rtn", "--lm-head-bits", "8", "--keep", "lm_head"])
    assert result.exit_code == 2 and "--lm-head-bits 8 with --keep lm_head: the head cannot be both" in result.output
    # int8_wo on cpu by default: a scale per 32 rows of K, MatMulNBits blocks of 32 (no repeated scales)
    result = CliRunner().invoke(main, ["calibrate", str(float_artifact), "-o", str(tmp_path / "int8"), "--precision",
                                       "int8_wo", "--report-samples", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "int8" / MANIFEST_NAME).read_text())["details"]["quantization"]["recipe"]["group_size"] == 32
    graph = onnx.load(str(tmp_path / "int8" / "decoder.onnx")).graph
    node = next(n for n in graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scales = next(t for t in graph.initializer if t.name == node.input[2])
    assert (attrs["bits"], attrs["block_size"]) == (8, 32) and list(scales.dims) == [attrs["N"], -(-attrs["K"] // 32)]
