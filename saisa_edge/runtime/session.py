"""Requests on a backend: prompt assembly, the visual K/V cache, reuse of cached text
K/V (the prompt before the image across requests, the conversation across turns),
batched prefill with padding, decoding with sampling, stop strings and streaming.

Stages, each timed per request: vision and visual_kv (skipped on a cache hit), prefill
(the prompt's text in one pass), decode (one token per step for the whole batch).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saisa_edge import IMAGE_PLACEHOLDER
from saisa_edge.backends import Backend
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.conversation import Template
from saisa_edge.inputs.text import check_prompt
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.runtime.kv import PAD_POSITION, TextCache, VisualKV, text_layout
from saisa_edge.runtime.sampling import SamplingParams, make_generator, sample
from saisa_edge.runtime.stream import TextStream
from saisa_edge.runtime.visual_cache import VisualCache

OnText = Callable[[str], None]


@dataclass(frozen=True)
class Request:
    question: str
    pixels: np.ndarray | None = None  # preprocessed [3, S, S] float32
    params: SamplingParams = SamplingParams()
    max_new_tokens: int = 128
    ignore_eos: bool = False  # decode all max_new_tokens, past EOS and stop strings (benchmarks)

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens)
        if not isinstance(self.question, str):
            raise SaisaError(f"--prompt: give text, not {type(self.question).__name__}")
        check_prompt(self.question)
        if not isinstance(self.params, SamplingParams):
            raise SaisaError("params: give a SamplingParams")
        if not isinstance(self.ignore_eos, bool):
            raise SaisaError("ignore_eos: give True or False")


class PromptTooLong(SaisaError):
    """The prompt leaves no room in the context (a server answers 413, not 400)."""


def check_context(backend: Backend, ids: list[int], has_image: bool) -> int:
    """The prompt's visual positions, once its text and image are known to fit the context."""
    n_visual = backend.config.num_visual_tokens if has_image else 0
    n_text = len(ids) - (1 if n_visual else 0)
    if n_text + n_visual >= backend.max_context:
        raise PromptTooLong(
            f"--prompt is too long: {n_text} text tokens + {n_visual} visual positions leave no room "
            f"in the context of {backend.max_context}; shorten the prompt"
        )
    return n_visual


