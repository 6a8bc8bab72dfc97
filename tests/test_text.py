"""Issue 12: prompts with invalid UTF-8 or lone surrogates are a one-line error, not a traceback."""

from __future__ import annotations

import os

import pytest

from saisa_edge.errors import SaisaError
from saisa_edge.inputs.text import check_prompt


@pytest.mark.parametrize("text", ["What is this?", "Qu'est-ce que c'est ? 这是什么 🙂", ""])
def test_valid_text_passes(text):
    assert check_prompt(text) == text
    assert check_prompt(text.encode("utf-8")) == text


@pytest.mark.parametrize(
    "text, message",
    [
        (b"caf\xe9", "--prompt: not valid UTF-8 \\(byte 0xe9 at offset 3\\)"),
        (b"\xff\xfe", "not valid UTF-8 \\(byte 0xff at offset 0\\)"),
        (os.fsdecode(b"caf\xe9"), "not valid UTF-8 text \\(byte 0xe9 at character 3\\)"),  # how argv arrives
        ("a\ud800b", "lone surrogate U\\+D800 at character 1"),
        ("\udfff", "lone surrogate U\\+DFFF at character 0"),
    ],
)
def test_invalid_text_is_one_line(text, message):
    with pytest.raises(SaisaError, match=message) as e:
        check_prompt(text)
    assert "\n" not in str(e.value)


def test_the_flag_is_named():
    with pytest.raises(SaisaError, match="^--system: "):
        check_prompt("\ud83d", "--system")


def test_the_tokenizer_fails_without_it(tiny_ckpt):
    """What the guard is for: the tokenizer itself fails with a traceback (TypeError, or RuntimeError from sentencepiece)."""
    with pytest.raises((TypeError, UnicodeError, RuntimeError)):  # sentencepiece: RuntimeError
        tiny_ckpt.tokenizer.encode("a\ud800b")
