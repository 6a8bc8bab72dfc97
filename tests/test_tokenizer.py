"""Tokenisation without transformers: ids and text as the original's tokenizers give them.

References: transformers 4.37.2's slow `LlamaTokenizer` (the version the original pins; recorded in
tests/data/slow_llama by its record.py, since transformers 5 has no slow tokenizer any more) and the
installed transformers' `AutoTokenizer` on the tiny preset, SmolLM2's and the real Llama 3 tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.tokenizer import PromptTokenizer
from tests.llama3 import llama3_tokenizer_dir

SLOW = Path(__file__).parent / "data" / "slow_llama"
TURNS = [("<image>\nWhat is it?", "A cat."), ("And the colour?", None)]
TEXTS = [
    "Hello world", "\nnewline first", "What is shown?\nSecond line\n\nthird", "trailing space ", "tabs\tand\tstuff",
    "émoji 🙂 and ünïcödé — 中文字符 ☃", "0123456789 digits 42", "x  y   z", "end\n", "a", "", "\n",
    "<s>starts with bos", "mid <s> bos and </s> eos", "text</s>", "<unk> unknown",
    "<|begin_of_text|>hi", "a<|eot_id|>b", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>", "don't you're it's", "USER: <image>\nWhat is it? ASSISTANT:",
    "<image>", "Describe <image>\nin detail.", "What is this?<image>",
]
# chunks that start with a space: transformers 5 drops legacy=False's extra "▁" there (see the tiny test)
LEADING_SPACE = [" leading space", "  two leading", " ", "▁already underscore ▁x", "Describe <image> in detail.",
                 "What colour is the car in <image> and is it day or night?"]


def template_prompts() -> list[str]:
    """Every template's two-turn prompt with an image (PLAIN: its one question)."""
    return [t.prompt([(TURNS[0][0], None)] if t.style == "plain" else TURNS) for t in TEMPLATES.values()]


def chunks(prompts: list[str]) -> list[str]:
    return list(dict.fromkeys(c for p in prompts for c in p.split("<image>")))


