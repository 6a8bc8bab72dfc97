"""Sampling, streaming with stop strings, and a whole request on the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.model import original
from tests.conftest import DEMO_IMAGE, generate
from saisa_edge.runtime.sampling import SamplingParams, make_generator, sample
from saisa_edge.runtime.stream import TextStream

LOGITS = np.array([0.0, 3.0, 2.5, -1.0, 2.9], dtype=np.float32)


def _draws(params: SamplingParams, n: int = 300) -> list[int]:
    gen = make_generator(params)
    return [sample(LOGITS, params, gen) for _ in range(n)]


def test_greedy_and_degenerate_sampling():
    assert sample(LOGITS, SamplingParams(), make_generator(SamplingParams())) == 1
    assert set(_draws(SamplingParams(temperature=1.0, top_k=1, seed=0))) == {1}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.01, seed=0))) == {1}


def test_top_k_and_top_p_restrict_support():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=3, seed=1))) == {1, 2, 4}
    # p(1), p(4), p(2) ~ 0.37, 0.34, 0.22: 0.6 needs the first two only
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.6, seed=2))) == {1, 4}
    assert len(set(_draws(SamplingParams(temperature=5.0, seed=3)))) == 5


def test_seed_reproduces():
    p = SamplingParams(temperature=1.0, seed=42)
    assert _draws(p) == _draws(p)
    assert _draws(p) != _draws(SamplingParams(temperature=1.0, seed=43))


def _stream(pieces: list[bytes], stops=("</s>",)):
    """Tokens as byte pieces, decoded like a byte-level tokenizer does."""
    out: list[str] = []
    s = TextStream(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace"), stops, out.append)
    stopped = [s.push(i) for i in range(len(pieces))]
    return s, out, stopped


def test_stream_holds_back_a_possible_stop_string():
    s, out, stopped = _stream([b"Hello", b" wor", b"ld<", b"/s", b">", b"ignored"])
    assert stopped.index(True) == 4
    assert out == ["Hello", " wor", "ld"] and s.finish() == "Hello world"


def test_stream_releases_a_false_alarm_and_partial_utf8():
    s, out, _ = _stream([b"a<", b"b", b"\xc3", b"\xa9"])
    assert out == ["a", "<b", "\u00e9"] and s.finish() == "a<b\u00e9"


def test_stream_holds_byte_fallback_runs():
    """A sentencepiece decoder turns every byte of an invalid run into U+FFFD, retroactively."""
    pieces = {0: "A", 1: b"?", 2: b"\xf1", 3: " b"}

    def decode(ids):
        out, run = "", b""
        for i in ids + [None]:
            if isinstance(pieces.get(i), bytes):
                run += pieces[i]
                continue
            try:
                out += run.decode("utf-8")
            except UnicodeDecodeError:
                out += "\ufffd" * len(run)
            run = b""
            out += pieces.get(i) or ""
        return out

    out: list[str] = []
    s = TextStream(decode, ("</s>",), out.append, frozenset({1, 2}))
    for i in (0, 1, 2, 3):
        s.push(i)
    assert out == ["A", "\ufffd\ufffd b"] and s.finish() == "A\ufffd\ufffd b"


def test_generate_greedy_matches_original(tiny_ckpt):
    pixels = preprocess(load_image(DEMO_IMAGE), tiny_ckpt.config.vision)
    t = TEMPLATES["vicuna_v1"]
    streamed: list[str] = []
    r = generate(TorchBackend(tiny_ckpt), tiny_ckpt.tokenizer, t, "What is shown?", pixels, SamplingParams(), 12, streamed.append)
    assert r.visual_cache == "miss" and len(r.tokens) == 12 and r.finish_reason == "length"
    assert r.prompt_tokens.count(-200) == 1
    assert set(r.timings_ms) >= {"vision", "visual_kv", "prefill", "first_token", "decode", "total"}
    assert "".join(streamed) == tiny_ckpt.tokenizer.decode(r.tokens)
    seq, feats = list(r.prompt_tokens), tiny_ckpt.vision(torch.from_numpy(pixels)[None])[0]
    for tok in r.tokens:
        assert int(original.forward(tiny_ckpt.lm, seq, feats)[-1].argmax()) == tok
        seq.append(tok)


def test_generate_text_only_and_errors(tiny_ckpt):
    t = TEMPLATES["vicuna_v1"]
    r = generate(TorchBackend(tiny_ckpt), tiny_ckpt.tokenizer, t, "Hi", None, SamplingParams(), 3)
    assert r.visual_cache == "none" and -200 not in r.prompt_tokens and "vision" not in r.timings_ms
    with pytest.raises(SaisaError, match="no --image"):
        generate(TorchBackend(tiny_ckpt), tiny_ckpt.tokenizer, t, "<image>\nHi", None, SamplingParams(), 3)
    with pytest.raises(SaisaError, match="--prompt is too long"):
        generate(TorchBackend(tiny_ckpt), tiny_ckpt.tokenizer, t, "word " * 3000, None, SamplingParams(), 3)


def test_generation_stops_at_context_end(tmp_path):
    from saisa_edge.checkpoint.loader import load_checkpoint
    from saisa_edge.checkpoint.presets import tiny, write_checkpoint

    ckpt = load_checkpoint(write_checkpoint(tiny(max_position_embeddings=80), tmp_path / "c", dtype="fp32"))
    r = generate(TorchBackend(ckpt), ckpt.tokenizer, TEMPLATES["vicuna_v1"], "Hi", None, SamplingParams(), 500)
    assert len(r.prompt_tokens) + len(r.tokens) <= 80 + 1 and r.finish_reason in ("length", "stop")


# --- the library API checks what the CLI checks ---------------------------------------------------


@pytest.mark.parametrize("kwargs, flag", [
    ({"temperature": float("nan")}, "--temperature"), ({"temperature": float("inf")}, "--temperature"),
    ({"temperature": -0.5}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
    ({"top_k": -1}, "--top-k"), ({"top_k": 2.5}, "--top-k"), ({"seed": -1}, "--seed"), ({"seed": 2**64}, "--seed"),
    ({"seed": 1e20}, "--seed"), ({"temperature": True}, "--temperature"),
])
def test_sampling_params_are_checked(kwargs, flag):
    with pytest.raises(SaisaError, match=f"^{flag} "):
        SamplingParams(**kwargs)


def test_parse_seed():
    from saisa_edge.runtime.sampling import parse_seed

    assert parse_seed(None) is None and parse_seed("7") == 7 and parse_seed(str(2**64 - 1)) == 2**64 - 1
    for bad in ("1e20", "x", "-3", str(2**64)):
        with pytest.raises(SaisaError, match="^--seed "):
            parse_seed(bad)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_max_new_tokens_is_checked(n):
    from saisa_edge.runtime.session import Request

    with pytest.raises(SaisaError, match="^--max-new-tokens "):
        Request("hi", max_new_tokens=n)


def test_empty_batch_and_top_p_edge(tiny_ckpt):
    from saisa_edge.runtime.session import Request, Session

    s = Session(TorchBackend(tiny_ckpt), tiny_ckpt.tokenizer, TEMPLATES["vicuna_v1"])
    assert s.generate_batch([]) == []
    with pytest.raises(SaisaError, match="^pixels: give a numpy array"):
        s.generate(Request("Hi", pixels=torch.zeros(3, 4, 4)))
    r = s.generate(Request("Hi", params=SamplingParams(temperature=1.0, top_p=1e-9, seed=0), max_new_tokens=3))
    assert r.tokens == s.generate(Request("Hi", max_new_tokens=3)).tokens  # the smallest top-p: greedy


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--cache-mb", "inf"), ("--cache-mb", "nan"),
                                         ("--seed", "1e20"), ("--cache-disk-mb", "-1")])
def test_cli_refuses_bad_numbers_in_one_line(tiny_dir, flag, value):
    from click.testing import CliRunner

    from saisa_edge.cli import main

    r = CliRunner().invoke(main, ["run", str(tiny_dir), "--prompt", "hi", flag, value])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {value}"), r.stderr


def test_numpy_sampling_is_seeded_numpy():
    """The generator is numpy's PCG64: the same seed gives the same draws as numpy's own."""
    params = SamplingParams(temperature=1.0, seed=5)
    probs = np.exp(LOGITS.astype(np.float64) - LOGITS.max())
    probs /= probs.sum()
    want = [int(c) for c in np.random.default_rng(5).choice(5, size=1, p=probs)]
    assert _draws(params, 1) == want