def check_max_new_tokens(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SaisaError(f"--max-new-tokens {n}: give an integer >= 1")


@dataclass
class Result:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    visual_cache: str  # hit, miss or none
    backend: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        decode_s = self.timings_ms.get("decode", 0.0) / 1000
        steps = max(len(self.tokens) - 1, 0)
        return {
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "text": self.text,
            "finish_reason": self.finish_reason, "backend": self.backend, "visual_cache": self.visual_cache,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "decode_tokens_per_s": round(steps / decode_s, 3) if decode_s > 0 and steps else None,
        }


def user_message(question: str, has_image: bool) -> str:
    """The first user turn as LLaVA's CLI builds it: `<image>\\n` before the question."""
    if not has_image:
        if IMAGE_PLACEHOLDER in question:
            raise SaisaError(f"--prompt contains {IMAGE_PLACEHOLDER} but no --image was given")
        return question
    return question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"


@dataclass
class _Row:
    """One request in flight."""

    ids: list[int]
    text: list[int]
    positions: list[int]
    start: int
    visual: VisualKV | None
    visual_status: str
    params: SamplingParams
    max_new_tokens: int
    stream: TextStream
    t0: float
    timings: dict[str, float]
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    ignore_eos: bool = False


def _ids(rows: list[int] | list[list[int]]) -> np.ndarray:
    """Token ids or positions as the int64 array backends take."""
    return np.array(rows, dtype=np.int64)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """A model ready for requests: backend, tokenizer, template and caches."""

    def __init__(self, backend: Backend, tokenizer: PromptTokenizer, template: Template,
                 cache: VisualCache | None = None, prefix_entries: int = 8):
        self.backend, self.tokenizer, self.template, self.cache = backend, tokenizer, template, cache
        self._prefixes: OrderedDict[tuple[int, ...], TextCache] = OrderedDict()
        self._prefix_entries = prefix_entries
        self._lock = threading.Lock()
        cfg = backend.config.text
        self._eos = {e for e in (*cfg.eos_token_ids, tokenizer.eos_id) if e is not None}

    # --- public ---------------------------------------------------------------------------

    def generate(self, request: Request, on_text: OnText | None = None) -> Result:
        return self.generate_batch([request], [on_text])[0]

    def generate_batch(self, requests: list[Request], on_text: list[OnText | None] | None = None) -> list[Result]:
        """Several requests in one batch (same or different images, any lengths; none: no results)."""
        if not requests:
            return []
        callbacks = on_text or [None] * len(requests)
        if len(callbacks) != len(requests):
            raise SaisaError(f"on_text: {len(callbacks)} callbacks for {len(requests)} requests")
        rows = [self._row(self._prompt_ids([(user_message(r.question, r.pixels is not None), None)]), r, cb)
                for r, cb in zip(requests, callbacks)]
        if len(rows) == 1 and rows[0].visual is not None:
            self._run(rows, self._pre_image_prefix(rows[0]))
        else:
            self._run(rows, None)
        return [self._result(r) for r in rows]

    def chat(self, pixels: np.ndarray | None = None) -> "Chat":
        return Chat(self, pixels)

    # --- internals ------------------------------------------------------------------------

    def _prompt_ids(self, turns: list[tuple[str, str | None]]) -> list[int]:
        return self.tokenizer.encode(self.template.prompt(turns))

    def _row(self, ids: list[int], request: Request, on_text: OnText | None,
             visual: VisualKV | None = None) -> _Row:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if request.pixels is not None:
            c = self.backend.config.vision.crop_size
            if not isinstance(request.pixels, np.ndarray) or request.pixels.shape != (3, c, c):
                raise SaisaError(f"pixels: give a numpy array [3, {c}, {c}] (saisa_edge.inputs.image.preprocess), "
                                 f"not {type(request.pixels).__name__} {getattr(request.pixels, 'shape', '')}")
        n_visual = check_context(self.backend, ids, request.pixels is not None)
        text, positions, start = text_layout(ids, n_visual)
        status = "none"
        if request.pixels is not None:
            if visual is not None:
                visual, status = visual.moved_to(self.backend.config.text, start), "hit"
            else:
                visual, status = self._visual(request.pixels, start, timings)
        stream = TextStream(self.tokenizer.decode, (self.template.stop,), on_text, self.tokenizer.byte_ids)
        return _Row(ids, text, positions, start, visual, status, request.params, request.max_new_tokens,
                    stream, t0, timings, ignore_eos=request.ignore_eos)

    def _visual(self, pixels: np.ndarray, start: int, timings: dict[str, float]) -> tuple[VisualKV, str]:
        def compute() -> VisualKV:
            t = time.perf_counter()
            features = self.backend.vision(pixels[None])
            timings["vision"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            kv = self.backend.visual_kv(features, start)
            timings["visual_kv"] = (time.perf_counter() - t) * 1000
            return kv

        t = time.perf_counter()
        if self.cache is None:
            return compute(), "miss"
        kv, hit = self.cache.get(pixels, start, compute)
        if hit:
            timings["vision"], timings["visual_kv"] = 0.0, (time.perf_counter() - t) * 1000
        return kv, "hit" if hit else "miss"

    def _pre_image_prefix(self, row: _Row) -> tuple[list[int], TextCache] | None:
        """The cached text K/V of a prompt's part before the image, if an earlier request left it."""
        key = tuple(row.text[: row.start])
        with self._lock:
            cache = self._prefixes.get(key)
            if cache is not None:
                self._prefixes.move_to_end(key)
        return (list(key), cache) if cache is not None else None

    def _keep_prefix(self, row: _Row, cache: TextCache) -> None:
        key = tuple(row.text[: row.start])
        with self._lock:
            if key and key not in self._prefixes:
                self._prefixes[key] = cache.truncated(len(key)).copy()  # a view would keep the prompt's K/V alive
                while len(self._prefixes) > self._prefix_entries:
                    self._prefixes.popitem(last=False)

    def _visual_for(self, rows: list[_Row]) -> VisualKV | None:
        visuals = [r.visual for r in rows]
        if all(v is None for v in visuals):
            return None
        first = visuals[0]
        if first is not None and all(v is first for v in visuals):
            return first  # one image for the whole batch: passed once
        return VisualKV.batch(visuals)

    def _run(self, rows: list[_Row], reuse: tuple[list[int], TextCache] | None) -> tuple[TextCache, list[int]]:
        """Prefill then decode `rows`; returns the final cache and (batch 1) the ids it holds."""
        backend = self.backend
        cfg, dtype = backend.config.text, backend.dtype
        visual = self._visual_for(rows)
        t_prefill = time.perf_counter()
        if len(rows) == 1:
            row = rows[0]
            kept, cache = 0, TextCache.empty(cfg, 1, dtype)
            if reuse is not None:
                kept = min(common_prefix(row.text, reuse[0]), len(row.text) - 1)
                cache = reuse[1].truncated(kept)
            logits, cache = backend.forward(_ids([row.text[kept:]]), _ids([row.positions[kept:]]), cache, visual)
            if row.visual is not None:
                self._keep_prefix(row, cache)
            last = logits[:, -1]
        else:
            width = max(len(r.text) for r in rows)
            ids = _ids([r.text + [0] * (width - len(r.text)) for r in rows])
            pos = _ids([r.positions + [PAD_POSITION] * (width - len(r.text)) for r in rows])
            logits, cache = backend.forward(ids, pos, TextCache.empty(cfg, len(rows), dtype), visual)
            last = logits[np.arange(len(rows)), [len(r.text) - 1 for r in rows]]
        prefill_ms = (time.perf_counter() - t_prefill) * 1000
        for r in rows:
            r.timings["prefill"] = prefill_ms

        held = list(rows[0].text)  # ids the cache holds, for a conversation's next turn (batch 1)
        gens = [make_generator(r.params) for r in rows]
        next_pos = [r.positions[-1] + 1 for r in rows]
        t_decode = time.perf_counter()
        while True:
            feed_ids, feed_pos = [], []
            for i, r in enumerate(rows):
                token = 0
                if r.finish is None:
                    token = sample(last[i], r.params, gens[i])
                    if not r.tokens:
                        r.timings["first_token"] = (time.perf_counter() - r.t0) * 1000
                    self._accept(r, token, next_pos[i])
                feed_ids.append(token)
                feed_pos.append(next_pos[i] if r.finish is None else PAD_POSITION)
            if all(r.finish is not None for r in rows):
                break
            logits, cache = backend.forward(_ids(feed_ids)[:, None], _ids(feed_pos)[:, None], cache, visual)
            last = logits[:, -1]
            held.append(feed_ids[0])
            next_pos = [p + 1 if r.finish is None else p for p, r in zip(next_pos, rows)]
        decode_ms = (time.perf_counter() - t_decode) * 1000
        for r in rows:
            r.timings["decode"] = decode_ms
            r.timings["total"] = (time.perf_counter() - r.t0) * 1000
        return cache, held

    def _accept(self, row: _Row, token: int, position: int) -> None:
        """Take a sampled token: EOS, a stop string, the token limit or the context end finish the row."""
        if token in self._eos and not row.ignore_eos:
            row.finish = "stop"
            return
        row.tokens.append(token)
        if row.stream.push(token) and not row.ignore_eos:
            row.finish = "stop"
        elif len(row.tokens) >= row.max_new_tokens or position + 1 >= self.backend.max_context:
            row.finish = "length"

    def _result(self, row: _Row) -> Result:
        return Result(row.ids, row.tokens, row.stream.finish().strip(), row.finish or "length", row.visual_status,
                      self.backend.name, row.timings)


class Chat:
    """A conversation: the text K/V stays between turns, the image's K/V for the whole chat."""

    def __init__(self, session: Session, pixels: np.ndarray | None = None):
        self.session = session
        self.reset(pixels)

    def reset(self, pixels: np.ndarray | None = None) -> None:
        self.pixels = pixels
        self.turns: list[tuple[str, str | None]] = []
        self._cache: tuple[list[int], TextCache] | None = None
        self._visual: VisualKV | None = None

    def ask(self, question: str, params: SamplingParams = SamplingParams(), max_new_tokens: int = 128,
            on_text: OnText | None = None) -> Result:
        s = self.session
        message = user_message(question, self.pixels is not None and not self.turns)
        turns = self.turns + [(message, None)]
        request = Request(question, self.pixels, params, max_new_tokens)
        row = s._row(s._prompt_ids(turns), request, on_text, self._visual)
        self._visual = row.visual
        cache, held = s._run([row], self._cache)
        result = s._result(row)
        self.turns = turns[:-1] + [(message, result.text)]
        self._cache = (held, cache)
        return result
