"""The contrib decoder form (ONNX Runtime's fused ops over an in-place K/V buffer): the
graph it is, the same logits and greedy tokens as the PyTorch reference and the standard
form (images, batches with padding, several images, chat, reused prefixes), the buffer it
updates in place, weight-only MatMulNBits through calibration, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from saisa_edge.artifacts import MANIFEST_NAME, open_artifact
from saisa_edge.artifacts import names as io
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.backends.ort_slots import SlotCache
from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.checkpoint.loader import load_checkpoint, open_checkpoint
from saisa_edge.checkpoint.presets import tiny, write_checkpoint
from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.kv import TextCache, text_layout
from saisa_edge.runtime.session import Request, Session
from tests.conftest import DEMO_IMAGE

FP32_BOUND = 1e-4  # as tests/test_export.py: ONNX Runtime reorders fp32 sums; logits are O(1)
VICUNA = TEMPLATES["vicuna_v1"]
CONTEXT = 1024


@pytest.fixture(scope="module")
def gqa16_dir(tmp_path_factory):
    """GQA (6 query heads on 2 K/V heads) with head_dim 16, which GroupQueryAttention's rotary needs."""
    spec = tiny(seed=2, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    return write_checkpoint(spec, tmp_path_factory.mktemp("ckpt") / "gqa16", dtype="fp32", preset="tiny")


@pytest.fixture(scope="module", params=["mha", "gqa"])
def trio(request, tmp_path_factory, tiny_dir, gqa16_dir):
    """(contrib backend, standard backend, reference backend, checkpoint) for one tiny checkpoint."""
    ckpt_dir = tiny_dir if request.param == "mha" else gqa16_dir
    root = tmp_path_factory.mktemp(f"contrib-{request.param}")
    source = open_checkpoint(ckpt_dir)
    export_artifact(source, root / "contrib", ExportOptions(decoder_form="contrib", max_context=CONTEXT))
    export_artifact(source, root / "standard", ExportOptions(max_context=CONTEXT))
    ckpt = load_checkpoint(ckpt_dir)
    return (OrtBackend(open_artifact(root / "contrib"), max_batch=4), OrtBackend(open_artifact(root / "standard")),
            TorchBackend(ckpt), ckpt, root)


def _pixels(ckpt, seed: int | None = None) -> np.ndarray:
    pixels = preprocess(load_image(DEMO_IMAGE), ckpt.config.vision)
    if seed is not None:  # another image: the demo's pixels shuffled
        pixels = np.random.default_rng(seed).permutation(pixels.reshape(3, -1), axis=1).reshape(pixels.shape)
    return pixels


def _err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


def test_the_graph_is_fused_ops_and_the_manifest_says_so(trio):
    *_, ckpt, root = trio
    layers = ckpt.config.text.num_hidden_layers
    art = open_artifact(root / "contrib")
    model = onnx.load(str(art.graph("decoder")))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert "NAAViTAttention" not in ops and "Concat" not in ops  # no per-step copy of the cache
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.output[1:]) == [io.present("key", 0), io.present("value", 0)]  # outputs by name: no Identity
    assert {a.name: a.i for a in gqa.attribute}["do_rotary"] == 1
    assert art.decoder_form == "contrib" and art.details["decoder_form"] == "contrib"
    assert open_artifact(root / "standard").decoder_form == "standard"
    dims = {v["name"]: v["dims"] for v in art.details["graphs"]["decoder"]["inputs"]}
    assert dims[io.past("key", 0)][2] == CONTEXT and dims[io.TOTAL_LENGTH] == []


def test_prefill_and_decode_logits_match_reference_and_standard_form(trio):
    """Step by step (a prefill over text before and after the image, then 24 decode steps):
    logits of the three within fp32 tolerance, and the buffer's slots hold the reference's K/V."""
    contrib, standard, ref, ckpt, _ = trio
    feats = ref.vision(_pixels(ckpt)[None])
    ids = ckpt.tokenizer.encode(VICUNA.prompt([("<image>\nWhat is shown?", None)]))
    text, positions, start = text_layout(ids, feats.shape[1])
    visuals = [b.visual_kv(feats, start) for b in (contrib, standard, ref)]
    caches = [TextCache.empty(ckpt.config.text, 1, "fp32")] * 3
    step_ids, step_pos = np.array([text]), np.array([positions])
    for _ in range(25):
        outs = [b.forward(step_ids, step_pos, c, v) for b, c, v in zip((contrib, standard, ref), caches, visuals)]
        (got, caches[0]), (std, caches[1]), (want, caches[2]) = outs
        assert _err(got, want) < FP32_BOUND and _err(std, want) < FP32_BOUND
        step_ids = want[:, -1:].argmax(-1).astype(np.int64)
        step_pos = step_pos[:, -1:] + 1
    assert isinstance(caches[0], SlotCache)
    assert np.array_equal(caches[0].positions, caches[2].positions)
    for mine, theirs in zip(caches[0].keys + caches[0].values, caches[2].keys + caches[2].values):
        assert _err(mine, theirs) < FP32_BOUND


