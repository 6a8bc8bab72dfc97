"""In-flight batching on a Session: requests join a running batch between decode steps and
leave it as soon as they finish, so nobody waits for the longest answer of a fixed batch.

One `step()` is one scheduling round, run by one thread that owns the backend:

1. prefill: rows waiting to join are prepared (their image's visual K/V from the session's
   cache: one vision computation per image, later rows are hits) and their prompt text run,
   every joining row's next chunk in one forward, at most `max_prefill_tokens` per step (an
   image that is computed counts as its visual positions), so a long prompt cannot stall
   the decoding rows for long and a burst of arrivals is prefilled together;
2. every decoding row, and every row whose prefill just ended, samples its next token;
3. finished and cancelled rows leave; the rest, with the newcomers, decode one step together.

Rows of one batch may be at any position: the text caches of rows that join are padded
with PAD_POSITION, which no real query sees, and columns no row uses any more are dropped.
Rows about one image (same pixels, same offset) share one VisualKV object, so the batch
passes it once. Everything here is written against the Backend protocol and TextCache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from saisa_edge.runtime.kv import PAD_POSITION, TextCache, VisualKV
from saisa_edge.runtime.sampling import make_generator, sample
from saisa_edge.runtime.session import OnText, Request, Result, Session, _ids, _Row, common_prefix
from saisa_edge.runtime.visual_cache import pixel_digest

CANCELLED = "cancelled"


@dataclass(eq=False)
class Slot:
    """One request's place in the batcher; `result` (or `error`) is set when it leaves."""

    ids: list[int]
    request: Request
    on_text: OnText | None
    stops: tuple[str, ...] = ()  # the request's own stop strings, beside the template's
    submitted: float = field(default_factory=time.perf_counter)
    row: _Row | None = None
    cache: TextCache | None = None  # the row's own text K/V while it is prefilled
    done: int = 0  # prompt text tokens already in `cache`
    next_pos: int = 0
    last: np.ndarray | None = None  # logits the next token is sampled from
    token: int = 0  # the token the next decode step feeds
    gen: np.random.Generator | None = None
    visual_key: tuple[str, int] | None = None  # (pixel digest, image offset): rows sharing it share K/V
    decode_start: float | None = None
    cancelled: bool = False
    result: Result | None = None
    error: Exception | None = None
    prefix_reused: int = 0


def pad_columns(cache: TextCache, width: int) -> TextCache:
    """`cache` widened to `width` entries with padding (zeros at PAD_POSITION)."""
    extra = width - cache.length
    if extra == 0:
        return cache
    widen = [(0, 0), (0, 0), (0, extra), (0, 0)]
    return TextCache(tuple(np.pad(k, widen) for k in cache.keys), tuple(np.pad(v, widen) for v in cache.values),
                     np.pad(cache.positions, [(0, 0), (0, extra)], constant_values=PAD_POSITION))


def stack_rows(caches: list[TextCache]) -> TextCache:
    """Batch rows' caches into one (each padded to the longest)."""
    if len(caches) == 1:
        return caches[0]
    width = max(c.length for c in caches)
    padded = [pad_columns(c, width) for c in caches]
    layers = range(len(padded[0].keys))
    return TextCache(tuple(np.concatenate([c.keys[i] for c in padded]) for i in layers),
                     tuple(np.concatenate([c.values[i] for c in padded]) for i in layers),
                     np.concatenate([c.positions for c in padded]))


def take_rows(cache: TextCache, rows: list[int]) -> TextCache:
    """The given rows, without the columns that only padding fills in all of them."""
    positions = cache.positions[rows]
    used = np.flatnonzero((positions != PAD_POSITION).any(axis=0))
    return TextCache(tuple(k[rows][:, :, used] for k in cache.keys), tuple(v[rows][:, :, used] for v in cache.values),
                     positions[:, used])


def _remaining(slot: Slot) -> int:
    """Prompt tokens of a prepared row not yet run."""
    return len(slot.row.text) - slot.done if slot.row is not None else 0


def _live(slot: Slot) -> bool:
    return slot.row is not None and slot.row.finish is None and not slot.cancelled


