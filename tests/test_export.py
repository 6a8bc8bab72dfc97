"""ONNX export: the three graphs in ONNX Runtime equal the PyTorch `split` reference, every
attention variant, batching with padding, fp16, external data, and refusals of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import numpy as np
from click.testing import CliRunner

from saisa_edge.artifacts import MANIFEST_NAME, open_artifact
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.export import naavit
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.kv import PAD_POSITION, TextCache, text_layout
from tests.conftest import DEMO_IMAGE, generate
from saisa_edge.runtime.sampling import SamplingParams

FP32_BOUND = 1e-4  # ONNX Runtime reorders fp32 sums; logits are O(1)


def _export(ckpt_dir, out, **options):
    export_artifact(open_checkpoint(ckpt_dir), out, ExportOptions(**options))
    return OrtBackend(open_artifact(out))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_dir, tiny_gqa_dir):
    root = tmp_path_factory.mktemp("artifacts")
    return {"mha": _export(tiny_dir, root / "mha"), "gqa": _export(tiny_gqa_dir, root / "gqa")}


@pytest.fixture(params=["mha", "gqa"])
def pair(request, artifacts, tiny_ckpt, tiny_gqa_ckpt):
    ckpt = tiny_ckpt if request.param == "mha" else tiny_gqa_ckpt
    return artifacts[request.param], TorchBackend(ckpt), ckpt


def _pixels(ckpt) -> np.ndarray:
    return preprocess(load_image(DEMO_IMAGE), ckpt.config.vision)[None]


def _err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


def _ids(rows) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def test_every_graph_and_32_decode_steps_match(pair):
    ort_b, ref, ckpt = pair
    pixels = _pixels(ckpt)
    feats = ref.vision(pixels)
    assert _err(ort_b.vision(pixels), feats) < FP32_BOUND
    ids = ckpt.tokenizer.encode(TEMPLATES["vicuna_v1"].prompt([("<image>\nWhat is shown?", None)]))
    text, positions, start = text_layout(ids, feats.shape[1])
    vis_ref, vis_ort = ref.visual_kv(feats, start), ort_b.visual_kv(feats, start)
    for k_ref, k_ort, v_ref, v_ort in zip(vis_ref.keys, vis_ort.keys, vis_ref.values, vis_ort.values):
        assert _err(k_ort, k_ref) < FP32_BOUND and _err(v_ort, v_ref) < FP32_BOUND
    cache_ref = cache_ort = TextCache.empty(ckpt.config.text, 1, "fp32")
    step_ids, step_pos = _ids([text]), _ids([positions])
    for _ in range(33):  # the prefill, then 32 decode steps fed the reference's greedy tokens
        logits_ref, cache_ref = ref.forward(step_ids, step_pos, cache_ref, vis_ref)
        logits_ort, cache_ort = ort_b.forward(step_ids, step_pos, cache_ort, vis_ort)
        assert _err(logits_ort, logits_ref) < FP32_BOUND
        assert np.array_equal(cache_ort.positions, cache_ref.positions)
        step_ids = logits_ref[:, -1:].argmax(-1).astype(np.int64)
        step_pos = step_pos[:, -1:] + 1


def test_greedy_generation_same_tokens(pair):
    ort_b, ref, ckpt = pair
    pixels = _pixels(ckpt)[0]
    t = TEMPLATES["vicuna_v1"]
    a = generate(ort_b, ckpt.tokenizer, t, "Describe the picture.", pixels, SamplingParams(), 32)
    b = generate(ref, ckpt.tokenizer, t, "Describe the picture.", pixels, SamplingParams(), 32)
    assert a.tokens == b.tokens and len(a.tokens) == 32 and a.backend == "onnxruntime"
    c = generate(ort_b, ckpt.tokenizer, t, "Hello there", None, SamplingParams(), 8)  # no image: N = 0
    assert c.tokens == generate(ref, ckpt.tokenizer, t, "Hello there", None, SamplingParams(), 8).tokens


def test_batch_shares_one_image_and_pads_different_lengths(artifacts, tiny_ckpt):
    """Two prompts of different lengths about one image: Bv = 1, right padding by PAD_POSITION."""
    ort_b, ref = artifacts["mha"], TorchBackend(tiny_ckpt)
    feats = ref.vision(_pixels(tiny_ckpt))
    t = TEMPLATES["vicuna_v1"]
    prompts = [tiny_ckpt.tokenizer.encode(t.prompt([(q, None)])) for q in ("<image>\nWhat?", "<image>\nWhat is in it, in detail?")]
    layouts = [text_layout(p, feats.shape[1]) for p in prompts]
    assert layouts[0][2] == layouts[1][2]  # same image start: one visual K/V serves both
    visual = ort_b.visual_kv(feats, layouts[0][2])
    width = max(len(x[0]) for x in layouts)
    ids = _ids([x[0] + [0] * (width - len(x[0])) for x in layouts])
    pos = _ids([x[1] + [PAD_POSITION] * (width - len(x[1])) for x in layouts])
    logits, cache = ort_b.forward(ids, pos, TextCache.empty(tiny_ckpt.config.text, 2, "fp32"), visual)
    for row, (text, positions, _) in enumerate(layouts):
        alone, _ = ref.forward(_ids([text]), _ids([positions]),
                               TextCache.empty(tiny_ckpt.config.text, 1, "fp32"), ref.visual_kv(feats, layouts[0][2]))
        assert _err(logits[row, : len(text)], alone[0]) < FP32_BOUND
    # a decode step for both rows, each at its own next position, over the padded cache
    nxt = _ids([[5], [7]])
    npos = _ids([[layouts[0][1][-1] + 1], [layouts[1][1][-1] + 1]])
    step, _ = ort_b.forward(nxt, npos, cache, visual)
    for row, (text, positions, _) in enumerate(layouts):
        c = TextCache.empty(tiny_ckpt.config.text, 1, "fp32")
        v = ref.visual_kv(feats, layouts[0][2])
        _, c = ref.forward(_ids([text]), _ids([positions]), c, v)
        alone, _ = ref.forward(nxt[row : row + 1], npos[row : row + 1], c, v)
        assert _err(step[row], alone[0]) < FP32_BOUND


@pytest.mark.parametrize("attention, opset", [("native", 23), ("custom", 18), ("custom", 23)])
def test_attention_variants_and_opsets_run(tmp_path, tiny_gqa_dir, tiny_gqa_ckpt, attention, opset):
    ort_b = _export(tiny_gqa_dir, tmp_path / "a", attention=attention, opset=opset)
    ref = TorchBackend(tiny_gqa_ckpt)
    pixels = _pixels(tiny_gqa_ckpt)[0]
    t = TEMPLATES["vicuna_v1"]
    assert (generate(ort_b, tiny_gqa_ckpt.tokenizer, t, "What?", pixels, SamplingParams(), 16).tokens
            == generate(ref, tiny_gqa_ckpt.tokenizer, t, "What?", pixels, SamplingParams(), 16).tokens)
    model = onnx.load(str(tmp_path / "a" / "decoder.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert ("Attention" in ops) == (attention == "native") and (naavit.OP_TYPE in ops) == (attention != "native")


def test_plugin_variant_is_the_bare_node(tmp_path, tiny_dir):
    export_artifact(open_checkpoint(tiny_dir), tmp_path / "p", ExportOptions(attention="plugin"))
    model = onnx.load(str(tmp_path / "p" / "decoder.onnx"))
    assert not model.functions
    nodes = [n for n in model.graph.node if n.op_type == naavit.OP_TYPE]
    assert len(nodes) == 2 and all(n.domain == naavit.DOMAIN for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["num_heads"] == 4 and attrs["num_kv_heads"] == 4 and attrs["head_size"] == 16
    assert attrs["plugin_namespace"] == b"saisa" and attrs["plugin_version"] == b"1"
    assert abs(attrs["scale"] - 0.25) < 1e-7
    assert len(model.graph.input) == 4 + 2 * 4  # ids, positions, past positions, visual end; 4 K/V per layer
    open_artifact(tmp_path / "p")  # a complete artifact, for TensorRT with the plugin


def test_fp16_export_agrees(tmp_path, tiny_gqa_dir, tiny_gqa_ckpt):
    ort16 = _export(tiny_gqa_dir, tmp_path / "h", dtype="fp16")
    ref = TorchBackend(tiny_gqa_ckpt)
    feats = ref.vision(_pixels(tiny_gqa_ckpt))
    ids = tiny_gqa_ckpt.tokenizer.encode(TEMPLATES["vicuna_v1"].prompt([("<image>\nWhat is shown here?", None)]))
    text, positions, start = text_layout(ids, feats.shape[1])
    cfg = tiny_gqa_ckpt.config.text
    want, _ = ref.forward(_ids([text]), _ids([positions]), TextCache.empty(cfg, 1, "fp32"),
                          ref.visual_kv(feats, start))
    feats16 = ort16.vision(_pixels(tiny_gqa_ckpt))
    assert feats16.dtype == np.float16
    got, cache = ort16.forward(_ids([text]), _ids([positions]), TextCache.empty(cfg, 1, "fp16"),
                               ort16.visual_kv(feats16, start))
    assert cache.keys[0].dtype == np.float16 and got.dtype == np.float32
    cosine = (got[0] * want[0]).sum(-1) / (np.linalg.norm(got[0], axis=-1) * np.linalg.norm(want[0], axis=-1))
    top1 = (got[0].argmax(-1) == want[0].argmax(-1)).mean()
    assert cosine.min() > 0.999 and top1 >= 0.95, (cosine.min(), top1)


def test_external_data(tmp_path, tiny_dir, tiny_ckpt):
    export_artifact(open_checkpoint(tiny_dir), tmp_path / "x", ExportOptions(), embed_limit=100_000)
    manifest = json.loads((tmp_path / "x" / MANIFEST_NAME).read_text())
    assert manifest["details"]["graphs"]["decoder"]["external_data"] == "decoder.onnx.data"
    assert (tmp_path / "x" / "decoder.onnx").stat().st_size < 100_000
    ort_b = OrtBackend(open_artifact(tmp_path / "x"))
    pixels = _pixels(tiny_ckpt)[0]
    t = TEMPLATES["vicuna_v1"]
    assert (generate(ort_b, tiny_ckpt.tokenizer, t, "Hi", pixels, SamplingParams(), 8).tokens
            == generate(TorchBackend(tiny_ckpt), tiny_ckpt.tokenizer, t, "Hi", pixels, SamplingParams(), 8).tokens)


def test_manifest_contents(tmp_path, tiny_dir):
    export_artifact(open_checkpoint(tiny_dir), tmp_path / "m", ExportOptions(max_context=512))
    m = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    d = m["details"]
    assert m["kind"] == "onnx-artifact" and {"torch", "onnx", "onnxruntime"} <= set(m["libraries"])
    assert d["config"]["text"]["num_hidden_layers"] == 2 and d["max_context"] == 512
    assert d["conv_mode"] == "vicuna_v1" and d["templates"]["vicuna_v1"]["sep2"] == "</s>"
    assert d["image"]["crop_size"] == 56 and d["image"]["aspect_ratio"] == "pad"
    dec = d["graphs"]["decoder"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:4] == ["input_ids", "position_ids", "past_positions", "visual_end"] and "visual_key.1" in names
    assert {"name": "logits", "dtype": "float", "dims": ["batch", "query_length", 480]} in dec["outputs"]
    assert {"tokenizer.model", "tokenizer_config.json", "decoder.onnx", "vision.onnx", "visual_kv.onnx"} <= set(m["files"])
    for g in ("vision", "visual_kv", "decoder"):
        onnx.checker.check_model(str(tmp_path / "m" / f"{g}.onnx"), full_check=True)
    assert open_artifact(tmp_path / "m").config == open_checkpoint(tiny_dir).config


# --- refusals -------------------------------------------------------------------------------


def test_folder_rules(tmp_path, tiny_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SaisaError, match="already exists; pass --force"):
        export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    with pytest.raises(SaisaError, match="not an earlier output of `saisa-edge export`"):
        export_artifact(open_checkpoint(tiny_dir), out, ExportOptions(), force=True)
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())  # an empty folder is filled
    with pytest.raises(SaisaError, match="already exists; pass --force"):
        export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions(max_context=512), force=True)  # an earlier export
    assert open_artifact(out).max_context == 512


def test_interrupted_export_leaves_nothing(tmp_path, tiny_dir, monkeypatch):
    from saisa_edge.export import artifact

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "build_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(open_checkpoint(tiny_dir), tmp_path / "i", ExportOptions())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(opset=12), "--opset 12 is not supported"),
        (dict(dtype="int4"), "--dtype 'int4' is not supported"),
        (dict(attention="flash"), "--attention 'flash' is unknown"),
        (dict(attention="native", opset=19), "--attention native needs --opset 23"),
        (dict(max_context=10), "--max-context 10: must exceed the 16 visual tokens"),
        (dict(max_context=10**6), "at most the model's max_position_embeddings 2048"),
    ],
)
def test_bad_options(tmp_path, tiny_dir, options, message):
    with pytest.raises(SaisaError, match=message):
        export_artifact(open_checkpoint(tiny_dir), tmp_path / "b", ExportOptions(**options))
    assert not (tmp_path / "b").exists()


def test_damaged_artifacts_are_refused(tmp_path, tiny_dir):
    out = tmp_path / "d"
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    copy = shutil.copytree(out, tmp_path / "c1")
    (copy / "visual_kv.onnx").unlink()
    with pytest.raises(SaisaError, match="visual_kv.onnx: missing from the folder"):
        open_artifact(copy)
    copy = shutil.copytree(out, tmp_path / "c2")
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(SaisaError, match="decoder.onnx: does not match its checksum"):
        open_artifact(copy)
    copy = shutil.copytree(out, tmp_path / "c3")
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["manifest_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SaisaError, match="manifest_version 99; this saisa-edge reads version 1"):
        open_artifact(copy)


def test_bf16_export_checks_and_is_refused_by_cpu_runtime(tmp_path, tiny_dir):
    export_artifact(open_checkpoint(tiny_dir), tmp_path / "b", ExportOptions(dtype="bf16"))
    model = onnx.load(str(tmp_path / "b" / "decoder.onnx"))
    assert model.graph.initializer[0].data_type == onnx.TensorProto.BFLOAT16
    with pytest.raises(SaisaError, match="bf16 artifact cannot run on ONNX Runtime's CPU provider"):
        OrtBackend(open_artifact(tmp_path / "b"))


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_export_and_run(tmp_path, tiny_dir):
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(out), "--attention", "native",
                                  "--max-context", "512"])
    assert r.exit_code == 0, r.output
    details = json.loads((out / MANIFEST_NAME).read_text())["details"]
    assert details["opset"] == 23 and details["max_context"] == 512
    args = ["run", str(out), "--image", str(DEMO_IMAGE), "--prompt", "What is shown?", "--max-new-tokens", "6", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)
    b = json.loads(CliRunner().invoke(main, ["run", str(tiny_dir)] + args[2:]).stdout)
    assert a["backend"] == "onnxruntime" and b["backend"] == "torch"
    assert a["tokens"] == b["tokens"] and a["prompt_tokens"] == b["prompt_tokens"]
    assert set(a) == set(b) and a["visual_cache"] == "miss"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--opset", "30"], "--opset 30 is not supported"),
        (["--dtype", "fp8"], "--dtype 'fp8' is not supported"),
        (["--vision-tower", "/nonexistent"], "--vision-tower /nonexistent: not a CLIP vision folder"),
    ],
)
def test_cli_export_errors(tmp_path, tiny_dir, args, message):
    r = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(tmp_path / "e")] + args)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.output


def test_cli_run_artifact_flag_conflicts(tmp_path, tiny_dir):
    out = tmp_path / "a"
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "x", "--dtype", "fp16"])
    assert r.exit_code == 2 and "exported in fp32" in r.stderr
    r = CliRunner().invoke(main, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "z")])
    assert r.exit_code == 2 and "not a folder" in r.stderr