def _tokens(backend, ckpt, requests):
    return [r.tokens for r in Session(backend, ckpt.tokenizer, VICUNA).generate_batch(requests)]


def test_same_greedy_tokens_alone_batched_padded_and_with_several_images(trio):
    contrib, standard, ref, ckpt, _ = trio
    one, other = _pixels(ckpt), _pixels(ckpt, seed=3)
    cases = [
        [Request("Describe the picture.", one, max_new_tokens=24)],
        [Request("Hello there", None, max_new_tokens=12)],
        # one image for the batch, prompts of different lengths (right padding)
        [Request("What?", one, max_new_tokens=10), Request("What is in it, in some detail please?", one,
                                                           max_new_tokens=14)],
        # two images and a text-only row in one batch; rows finish at different steps
        [Request("What is it?", one, max_new_tokens=12), Request("Hi", None, max_new_tokens=5),
         Request("And this one, what is it?", other, max_new_tokens=9)],
    ]
    for requests in cases:
        want = _tokens(ref, ckpt, requests)
        assert _tokens(contrib, ckpt, requests) == want
        assert _tokens(standard, ckpt, requests) == want


def _chat(backend, ckpt, interleave: bool):
    session = Session(backend, ckpt.tokenizer, VICUNA)
    chat = session.chat(_pixels(ckpt))
    answers = [chat.ask("What is shown?", max_new_tokens=10).tokens]
    if interleave:  # another request takes the K/V buffer between the turns
        session.generate(Request("Something else entirely", _pixels(ckpt, seed=5), max_new_tokens=6))
    answers.append(chat.ask("Tell me more about it.", max_new_tokens=10).tokens)
    return answers


def test_multi_turn_chat_and_reused_prefix_give_the_reference_tokens(trio):
    contrib, _, ref, ckpt, _ = trio
    want = _chat(ref, ckpt, False)
    assert _chat(contrib, ckpt, False) == want
    # a conversation holding its cache while another request reuses the buffer keeps its K/V
    assert _chat(contrib, ckpt, True) == want
    # a second request about the same image reuses the prompt's text before the image
    session = Session(contrib, ckpt.tokenizer, VICUNA)
    first = session.generate(Request("What is shown?", _pixels(ckpt), max_new_tokens=8))
    again = session.generate(Request("What is shown here?", _pixels(ckpt), max_new_tokens=8))
    assert session._prefixes and again.tokens == Session(ref, ckpt.tokenizer, VICUNA).generate(
        Request("What is shown here?", _pixels(ckpt), max_new_tokens=8)).tokens
    assert first.tokens == want[0][:8]


def test_decode_updates_one_buffer_in_place(trio):
    contrib, _, _, ckpt, _ = trio
    slots = contrib._slots
    buffer = slots.buffer
    before = buffer.copy()
    cfg = ckpt.config.text
    logits, cache = contrib.forward(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]), TextCache.empty(cfg, 1, "fp32"), None)
    binding_count = len(slots._steps)
    views = []
    for step in range(4):
        logits, cache = contrib.forward(np.array([[9]]), np.array([[3 + step]]), cache, None)
        views.append(logits)
    assert slots.buffer is buffer and all(v is cache.lineage.logits for v in views)
    assert len(slots._steps) == max(binding_count, 1)  # one binding per batch size, made once
    layer0 = buffer[0, 0, 0]  # keys of row 0: slots 0..6 written in place, the rest untouched
    assert np.abs(layer0[:, :7] - before[0, 0, 0][:, :7]).max() > 0
    assert np.array_equal(layer0[:, 7:], before[0, 0, 0][:, 7:])
    assert cache.lineage.data.base is buffer or cache.lineage.data is buffer  # a view, not a copy


def test_refusals(trio, tmp_path, tiny_gqa_dir, tiny_dir):
    contrib, _, _, ckpt, _ = trio
    cfg = ckpt.config.text
    with pytest.raises(SaisaError, match="exceeds the 4 rows"):
        contrib.forward(np.zeros((5, 1), np.int64), np.zeros((5, 1), np.int64), TextCache.empty(cfg, 5, "fp32"), None)
    with pytest.raises(SaisaError, match="beyond the artifact's context"):
        contrib.forward(np.zeros((1, 1), np.int64), np.full((1, 1), CONTEXT), TextCache.empty(cfg, 1, "fp32"), None)
    with pytest.raises(SaisaError, match="head_dim 8 is not a multiple of 16"):
        export_artifact(open_checkpoint(tiny_gqa_dir), tmp_path / "a", ExportOptions(decoder_form="contrib"))
    with pytest.raises(SaisaError, match="runs fp32"):
        export_artifact(open_checkpoint(tiny_dir), tmp_path / "b", ExportOptions(decoder_form="contrib", dtype="fp16"))
    with pytest.raises(SaisaError, match="--decoder-form 'fused' is unknown"):
        export_artifact(open_checkpoint(tiny_dir), tmp_path / "c", ExportOptions(decoder_form="fused"))