class Batcher:
    """Step-level generation for one thread: `submit`, then `step()` until `idle`."""

    def __init__(self, session: Session, max_batch: int = 8, max_prefill_tokens: int = 512):
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1")
        self.session, self.max_batch, self.max_prefill_tokens = session, max_batch, max_prefill_tokens
        self.waiting: deque[Slot] = deque()  # submitted, not prepared
        self.prefilling: deque[Slot] = deque()  # prepared, prompt partly run
        self.decoding: list[Slot] = []  # the batch, in the order of `cache`'s rows
        self.cache: TextCache | None = None
        self.visual: VisualKV | None = None
        self.vision_runs = 0  # images whose K/V this batcher computed (a wait on another's is a hit)

    @property
    def size(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    @property
    def room(self) -> int:
        return self.max_batch - self.size

    @property
    def idle(self) -> bool:
        return self.size == 0

    def submit(self, ids: list[int], request: Request, on_text: OnText | None = None,
               stops: tuple[str, ...] = ()) -> Slot:
        """Queue a prompt (ids from the template, with the image marker) to join the batch."""
        if self.room <= 0:
            raise RuntimeError("batcher is full: check `room` before submitting")
        slot = Slot(ids, request, on_text, stops)
        self.waiting.append(slot)
        return slot

    def cancel(self, slot: Slot) -> None:
        """The slot leaves at the next step (its client went away or its time ran out)."""
        slot.cancelled = True

    def step(self) -> list[Slot]:
        """One round: prefill within the budget, sample, drop finished rows, decode once. Returns the
        slots that left (result or error set)."""
        left = [s for s in (*self.waiting, *self.prefilling) if s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self.prefilling = deque(s for s in self.prefilling if not s.cancelled)
        joined = self._prefill()
        left += [s for s in joined if s.error is not None]
        joined = [s for s in joined if s.error is None]
        for slot in (*self.decoding, *joined):
            if not slot.cancelled:
                self._sample(slot)
        keep = [i for i, s in enumerate(self.decoding) if _live(s)]
        left += [s for s in (*self.decoding, *joined) if not _live(s)]
        self._regroup(keep, [s for s in joined if _live(s)])
        if self.decoding:
            self._decode()
        for slot in left:
            self._leave(slot)
        return left

    # --- internals ------------------------------------------------------------------------

    def _prefill(self) -> list[Slot]:
        """Prepare and run prompts within the step's token budget, all chunks in one forward;
        returns the rows whose prompt is done (or that failed)."""
        budget, plan, failed = self.max_prefill_tokens, [], []
        for slot in self.prefilling:  # rows part-way through a long prompt go first
            if budget <= 0:
                break
            plan.append((slot, min(budget, _remaining(slot))))
            budget -= plan[-1][1]
        while budget > 0 and self.waiting:
            slot = self.waiting.popleft()
            budget -= self._prepare(slot)
            if slot.error is not None:
                failed.append(slot)
                continue
            self.prefilling.append(slot)
            if budget > 0:
                plan.append((slot, min(budget, _remaining(slot))))
                budget -= plan[-1][1]
        if plan:
            self._run_chunks(plan)
        done = [s for s in self.prefilling if _remaining(s) == 0]
        self.prefilling = deque(s for s in self.prefilling if _remaining(s) > 0)
        return failed + done

    def _prepare(self, slot: Slot) -> int:
        """The row (image K/V from the cache or computed) and its reusable prefix; returns its cost."""
        s = self.session
        try:
            row = s._row(slot.ids, slot.request, slot.on_text)
        except Exception as e:  # a request's failure is its own, never the batch's
            slot.error = e
            return 1
        row.stream.stops += slot.stops
        row.timings["queue"] = (row.t0 - slot.submitted) * 1000
        row.t0 = slot.submitted
        cost = 0
        if row.visual_status == "miss":
            self.vision_runs += 1
            cost = s.backend.config.num_visual_tokens
        if row.visual is not None and slot.request.pixels is not None:
            slot.visual_key = (pixel_digest(slot.request.pixels), row.start)
            row.visual = self._shared_visual(slot.visual_key, row.visual)
        slot.row, slot.gen = row, make_generator(slot.request.params)
        slot.next_pos = row.positions[-1] + 1
        slot.cache = TextCache.empty(s.backend.config.text, 1, s.backend.dtype)
        reuse = s._pre_image_prefix(row) if row.visual is not None else None
        if reuse is not None:
            kept = min(common_prefix(row.text, reuse[0]), len(row.text) - 1)
            slot.cache, slot.done, slot.prefix_reused = reuse[1].truncated(kept), kept, kept
        row.timings["prefill"] = 0.0
        return max(cost, 1)

    def _shared_visual(self, key: tuple[str, int], visual: VisualKV) -> VisualKV:
        """The VisualKV object a live row about the same image at the same offset already has."""
        for other in (*self.decoding, *self.prefilling):
            if other.visual_key == key and other.row is not None and other.row.visual is not None:
                return other.row.visual
        return visual

    def _run_chunks(self, plan: list[tuple[Slot, int]]) -> None:
        """The next `n` prompt tokens of each planned row, in one forward (padded by position)."""
        width = max(n for _, n in plan)
        rows, caches, ids, pos = [], [], [], []
        for slot, n in plan:
            row = slot.row
            assert row is not None and slot.cache is not None
            rows.append(row)
            caches.append(slot.cache)
            ids.append(row.text[slot.done:slot.done + n] + [0] * (width - n))
            pos.append(row.positions[slot.done:slot.done + n] + [PAD_POSITION] * (width - n))
        t = time.perf_counter()
        logits, cache = self.session.backend.forward(_ids(ids), _ids(pos), stack_rows(caches),
                                                     self.session._visual_for(rows))
        ms = (time.perf_counter() - t) * 1000
        for i, (slot, n) in enumerate(plan):
            row = slot.row
            assert row is not None
            slot.cache = cache if len(plan) == 1 else take_rows(cache, [i])
            slot.done += n
            slot.last = logits[i, n - 1]
            row.timings["prefill"] += ms
            if _remaining(slot) == 0 and row.visual is not None:
                self.session._keep_prefix(row, slot.cache)

    def _sample(self, slot: Slot) -> None:
        row = slot.row
        assert row is not None and slot.last is not None and slot.gen is not None
        token = sample(slot.last, row.params, slot.gen)
        if not row.tokens:
            slot.decode_start = time.perf_counter()
            row.timings["first_token"] = (slot.decode_start - row.t0) * 1000
        self.session._accept(row, token, slot.next_pos)
        slot.token = token
        slot.next_pos += 1

    def _regroup(self, keep: list[int], fresh: list[Slot]) -> None:
        """The batch cache for the rows that stay plus the rows that join."""
        if len(keep) == len(self.decoding) and not fresh:
            return
        parts = []
        if keep and self.cache is not None:
            parts.append(take_rows(self.cache, keep))
        parts += [s.cache for s in fresh if s.cache is not None]
        self.decoding = [self.decoding[i] for i in keep] + fresh
        for s in fresh:
            s.cache = None
        self.cache = stack_rows(parts) if parts else None
        rows = [s.row for s in self.decoding if s.row is not None]
        self.visual = self.session._visual_for(rows) if rows else None

    def _decode(self) -> None:
        assert self.cache is not None
        feed = _ids([[s.token] for s in self.decoding])
        pos = _ids([[s.next_pos - 1] for s in self.decoding])
        logits, self.cache = self.session.backend.forward(feed, pos, self.cache, self.visual)
        for i, s in enumerate(self.decoding):
            s.last = logits[i, -1]

    def _leave(self, slot: Slot) -> None:
        row = slot.row
        if row is None or slot.error is not None:
            if slot.error is None:
                slot.error = RuntimeError(CANCELLED)
            return
        if slot.cancelled and row.finish is None:
            row.finish = CANCELLED
        now = time.perf_counter()
        if slot.decode_start is not None:
            row.timings["decode"] = (now - slot.decode_start) * 1000
        row.timings["total"] = (now - row.t0) * 1000
        slot.result = self.session._result(row)