def image_token_ids(hf, prompt: str) -> list[int]:
    """LLaVA's `tokenizer_image_token` (llava/mm_utils.py), on a transformers tokenizer."""
    parts = [hf(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if parts[0] and parts[0][0] == hf.bos_token_id else 0
    ids = [parts[0][0]] if offset else []
    separated = [x for part in parts for x in (part, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


def assert_like_transformers(folder: Path, texts: list[str]) -> PromptTokenizer:
    from transformers import AutoTokenizer

    ours, hf = PromptTokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    for text in chunks(texts + template_prompts()):
        ids = ours.tokenize(text)
        assert ids == hf(text).input_ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    for prompt in template_prompts() + [t for t in texts if t.count("<image>") == 1]:
        assert ours.encode(prompt) == image_token_ids(hf, prompt), prompt
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    return ours


@pytest.mark.parametrize("variant", ["legacy_false", "legacy_added"])
def test_sentencepiece_equals_the_originals_slow_llama_tokenizer(tmp_path, variant):
    expected = json.loads((SLOW / "expected.json").read_text())
    assert expected["transformers"] == "4.37.2"
    shutil.copy(SLOW / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(expected[variant]["config"]))
    tok = PromptTokenizer.load(tmp_path)
    cases = expected[variant]["cases"]
    assert {p for p, _, _ in cases} >= set(chunks(LEADING_SPACE + template_prompts()))
    for prompt, ids, text in cases:
        assert tok.tokenize(prompt) == ids, prompt
        assert tok.decode(ids) == text, prompt


def test_tiny_preset_equals_transformers(tiny_dir):
    """transformers 5 converts tokenizer.model to a fast tokenizer that drops legacy=False's extra "▁" before a
    leading space (LEADING_SPACE, checked against 4.37.2 above); everything else must agree."""
    tok = assert_like_transformers(tiny_dir, TEXTS)
    ids = tok.encode(TEMPLATES["vicuna_v1"].prompt([("<image>\nWhat is shown?", None)]))
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    # the sentencepiece quirk the model was trained with: a lone "▁" before the newline
    sp = tok.vocab.sp  # type: ignore[attr-defined]
    assert [sp.id_to_piece(i) for i in ids[at + 1: at + 3]] == ["▁", "<0x0A>"]
    assert tok.default_conv_mode() == "vicuna_v1"
    assert len(tok.byte_ids) == 256 and sp.piece_to_id("<0x0A>") in tok.byte_ids


def test_llama3_equals_transformers(tmp_path):
    tok = assert_like_transformers(llama3_tokenizer_dir(tmp_path), TEXTS + LEADING_SPACE)
    assert tok.default_conv_mode() == "llama_3" and tok.byte_ids == frozenset()
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)


def test_llama3_bos_on_every_chunk_is_dropped_after_the_first(tmp_path):
    """The tokenizer adds <|begin_of_text|> to every chunk; tokenizer_image_token keeps the first one only."""
    tok = PromptTokenizer.load(llama3_tokenizer_dir(tmp_path))
    prompt = TEMPLATES["llama_3"].prompt([("<image>\nWhat is in the image?", None)])
    before, after = prompt.split("<image>")
    assert tok.tokenize(after)[0] == 128000
    assert tok.encode(prompt) == tok.tokenize(before) + [IMAGE_TOKEN_INDEX] + tok.tokenize(after)[1:]
    assert tok.encode(prompt).count(128000) == 1


@pytest.mark.slow
def test_smol_tokenizer_json_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    from saisa_edge.checkpoint.smollm2 import gguf_path

    path = gguf_path()
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp_path))
    tok = assert_like_transformers(tmp_path, TEXTS + LEADING_SPACE)
    assert tok.default_conv_mode() == "chatml_direct"
    # SmolLM2's BOS is <|im_start|>: a chatml prompt starts with it, so the original drops the first
    # token of the text after the image, a real one
    prompt = TEMPLATES["chatml_direct"].prompt([("<image>\nWhat is it?", None)])
    before, after = prompt.split("<image>")
    assert tok.encode(prompt)[len(tok.tokenize(before)) + 1:] == tok.tokenize(after)[1:]


def test_one_image_per_prompt(tiny_dir):
    with pytest.raises(SaisaError, match="2 <image> markers"):
        PromptTokenizer.load(tiny_dir).encode("<image> and <image>")


def test_needs_neither_torch_nor_transformers(tiny_dir, tmp_path):
    """Load, encode and decode with torch and transformers made unimportable."""
    llama3 = llama3_tokenizer_dir(tmp_path)
    code = """
import json, sys
from pathlib import Path
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from saisa_edge.inputs.tokenizer import PromptTokenizer
out = []
for folder in sys.argv[1:]:
    tok = PromptTokenizer.load(Path(folder))
    ids = tok.encode("USER: <image>\\nWhat is it? ASSISTANT:")
    out.append([ids, tok.decode([i for i in ids if i >= 0]), tok.default_conv_mode()])
assert not {m.split(".")[0] for m in sys.modules} & {"torch", "transformers"}
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code, str(tiny_dir), str(llama3)], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    for (ids, text, mode), folder in zip(json.loads(r.stdout), (tiny_dir, llama3)):
        tok = PromptTokenizer.load(folder)
        assert ids == tok.encode("USER: <image>\nWhat is it? ASSISTANT:") and IMAGE_TOKEN_INDEX in ids
        assert text == tok.decode([i for i in ids if i >= 0]) and mode == tok.default_conv_mode()


def test_config_json_is_never_read(tmp_path):
    """A LLaMA-3.1 SAISA config (rope_scaling, llava_llama) broke AutoTokenizer; the tokenizer files suffice."""
    folder = llama3_tokenizer_dir(tmp_path)
    (folder / "config.json").write_text("{not json")
    assert PromptTokenizer.load(folder).tokenize("Hi") == [128000, 13347]


def test_bad_tokenizer_files(tmp_path, tiny_dir):
    with pytest.raises(SaisaError, match="no tokenizer"):
        PromptTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(SaisaError, match="tokenizer.model: not a sentencepiece model"):
        PromptTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(SaisaError, match="tokenizer.json: not a tokenizers file"):
        PromptTokenizer.load(tmp_path)
    shutil.copy(tiny_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(SaisaError, match="tokenizer_config.json: cannot be read as JSON"):
        PromptTokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(SaisaError, match="special token '<nope>' is neither a piece nor in added_tokens_decoder"):
        PromptTokenizer.load(tmp_path)