def test_cli_flag_and_tensorrt_refusal(tmp_path, tiny_dir):
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(out), "--decoder-form", "contrib",
                                  "--max-context", "700"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / MANIFEST_NAME).read_text())["details"]["decoder_form"] == "contrib"
    run = CliRunner().invoke(main, ["run", str(out), "--image", str(DEMO_IMAGE), "--prompt", "What?",
                                    "--max-new-tokens", "4", "--json"])
    assert run.exit_code == 0, run.output
    from saisa_edge.plugins.build import build_here

    with pytest.raises(SaisaError, match="export with --decoder-form standard"):
        build_here(open_artifact(out), tmp_path / "engines", "auto", "auto", 1, None, False)
    bad = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(tmp_path / "x"), "--decoder-form", "gqa"])
    assert bad.exit_code != 0 and "--decoder-form 'gqa' is unknown" in bad.output and "Traceback" not in bad.output


@pytest.fixture(scope="module")
def weight_only(trio, tmp_path_factory):
    """Each weight-only precision of the contrib and the standard artifact (calibration's MatMulNBits rewrite)."""
    from saisa_edge.calibration.calibrate import calibrate
    from saisa_edge.calibration.data import pairs
    from saisa_edge.calibration.recipe import make_recipe

    *_, ckpt, root = trio
    data = pairs(ckpt.config.vision, 2)
    out = {}
    for precision in ("int8_wo", "int4_rtn", "int4_awq"):  # AWQ runs the contrib graph with its taps
        for form in ("contrib", "standard"):
            out[precision, form] = tmp_path_factory.mktemp("wo") / f"{precision}-{form}"
            calibrate(root / form, out[precision, form], make_recipe(precision, "cpu", keep=(), group_size=16),
                      data, decode_steps=1)
    return out


def test_weight_only_contrib_artifacts_are_matmulnbits_and_agree_with_the_standard_form(trio, weight_only):
    *_, ckpt, _ = trio
    layers = ckpt.config.text.num_hidden_layers
    for precision in ("int8_wo", "int4_rtn", "int4_awq"):
        art = open_artifact(weight_only[precision, "contrib"])
        assert art.decoder_form == "contrib" and art.precision == precision
        ops = [n.op_type for n in onnx.load(str(art.graph("decoder"))).graph.node]
        assert ops.count("MatMulNBits") == 4 * layers + 1 and ops.count("GroupQueryAttention") == layers
        contrib, standard = (OrtBackend(open_artifact(weight_only[precision, f])) for f in ("contrib", "standard"))
        requests = [Request("Describe the picture.", _pixels(ckpt), max_new_tokens=12),
                    Request("Hello", None, max_new_tokens=6)]
        if precision != "int4_awq":  # the same codes and scales: the same model, so the same tokens
            assert _tokens(contrib, ckpt, requests) == _tokens(standard, ckpt, requests)
        else:  # AWQ's searches see fp32 activations that differ in the last bits: it may pick other scales
            float_contrib = trio[0]
            ids, pos = np.array([[3, 8, 2, 6, 1, 4]]), np.arange(6)[None]
            got, want = (b.forward(ids, pos, TextCache.empty(ckpt.config.text, 1, "fp32"), None)[0].ravel()
                         for b in (contrib, float_contrib))
            assert 0.97 < float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) < 1.0


@pytest.mark.slow
def test_smol_contrib_form_gives_the_standard_forms_and_the_references_tokens(smol_dir, tmp_path):
    """Real sizes (GQA 9/3 heads of 64, 30 layers, 576 visual tokens), fp32: the same greedy
    tokens as the standard form and the PyTorch reference, alone and in a padded batch."""
    from saisa_edge.backends import open_model

    source = open_checkpoint(smol_dir)
    for form in ("contrib", "standard"):
        export_artifact(source, tmp_path / form, ExportOptions(decoder_form=form, max_context=1024))
    contrib, tok = open_model(tmp_path / "contrib")
    standard, _ = open_model(tmp_path / "standard")
    reference, _ = open_model(smol_dir, "torch", dtype="fp32")
    ckpt = load_checkpoint(smol_dir)
    template = TEMPLATES[tok.default_conv_mode()]
    pixels = preprocess(load_image(DEMO_IMAGE), ckpt.config.vision)
    requests = [Request("What is in the picture?", pixels, max_new_tokens=24)]
    batch = [Request("Describe it.", pixels, max_new_tokens=12),
             Request("What is the capital of France?", None, max_new_tokens=16)]
    for case in (requests, batch):
        want = [r.tokens for r in Session(reference, tok, template).generate_batch(case)]
        assert [r.tokens for r in Session(contrib, tok, template).generate_batch(case)] == want
        assert [r.tokens for r in Session(standard, tok, template).generate_batch(case)] == want


