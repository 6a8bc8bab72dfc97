"""The `smol` preset: real SmolLM2-135M-Instruct weights, tokenizer and chat template,
CLIP ViT-L/14-336 shape. Slow: the checkpoint is ~0.9 GB and CLIP-L runs on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.checkpoint.smollm2 import gguf_path, read_llama_gguf
from saisa_edge.cli import main
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.model.equivalence import text_as_image_vs_transformers, vision_vs_transformers
from tests.conftest import DEMO_IMAGE, generate
from saisa_edge.runtime.sampling import SamplingParams

pytestmark = pytest.mark.slow
KV_FACTOR = 2.0


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_checkpoint(smol_dir)


def test_gguf_import_equals_transformers_gguf_loader():
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_path()
    fields, ours = read_llama_gguf(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ours) == set(theirs) and fields["num_key_value_heads"] == 3 and fields["tie_word_embeddings"]
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, torch.as_tensor(theirs[name]).float(), atol=0, rtol=0)


def test_smol_layout(smol_dir, smol):
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg["mm_vision_tower"] == "clip-vision-tower"
    assert smol.config.num_visual_tokens == 576 and smol.config.vision.hidden_size == 1024
    assert smol.config.text.num_key_value_heads == 3 and smol.config.text.num_attention_heads == 9
    assert smol.tokenizer.default_conv_mode() == "chatml_direct"
    assert "{% for message in messages %}" in (smol_dir / "chat_template.jinja").read_text()


def test_real_weights_answer(smol):
    r = generate(TorchBackend(smol), smol.tokenizer, TEMPLATES["chatml_direct"], "What is the capital of France?", None, SamplingParams(), 24)
    assert "Paris" in r.text and r.finish_reason == "stop"


def test_text_as_image_on_real_weights(smol):
    """SmolLM2's own hidden states of a passage, fed as the image, reproduce transformers' LLaMA."""
    t = TEMPLATES["chatml_direct"]
    before, after = t.prompt([("<image>\nSummarise the passage.", None)]).split("<image>")
    tok = smol.tokenizer.tokenize
    passage = tok("Paris is the capital and largest city of France, on the river Seine.")
    errors = text_as_image_vs_transformers(smol.lm, tok(before), passage, tok(after))
    assert max(errors.values()) < 5e-4, errors  # measured 5e-5 on fp32 logits of magnitude ~20


def test_clip_l_equals_transformers(smol):
    pixels = torch.from_numpy(preprocess(load_image(DEMO_IMAGE), smol.config.vision))[None]
    assert vision_vs_transformers(smol.vision, smol.vision_tower_path, smol.config, pixels) < 1e-4


def test_cli_answers_about_the_bundled_image(smol_dir):
    data = _run_json(smol_dir, "--image", str(DEMO_IMAGE), "--prompt", "What is in the picture?", "--max-new-tokens", "8")
    assert data["conv_mode"] == "chatml_direct" and data["visual_cache"] == "miss"
    assert data["prompt_tokens"].count(-200) == 1 and 1 <= len(data["tokens"]) <= 8


def _run_json(source, *args: str) -> dict:
    r = CliRunner().invoke(main, ["run", str(source), *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def smol_artifact(smol_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-art") / "art"
    r = CliRunner().invoke(main, ["export", str(smol_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("source", ["smol_dir", "smol_artifact"])
def test_fluent_with_the_image_attached(source, request):
    """The fitted image path reads like a passage of text ending in a line break: SmolLM2 answers
    the question after it, on PyTorch and ONNX Runtime (the demo image is not a fit image)."""
    data = _run_json(request.getfixturevalue(source), "--image", str(DEMO_IMAGE),
                     "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert data["visual_cache"] == "miss" and data["backend"] == ("torch" if source == "smol_dir" else "onnxruntime")
    assert "Paris" in data["text"], data["text"]


def _text_kv(smol, prompt: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Each layer's text K/V for a prompt, the first token (the attention sink) left out."""
    from saisa_edge.model import split

    ids = smol.tokenizer.encode(TEMPLATES["chatml_direct"].prompt([(prompt, None)]))
    _, cache = split.forward_text(smol.lm, torch.tensor([ids]), torch.arange(len(ids))[None],
                                  split.TextCache.empty(smol.config.text, 1, torch.float32))
    return tuple(k[:, :, 1:] for k in cache.keys), tuple(v[:, :, 1:] for v in cache.values)


def _visual_kv(smol, image):
    from saisa_edge.model import split

    pixels = torch.as_tensor(preprocess(load_image(image), smol.config.vision))[None]
    with torch.no_grad():
        return split.visual_kv(smol.lm, smol.vision(pixels), 11)


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def test_visual_kv_differ_between_images_and_read_like_text(smol):
    """The fit image (demo.png) and two held-out images: their K/V differ, and per layer their
    RMS is within KV_FACTOR of the text K/V's (the random projectors were off by orders of magnitude)."""
    from saisa_edge.checkpoint.presets import FIT_IMAGES

    held_out = [DEMO_IMAGE.parent / "validation" / name for name in ("03-table_objects.png", "05-clock.png")]
    assert DEMO_IMAGE in FIT_IMAGES and not set(held_out) & set(FIT_IMAGES)
    kvs = [_visual_kv(smol, image) for image in [DEMO_IMAGE, *held_out]]
    keys, values = _text_kv(smol, "Paris is the capital and largest city of France, on the river Seine. "
                                  "Name three colours, count to five and describe a clock.")
    for layer in range(len(keys)):
        for a, b in zip(kvs, kvs[1:]):
            ka, kb, va, vb = a.keys[layer], b.keys[layer], a.values[layer], b.values[layer]
            assert _rms(ka - kb) > 0.05 * _rms(ka) and _rms(va - vb) > 0.05 * _rms(va), layer
        for kv in kvs:
            for visual, text in ((kv.keys[layer], keys[layer]), (kv.values[layer], values[layer])):
                assert 1 / KV_FACTOR < _rms(visual) / _rms(text) < KV_FACTOR, (layer, _rms(visual), _rms(text))


def test_smol_export_runs_in_onnxruntime(smol_dir, smol, tmp_path):
    """Real sizes through export: weights streamed to external data, same greedy tokens as PyTorch."""
    from saisa_edge.backends.ort import OrtBackend
    from saisa_edge.artifacts import open_artifact
    from saisa_edge.checkpoint.loader import open_checkpoint
    from saisa_edge.export.artifact import ExportOptions, export_artifact

    out = tmp_path / "art"
    details = export_artifact(open_checkpoint(smol_dir), out, ExportOptions())
    assert details["graphs"]["decoder"]["external_data"] == "decoder.onnx.data"
    ort_b = OrtBackend(open_artifact(out))
    t = TEMPLATES["chatml_direct"]
    answer = generate(ort_b, smol.tokenizer, t, "What is the capital of France?", None, SamplingParams(), 24)
    assert "Paris" in answer.text
    pixels = preprocess(load_image(DEMO_IMAGE), smol.config.vision)
    a = generate(ort_b, smol.tokenizer, t, "What is in the picture?", pixels, SamplingParams(), 8)
    b = generate(TorchBackend(smol), smol.tokenizer, t, "What is in the picture?", pixels, SamplingParams(), 8)
    assert a.tokens == b.tokens
