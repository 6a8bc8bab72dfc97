"""In-flight batching (runtime.batcher): rows that join and leave a running batch, with chunked
prefill, give the tokens each request gives alone; images are computed once; cancellation frees rows."""

from __future__ import annotations

import numpy as np
import pytest

from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.batcher import CANCELLED, Batcher, stack_rows, take_rows
from saisa_edge.runtime.kv import PAD_POSITION, TextCache
from saisa_edge.runtime.sampling import SamplingParams
from saisa_edge.runtime.session import PromptTooLong, Request, Session, user_message
from saisa_edge.runtime.visual_cache import VisualCache
from tests.conftest import DEMO_IMAGE

VICUNA = TEMPLATES["vicuna_v1"]


@pytest.fixture(scope="module")
def backend(tiny_gqa_ckpt):
    return TorchBackend(tiny_gqa_ckpt), tiny_gqa_ckpt.tokenizer


def _session(backend) -> Session:
    b, tok = backend
    return Session(b, tok, VICUNA, VisualCache(b.config.text, b.identity, b.dtype, 2**28))


def _ids(s: Session, r: Request) -> list[int]:
    return s._prompt_ids([(user_message(r.question, r.pixels is not None), None)])


def _drain(batcher: Batcher, session: Session, requests: list[Request]):
    """Submit as room allows, step until everything has left; the slots in request order."""
    pending, slots = list(requests), []
    while pending or not batcher.idle:
        while pending and batcher.room > 0:
            r = pending.pop(0)
            slots.append(batcher.submit(_ids(session, r), r))
        batcher.step()
    return slots


def _requests(backend):
    cfg = backend[0].config.vision
    px = preprocess(load_image(DEMO_IMAGE), cfg)
    other = np.random.default_rng(0).standard_normal(px.shape, dtype=np.float32)
    return [
        Request("What is shown?", px, max_new_tokens=10),
        Request("Describe the picture in great detail, please.", px, max_new_tokens=7),
        Request("And here?", other, max_new_tokens=12),
        Request("Say hello.", None, max_new_tokens=5),
        Request("Write.", px, SamplingParams(temperature=0.9, top_p=0.9, seed=4), max_new_tokens=6),
    ] * 2


def test_rows_joining_and_leaving_give_the_tokens_of_requests_alone(backend):
    requests = _requests(backend)
    alone = [_session(backend).generate(r) for r in requests]
    b, _ = backend
    real, shapes = b.forward, []

    def recording(ids, positions, cache, visual):
        shapes.append(ids.shape)
        return real(ids, positions, cache, visual)

    b.forward = recording
    try:
        session = _session(backend)
        batcher = Batcher(session, max_batch=3, max_prefill_tokens=20)
        slots = _drain(batcher, session, requests)
    finally:
        b.forward = real
    for slot, want in zip(slots, alone):
        assert slot.result is not None and slot.result.tokens == want.tokens
        assert slot.result.finish_reason == want.finish_reason
    assert batcher.vision_runs == 2 and session.cache is not None and session.cache.stats.misses == 2
    assert [s.result.visual_cache for s in slots[:5]] == ["miss", "hit", "miss", "none", "hit"]
    assert all(s.prefix_reused > 0 for s in slots[5:] if s.request.pixels is not None)  # prompt before the image
    prefill = [(n, t) for n, t in shapes if t > 1]
    assert max(t for _, t in prefill) <= 20 and len(prefill) > len(requests)  # long prompts ran in chunks
    assert max(n for n, _ in prefill) > 1  # rows joining together were prefilled together
    assert max(n for n, t in shapes if t == 1) == 3  # decode steps ran the full batch


def test_a_cancelled_row_leaves_and_the_others_go_on(backend):
    requests = _requests(backend)[:3]
    alone = [_session(backend).generate(r) for r in requests]
    session = _session(backend)
    batcher = Batcher(session, max_batch=4)
    slots = [batcher.submit(_ids(session, r), r) for r in requests]
    for _ in range(3):
        batcher.step()
    batcher.cancel(slots[1])
    left = batcher.step()
    assert slots[1] in left and slots[1].result is not None and slots[1].result.finish_reason == CANCELLED
    assert len(batcher.decoding) == 2
    while not batcher.idle:
        batcher.step()
    assert [slots[0].result.tokens, slots[2].result.tokens] == [alone[0].tokens, alone[2].tokens]


def test_a_failing_request_fails_alone(backend):
    session = _session(backend)
    batcher = Batcher(session, max_batch=2)
    ok = Request("Hi", None, max_new_tokens=3)
    too_long = Request("word " * 3000, None, max_new_tokens=3)
    slots = [batcher.submit(_ids(session, r), r) for r in (too_long, ok)]
    while not batcher.idle:
        batcher.step()
    assert isinstance(slots[0].error, PromptTooLong) and slots[0].result is None
    assert slots[1].result is not None and slots[1].result.tokens == _session(backend).generate(ok).tokens


def test_extra_stop_strings_end_a_row(backend):
    session = _session(backend)
    r = Request("What is shown?", None, max_new_tokens=12)
    full = session.generate(r)
    stop = full.text[len(full.text) // 2:][:2]
    batcher = Batcher(session)
    slot = batcher.submit(_ids(session, r), r, stops=(stop,))
    while not batcher.idle:
        batcher.step()
    assert slot.result is not None and slot.result.finish_reason == "stop"
    assert stop not in slot.result.text and full.text.startswith(slot.result.text)


def test_rows_keep_only_the_columns_some_row_uses(backend):
    cfg = backend[0].config.text

    def cache(positions: list[int]) -> TextCache:
        n = len(positions)
        k = np.full((1, cfg.num_key_value_heads, n, cfg.head_dim), float(n), np.float32)
        return TextCache((k,) * 2, (k,) * 2, np.array([positions], dtype=np.int64))

    both = stack_rows([cache([0, 1, 2, 3, 4]), cache([0, 1])])
    assert both.positions.tolist() == [[0, 1, 2, 3, 4], [0, 1] + [PAD_POSITION] * 3]
    assert not both.keys[0][1, :, 2:].any()  # padding is zeros
    short = take_rows(both, [1])
    assert short.positions.tolist() == [[0, 1]] and short.keys[0].shape[2] == 2
