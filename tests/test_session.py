"""Sessions: cached images give the same answers, prefixes and conversations reuse text K/V,
batches equal their requests run alone, on PyTorch and ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saisa_edge.backends.ort import OrtBackend
from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.artifacts import open_artifact
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.model import original
from saisa_edge.runtime.sampling import SamplingParams
from saisa_edge.runtime.session import Request, Session
from saisa_edge.errors import SaisaError
from saisa_edge.runtime.visual_cache import VisualCache
from tests.conftest import DEMO_IMAGE

VICUNA = TEMPLATES["vicuna_v1"]


def _session(backend, tokenizer, template=VICUNA, cache=True) -> Session:
    vc = VisualCache(backend.config.text, backend.identity, backend.dtype, 2**28) if cache else None
    return Session(backend, tokenizer, template, vc)


@pytest.fixture(scope="module")
def ort_gqa(tmp_path_factory, tiny_gqa_dir):
    out = tmp_path_factory.mktemp("s") / "gqa"
    export_artifact(open_checkpoint(tiny_gqa_dir), out, ExportOptions())
    return OrtBackend(open_artifact(out))


@pytest.fixture(params=["torch", "onnxruntime"])
def model(request, tiny_gqa_ckpt, ort_gqa):
    backend = TorchBackend(tiny_gqa_ckpt) if request.param == "torch" else ort_gqa
    return backend, tiny_gqa_ckpt.tokenizer, tiny_gqa_ckpt


def _pixels(ckpt, seed=None):
    if seed is None:
        return preprocess(load_image(DEMO_IMAGE), ckpt.config.vision)
    s = ckpt.config.vision.crop_size
    return np.random.default_rng(seed).standard_normal((3, s, s), dtype=np.float32)


def test_cached_image_gives_identical_answers(model):
    backend, tok, ckpt = model
    s = _session(backend, tok)
    px = _pixels(ckpt)
    cold = s.generate(Request("What is shown?", px, max_new_tokens=16))
    warm = s.generate(Request("What is shown?", px.copy(), max_new_tokens=16))
    assert (cold.visual_cache, warm.visual_cache) == ("miss", "hit")
    assert warm.tokens == cold.tokens and len(cold.tokens) == 16
    assert warm.timings_ms["vision"] == 0.0 and cold.timings_ms["vision"] > 0
    assert s.generate(Request("Hi", None, max_new_tokens=2)).visual_cache == "none"


def test_other_system_prompt_reuses_the_image_by_rotation(model):
    backend, tok, ckpt = model
    px = _pixels(ckpt)
    long_system = dataclasses.replace(VICUNA, system=VICUNA.system + " Answer in one short sentence, please.")
    shared = VisualCache(backend.config.text, backend.identity, backend.dtype, 2**28)
    Session(backend, tok, VICUNA, shared).generate(Request("What is it?", px, max_new_tokens=2))
    moved = Session(backend, tok, long_system, shared).generate(Request("What is it?", px, max_new_tokens=16))
    fresh = Session(backend, tok, long_system).generate(Request("What is it?", px, max_new_tokens=16))
    assert moved.visual_cache == "hit" and shared.stats.misses == 1
    assert moved.tokens == fresh.tokens


def test_pre_image_prefix_is_reused(tiny_gqa_ckpt):
    backend = TorchBackend(tiny_gqa_ckpt)
    s = _session(backend, tiny_gqa_ckpt.tokenizer)
    calls = []
    real = backend.forward

    def counting(ids, positions, cache, visual):
        calls.append((ids.shape[1], cache.length))
        return real(ids, positions, cache, visual)

    backend.forward = counting  # type: ignore[method-assign]
    a = s.generate(Request("What is shown?", _pixels(tiny_gqa_ckpt), max_new_tokens=4))
    first_prefill = calls[0]
    calls.clear()
    b = s.generate(Request("Is it day or night?", _pixels(tiny_gqa_ckpt, 3), max_new_tokens=4))
    start = a.prompt_tokens.index(-200)
    assert first_prefill == (len(a.prompt_tokens) - 1, 0)
    assert calls[0] == (len(b.prompt_tokens) - 1 - start, start)  # only the text after the image is run
    fresh = _session(backend, tiny_gqa_ckpt.tokenizer, cache=False)
    assert b.tokens == fresh.generate(Request("Is it day or night?", _pixels(tiny_gqa_ckpt, 3), max_new_tokens=4)).tokens


def test_chat_keeps_text_kv_and_equals_the_full_recomputation(model):
    backend, tok, ckpt = model
    s = _session(backend, tok)
    px = _pixels(ckpt)
    chat = s.chat(px)
    replies = [chat.ask(q, max_new_tokens=6) for q in ("What is shown?", "And the colours?", "Anything else?")]
    assert [r.visual_cache for r in replies] == ["miss", "hit", "hit"]
    # the third turn's answer equals greedy decoding of the whole conversation by `original`
    ids = replies[2].prompt_tokens
    feats = torch.from_numpy(TorchBackend(ckpt).vision(px[None])[0])
    seq, want = list(ids), []
    for _ in range(len(replies[2].tokens)):
        token = int(original.forward(ckpt.lm, seq, feats)[-1].argmax())
        want.append(token)
        seq.append(token)
    assert replies[2].tokens == want
    assert len(chat.turns) == 3 and chat.turns[0][0].startswith("<image>\n")
    chat.reset(px)
    assert chat.ask("What is shown?", max_new_tokens=6).tokens == replies[0].tokens


def test_batch_equals_requests_alone(model):
    backend, tok, ckpt = model
    px, other = _pixels(ckpt), _pixels(ckpt, 11)
    requests = [
        Request("What is shown?", px, max_new_tokens=10),
        Request("Describe the picture in great detail, please.", px, max_new_tokens=7),  # same image, longer
        Request("And here?", other, max_new_tokens=10),  # another image
        Request("Say hello.", None, max_new_tokens=5),  # no image
        Request("Write.", px, SamplingParams(temperature=0.9, top_p=0.9, seed=4), max_new_tokens=6),
    ]
    batch = _session(backend, tok).generate_batch(requests)
    for request, got in zip(requests, batch):
        alone = _session(backend, tok, cache=False).generate(request)
        assert got.tokens == alone.tokens and got.prompt_tokens == alone.prompt_tokens
    same_image = _session(backend, tok).generate_batch(requests[:2])
    assert [r.tokens for r in same_image] == [r.tokens for r in batch[:2]]


def test_streaming_and_stop(tiny_gqa_ckpt):
    s = _session(TorchBackend(tiny_gqa_ckpt), tiny_gqa_ckpt.tokenizer)
    pieces: list[str] = []
    r = s.generate(Request("What is shown?", _pixels(tiny_gqa_ckpt), max_new_tokens=12), pieces.append)
    assert "".join(pieces).strip() == r.text and r.finish_reason == "length"
    assert r.as_json()["decode_tokens_per_s"] > 0


def test_ignore_eos_decodes_every_token(tiny_gqa_ckpt):
    """Benchmarks compare decode rates over a fixed token count: a format whose answer ends at
    once measured 0 tok/s. With ignore_eos the EOS (here the first greedy token, made an EOS)
    is decoded past; without it the answer stops there."""
    s = _session(TorchBackend(tiny_gqa_ckpt), tiny_gqa_ckpt.tokenizer)
    pixels = _pixels(tiny_gqa_ckpt)
    first = s.generate(Request("What is shown?", pixels, max_new_tokens=12)).tokens[0]
    s._eos = {first}
    stopped = s.generate(Request("What is shown?", pixels, max_new_tokens=12))
    assert stopped.tokens == [] and stopped.finish_reason == "stop"
    full = s.generate(Request("What is shown?", pixels, max_new_tokens=12, ignore_eos=True))
    assert len(full.tokens) == 12 and full.tokens[0] == first and full.finish_reason == "length"
    with pytest.raises(SaisaError, match="ignore_eos"):
        Request("What is shown?", ignore_eos="yes")  # type: ignore[arg-type]


# --- CLI -------------------------------------------------------------------------------------


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_cli_cache_dir_makes_a_second_process_hit(tmp_path, tiny_dir):
    args = ("run", tiny_dir, "--image", DEMO_IMAGE, "--prompt", "What?", "--max-new-tokens", "4", "--json",
            "--cache-dir", tmp_path / "vc")
    first, second = _run(*args), _run(*args)
    assert (first["visual_cache"], second["visual_cache"]) == ("miss", "hit")
    assert first["tokens"] == second["tokens"] and second["cache"]["bytes"] > 0
    assert {"vision", "visual_kv", "prefill", "first_token", "total"} <= set(second["timings_ms"])
    assert second["cache"]["persistent"] == str(tmp_path / "vc")


def test_cli_backend_choice(tmp_path, tiny_dir):
    art = tmp_path / "art"
    export_artifact(open_checkpoint(tiny_dir), art, ExportOptions())
    common = ("--image", DEMO_IMAGE, "--prompt", "What?", "--max-new-tokens", "5", "--json")
    a, b = _run("run", art, *common), _run("run", art, "--backend", "torch", *common)
    assert (a["backend"], b["backend"]) == ("onnxruntime", "torch") and a["tokens"] == b["tokens"]
    r = CliRunner().invoke(main, ["run", str(tiny_dir), "--backend", "onnxruntime", "--prompt", "x"])
    assert r.exit_code == 2 and "run `saisa-edge export` first" in r.stderr


def test_cli_unwritable_cache_dir_warns(tmp_path, tiny_dir):
    (tmp_path / "f").write_text("")
    r = CliRunner().invoke(main, ["run", str(tiny_dir), "--prompt", "Hi", "--max-new-tokens", "2", "--json",
                                  "--cache-dir", str(tmp_path / "f" / "vc")])
    assert r.exit_code == 0 and "not writable" in r.stderr and json.loads(r.stdout)["cache"]["persistent"] is None


def test_cli_chat(tmp_path, tiny_dir):
    other = tmp_path / "other.png"
    load_image(DEMO_IMAGE).rotate(90).save(other)
    script = "\n".join(["What is shown?", "And then?", "/stats", f"/image {other}", "What now?",
                        "/image /nonexistent.png", "/reset", "/bogus", "What is shown?", "/quit"]) + "\n"
    r = CliRunner().invoke(main, ["chat", str(tiny_dir), "--image", str(DEMO_IMAGE), "--max-new-tokens", "3"],
                           input=script)
    assert r.exit_code == 0, r.output
    out = r.stdout
    stats = json.loads(next(line for line in out.splitlines() if line.lstrip("> ").startswith("{")).lstrip("> "))
    assert stats["turns"] == 2 and stats["last"]["visual_cache"] == "hit" and stats["cache"]["entries"] == 1
    assert f"(new image: {other}; conversation reset)" in out and "(conversation reset)" in out
    assert "unknown command /bogus" in out
    assert "error: --image /nonexistent.png: file not found" in r.stderr


def test_cli_cache_budget(tiny_dir):
    args = ("run", tiny_dir, "--image", DEMO_IMAGE, "--prompt", "What?", "--max-new-tokens", "2", "--json")
    assert _run(*args)["cache"]["entries"] == 1
    starved = _run(*args, "--cache-mb", "0")  # no room: the image is used, not kept
    assert starved["cache"] == {"bytes": 0, "entries": 0, "persistent": None} and starved["visual_cache"] == "miss"
