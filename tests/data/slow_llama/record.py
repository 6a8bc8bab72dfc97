"""Record what the original's tokenizer gives on tokenizer.model here: ids and decoded text of PROMPTS.

The original pins transformers 4.37.2, whose slow `LlamaTokenizer` (use_fast=False) is the reference;
transformers 5 no longer has it. Regenerate expected.json with that version, outside the project venv:

    python -m venv /tmp/tf437 && /tmp/tf437/bin/python -m pip install transformers==4.37.2 sentencepiece protobuf
    /tmp/tf437/bin/python tests/data/slow_llama/record.py

tokenizer.model is the `tiny` preset's (byte fallback, dummy prefix). Two configs: `legacy: false` as the
preset writes it (and Vicuna v1.5), and the legacy default with added tokens (special with rstrip,
non-special with lstrip).
"""

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[2]))  # the repo, for the templates (pure Python)

from saisa_edge.inputs.conversation import TEMPLATES  # noqa: E402

CONFIGS = {
    "legacy_false": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                     "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                     "pad_token": None, "clean_up_tokenization_spaces": False},
    "legacy_added": {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                     "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
                     "additional_special_tokens": ["<extra>"],
                     "added_tokens_decoder": {
                         "480": {"content": "<extra>", "special": True, "lstrip": False, "rstrip": True,
                                 "normalized": False, "single_word": False},
                         "481": {"content": "<plain_added>", "special": False, "lstrip": True, "rstrip": False,
                                 "normalized": False, "single_word": False}}},
}
PROMPTS = [
    "Hello world", " leading space", "  two leading", "\nnewline first", "What is shown?\nSecond line\n\nthird",
    "trailing space ", "tabs\tand\tstuff", "émoji 🙂 and ünïcödé — 中文字符", "<s>starts with bos",
    "mid <s> bos and </s> eos", "text</s>", "<unk> unknown", "▁already underscore ▁x", "a", "", " ", "\n",
    "0123456789 digits 42", "x  y   z", "end\n", "<|im_start|>user\nhi<|im_end|>", "x <extra>  y",
    "a <plain_added> b", "<plain_added>", "<extra>", " in detail.", " and is it day or night?",
    "Describe ", "What colour is the car in ",
]
TURNS = [("<image>\nWhat is it?", "A cat."), ("And the colour?", None)]


def prompts() -> list[str]:
    """PROMPTS and every chunk (split at <image>) of every template's two-turn prompt with an image."""
    chunks = []
    for t in TEMPLATES.values():
        turns = [(TURNS[0][0], None)] if t.style == "plain" else TURNS  # PLAIN formats one question
        chunks += t.prompt(turns).split("<image>")
    return list(dict.fromkeys(PROMPTS + chunks))


def main() -> None:
    import transformers
    from transformers import AutoTokenizer

    out: dict = {"transformers": transformers.__version__}
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes((HERE / "tokenizer.model").read_bytes())
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
            tok = AutoTokenizer.from_pretrained(tmp, use_fast=False)
            assert type(tok).__name__ == "LlamaTokenizer"
            cases = [(p, tok(p).input_ids) for p in prompts()]
            out[name] = {"config": config, "cases": [(p, ids, tok.decode(ids, skip_special_tokens=True))
                                                     for p, ids in cases]}
    lines = [f'"transformers": {json.dumps(out["transformers"])}']
    for name in CONFIGS:  # one case a line
        cases = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in out[name]["cases"])
        lines.append(f'"{name}": {{"config": {json.dumps(out[name]["config"])},\n "cases": [\n  {cases}]}}')
    (HERE / "expected.json").write_text("{" + ",\n".join(lines) + "}\n")


if __name__ == "__main__":
    main()