def test_requests_from_several_threads_share_the_buffer_safely(trio):
    """A server's threads take turns on the one buffer: each request keeps its own K/V and logits."""
    from concurrent.futures import ThreadPoolExecutor

    contrib, _, ref, ckpt, _ = trio
    requests = [Request(q, _pixels(ckpt, seed=s), max_new_tokens=16)
                for q, s in (("What is shown?", None), ("Describe it all.", 7), ("Colours?", 8))]
    want = [Session(ref, ckpt.tokenizer, VICUNA).generate(r).tokens for r in requests]
    session = Session(contrib, ckpt.tokenizer, VICUNA)
    with ThreadPoolExecutor(3) as pool:
        assert [r.tokens for r in pool.map(session.generate, requests * 2)] == want * 2


@pytest.fixture(scope="module")
def tied_heads(tmp_path_factory):
    """A tied-embedding checkpoint (SmolLM2's LM head is its embedding) in the contrib form, weight-only
    calibrated with the head kept in float (the default) and with it quantized (`--keep vision`)."""
    from saisa_edge.calibration.calibrate import calibrate
    from saisa_edge.calibration.data import pairs
    from saisa_edge.calibration.recipe import make_recipe

    root = tmp_path_factory.mktemp("tied")
    spec = tiny(seed=4, num_attention_heads=6, num_key_value_heads=2, hidden_size=96, tie_word_embeddings=True)
    ckpt_dir = write_checkpoint(spec, root / "ckpt", dtype="fp32", preset="tiny")
    export_artifact(open_checkpoint(ckpt_dir), root / "fp32", ExportOptions(decoder_form="contrib", max_context=256))
    ckpt = load_checkpoint(ckpt_dir)
    data = pairs(ckpt.config.vision, 1)
    out = {}
    for precision in ("int8_wo", "int4_rtn"):
        for keep in (("lm_head", "vision"), ("vision",)):
            out[precision, keep] = root / f"{precision}-{len(keep)}"
            calibrate(root / "fp32", out[precision, keep], make_recipe(precision, "cpu", keep=keep, group_size=16),
                      data, decode_steps=0)
    return ckpt, root / "fp32", out


def test_weight_only_quantizes_the_tied_lm_head_on_its_own_copy(tied_heads):
    """Without `lm_head` in --keep the head is a MatMulNBits on its own quantized copy of the tied
    embedding (the Transpose gone), the embedding's Gather keeps reading the float table, the
    manifest says so, and the logits stay close to the float head's."""
    ckpt, fp32, out = tied_heads
    layers = ckpt.config.text.num_hidden_layers
    ids, pos = np.array([[3, 8, 2, 6, 1, 4, 7, 9, 5, 11]]), np.arange(10)[None]

    def logits(folder):
        backend = OrtBackend(open_artifact(folder))
        return backend.forward(ids, pos, TextCache.empty(ckpt.config.text, 1, "fp32"), None)[0][0]

    want = logits(fp32)
    for precision in ("int8_wo", "int4_rtn"):
        kept, quantized = out[precision, ("lm_head", "vision")], out[precision, ("vision",)]
        art = open_artifact(quantized)
        model = onnx.load(str(art.graph("decoder")))
        init = {t.name: t for t in model.graph.initializer}
        head = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "lm_head.weight.nbits"]
        assert len(head) == 1 and {a.name: a.i for a in head[0].attribute}["N"] == ckpt.config.text.vocab_size
        gather = next(n for n in model.graph.node if n.op_type == "Gather")
        assert gather.input[0] == "model.embed_tokens.weight"
        assert init[gather.input[0]].data_type == onnx.TensorProto.FLOAT
        assert "Transpose" not in [n.op_type for n in model.graph.node]
        assert art.details["quantization"]["recipe"]["keep"] == ["vision"]
        assert art.details["graphs"]["decoder"]["quantized_linears"] == 4 * layers + 1
        kept_art = open_artifact(kept)
        assert kept_art.details["quantization"]["recipe"]["keep"] == ["lm_head", "vision"]
        assert kept_art.details["graphs"]["decoder"]["quantized_linears"] == 4 * layers
        with_head, without = logits(quantized), logits(kept)
        assert not np.array_equal(with_head, without)  # the head's quantization shows in the logits
        for got in (with_head, without):
            cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
            assert cosine.min() > (0.999 if precision == "int8_wo" else 0.98), (precision, cosine.min())
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8
