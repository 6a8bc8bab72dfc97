"""LLaMA-3.1-style SAISA checkpoints (issue 18): the real Llama 3 tokenizer, GQA, a 128,256-token vocabulary,
rope_theta 500000 with `llama3` or `linear` rope_scaling, through every path: the PyTorch text path against
transformers' LlamaForCausalLM, `split` against `original`, ONNX export against PyTorch, and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.checkpoint.presets import write_checkpoint
from saisa_edge.cli import main
from saisa_edge.config import RopeScaling, parse_config
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.model.equivalence import greedy, split_vs_original, text_vs_transformers
from saisa_edge.model.rope import inverse_frequencies
from tests.conftest import DEMO_IMAGE
from tests.llama3 import LINEAR_SCALING, LLAMA3_SCALING, llama31
from tests.test_reference import FP32_BOUND, features_of

SCALINGS = {"llama3": LLAMA3_SCALING, "linear": LINEAR_SCALING}
QUESTION = "What is in the image? Describe the colours, the shapes and where each one sits, in detail, please."


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def llama31_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / f"llama31-{request.param}"
    return write_checkpoint(llama31(SCALINGS[request.param]), out, dtype="fp32", preset="llama3.1-test")


@pytest.fixture(scope="module")
def llama31_ckpt(llama31_dir):
    return load_checkpoint(llama31_dir)


def _ids(ckpt, question: str, image: bool) -> list[int]:
    return ckpt.tokenizer.encode(TEMPLATES["llama_3"].prompt([(("<image>\n" if image else "") + question, None)]))


def test_loads_as_written(llama31_dir, llama31_ckpt):
    raw = json.loads((llama31_dir / "config.json").read_text())["rope_scaling"]
    t = llama31_ckpt.config.text
    assert t.rope_scaling == RopeScaling(raw["rope_type"], *(raw[f] for f in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if f in raw))
    assert (t.vocab_size, t.num_attention_heads, t.num_key_value_heads, t.rope_theta) == (128256, 4, 2, 500000.0)
    tok = llama31_ckpt.tokenizer
    assert tok.default_conv_mode() == "llama_3" and (tok.bos_id, tok.eos_id) == (128000, 128001)


def test_inverse_frequencies_equal_transformers_from_config_json(llama31_dir, llama31_ckpt):
    """Our RoPE from the parsed config against transformers' own init from config.json's block."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = json.loads((llama31_dir / "config.json").read_text())
    hf = LlamaConfig(hidden_size=raw["hidden_size"], num_attention_heads=raw["num_attention_heads"],
                     max_position_embeddings=raw["max_position_embeddings"],
                     rope_parameters={**raw["rope_scaling"], "rope_theta": raw["rope_theta"]})
    want, scale = ROPE_INIT_FUNCTIONS[raw["rope_scaling"]["rope_type"]](hf, "cpu")
    ours = inverse_frequencies(llama31_ckpt.config.text)
    torch.testing.assert_close(ours, want.float(), rtol=1e-6, atol=0)
    assert scale == 1.0
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ratio = (plain / ours.double()).tolist()
    if raw["rope_scaling"]["rope_type"] == "llama3":  # all three bands: kept, smoothed, divided by the factor
        assert ratio[0] == pytest.approx(1.0) and 1.0 < ratio[1] < 8.0 and ratio[-1] == pytest.approx(8.0)
    else:
        assert ratio == pytest.approx([4.0] * 8)


def test_text_path_equals_transformers_llama(llama31_ckpt):
    ids = _ids(llama31_ckpt, QUESTION * 5, image=False)
    assert len(ids) > 2 * 64  # well past original_max_position_embeddings
    assert text_vs_transformers(llama31_ckpt.lm, ids) < 5e-5


def test_split_equals_original(llama31_ckpt):
    ids = _ids(llama31_ckpt, QUESTION, image=True)
    features = features_of(llama31_ckpt)
    assert ids.index(IMAGE_TOKEN_INDEX) + features.shape[1] < 64 < len(ids) + features.shape[1]
    assert split_vs_original(llama31_ckpt.lm, ids, features) < FP32_BOUND
    ours, theirs = greedy(llama31_ckpt.lm, ids, features, 8)
    assert ours == theirs


def _run(source, *extra):
    r = CliRunner().invoke(main, ["run", str(source), "--conv-mode", "llama_3", "--image", str(DEMO_IMAGE),
                                  "--prompt", "What is in the image?", "--max-new-tokens", "8", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.slow
def test_onnx_export_gives_the_pytorch_tokens(llama31_dir, llama31_ckpt, tmp_path):
    art = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", str(llama31_dir), "-o", str(art)])
    assert r.exit_code == 0, r.output
    ort, torch_run = _run(art), _run(llama31_dir)
    assert (ort["backend"], torch_run["backend"]) == ("onnxruntime", "torch")
    assert ort["prompt_tokens"] == torch_run["prompt_tokens"] and ort["tokens"] == torch_run["tokens"]
    assert ort["text"] == torch_run["text"] == llama31_ckpt.tokenizer.decode(ort["tokens"])


def test_prompt_tokens_keep_one_begin_of_text(llama31_dir, llama31_ckpt):
    """The tokenizer adds <|begin_of_text|> to every chunk; the original keeps the first chunk's only."""
    ids = _run(llama31_dir)["prompt_tokens"]
    before, after = TEMPLATES["llama_3"].prompt([("<image>\nWhat is in the image?", None)]).split("<image>")
    tokenize = llama31_ckpt.tokenizer.tokenize
    assert tokenize(after)[0] == 128000
    assert ids == tokenize(before) + [IMAGE_TOKEN_INDEX] + tokenize(after)[1:]
    assert ids[0] == 128000 and ids.count(128000) == 1


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope"])
def test_unimplemented_rope_types_are_refused(tiny_dir, tmp_path, kind):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    raw = json.loads((ck / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": kind, "factor": 8.0, "original_max_position_embeddings": 64}
    (ck / "config.json").write_text(json.dumps(raw))
    r = CliRunner().invoke(main, ["run", str(ck), "--prompt", "Hi"])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert f"rope_scaling type '{kind}' (field rope_scaling.rope_type) is not implemented" in r.stderr


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "llama3", "factor": 8.0}, r"rope_scaling \(llama3\) lacks low_freq_factor, high_freq_factor, "
                                                  "original_max_position_embeddings"),
        ({"type": "linear"}, r"rope_scaling \(linear\) lacks factor"),
        ({"rope_type": "linear", "factor": 2.0, "beta": 1}, r"rope_scaling \(linear\) has unknown fields beta"),
        ({"rope_type": "linear", "factor": "2"}, "'rope_scaling' factor must be a finite number > 0.*got '2'"),
        ({**LLAMA3_SCALING, "low_freq_factor": 4.0}, "high_freq_factor must be greater than low_freq_factor"),
        ({**LLAMA3_SCALING, "original_max_position_embeddings": 64.5},
         "original_max_position_embeddings must be an integer.*got 64.5"),
    ],
)
def test_malformed_rope_scaling_is_refused(tiny_dir, scaling, message):
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw["rope_scaling"] = scaling
    with pytest.raises(SaisaError, match=f"config.json: .*{message}"):
        parse_config(raw, "config.json")
