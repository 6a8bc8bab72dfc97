"""The one thread that owns the model: a bounded queue in front of the in-flight batcher.

HTTP handlers `submit` tickets from any thread and get events back through `emit`
(`text` pieces, then `done` with the result, or `error` with an ApiError); `cancel` (a
client that went away) takes effect at the next step boundary and frees the row. A ticket
older than its timeout leaves the queue or the batch with a 503.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from saisa_edge.errors import SaisaError
from saisa_edge.runtime.batcher import Batcher, Slot
from saisa_edge.runtime.session import PromptTooLong, Request, Session
from saisa_edge.serve.metrics import Metrics
from saisa_edge.serve.protocol import ApiError

Emit = Callable[[str, Any], None]
RETRY_AFTER_S = 1


@dataclass(eq=False)
class Ticket:
    ids: list[int]
    request: Request
    stops: tuple[str, ...]
    emit: Emit
    deadline: float
    arrived: float = field(default_factory=time.perf_counter)
    slot: Slot | None = None
    cancelled: bool = False

    def on_text(self, piece: str) -> None:
        self.emit("text", piece)


class Scheduler:
    def __init__(self, session: Session, metrics: Metrics, max_batch: int = 8, max_queue: int = 64,
                 max_prefill_tokens: int = 512, timeout_s: float = 600.0):
        self.session, self.metrics, self.max_queue, self.timeout_s = session, metrics, max_queue, timeout_s
        self.batcher = Batcher(session, max_batch, max_prefill_tokens)
        self.queue: deque[Ticket] = deque()
        self._live: dict[Slot, Ticket] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def running(self) -> int:
        return len(self._live)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="saisa-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for t in [*self.queue, *self._live.values()]:
            t.emit("error", ApiError(503, "the server is shutting down", "shutting_down", RETRY_AFTER_S))

    def submit(self, ids: list[int], request: Request, stops: tuple[str, ...], emit: Emit) -> Ticket:
        """Queue a request, or ApiError 429 (queue full) / 503 (not running), both with Retry-After."""
        with self._cond:
            if not self.alive:
                raise ApiError(503, "the server is not accepting requests", "not_running", RETRY_AFTER_S)
            if len(self.queue) >= self.max_queue + max(self.batcher.room, 0):  # free rows take it at once
                raise ApiError(429, f"the queue is full ({self.max_queue} waiting); retry later", "queue_full",
                               RETRY_AFTER_S)
            ticket = Ticket(ids, request, stops, emit, time.perf_counter() + self.timeout_s)
            self.queue.append(ticket)
            self._cond.notify()
            return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._cond:
            ticket.cancelled = True
            self._cond.notify()

    # --- the model's thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.queue and self.batcher.idle:
                    self._cond.wait()
                if self._stopping:
                    return
                self._admit()
            now = time.perf_counter()
            for slot, t in self._live.items():
                if t.cancelled or now > t.deadline:
                    self.batcher.cancel(slot)
            rows = len(self.batcher.decoding)
            t0 = time.perf_counter()
            try:
                left = self.batcher.step()
            except Exception as e:  # the backend failed: every row in flight fails, the server goes on
                self._fail_all(e)
                continue
            with self.metrics.lock:
                if rows:
                    self.metrics.batch.observe(rows)
                    self.metrics.tpot.observe(time.perf_counter() - t0, rows)
            for slot in left:
                self._deliver(self._live.pop(slot), slot)

    def _admit(self) -> None:
        """Queue -> batch while it has room; cancelled or expired tickets leave the queue."""
        now = time.perf_counter()
        for t in [t for t in self.queue if t.cancelled or now > t.deadline]:
            self.queue.remove(t)
            if not t.cancelled:
                t.emit("error", ApiError(503, f"timed out after {self.timeout_s:g} s in the queue", "timeout",
                                         RETRY_AFTER_S))
        while self.queue and self.batcher.room > 0:
            t = self.queue.popleft()
            t.slot = self.batcher.submit(t.ids, t.request, t.on_text, t.stops)
            self._live[t.slot] = t

    def _deliver(self, t: Ticket, slot: Slot) -> None:
        if t.cancelled:
            t.emit("cancelled", None)
        elif slot.cancelled:  # the scheduler cancelled it: its time ran out
            t.emit("error", ApiError(503, f"timed out after {self.timeout_s:g} s", "timeout", RETRY_AFTER_S))
        elif slot.error is not None or slot.result is None:
            e = slot.error
            if isinstance(e, PromptTooLong):
                t.emit("error", ApiError(413, str(e), "prompt_too_long"))
            elif isinstance(e, SaisaError):
                t.emit("error", ApiError(400, str(e)))
            else:
                t.emit("error", ApiError(500, f"internal error ({type(e).__name__})"))
        else:
            t.emit("done", slot)

    def _fail_all(self, error: Exception) -> None:
        for t in self._live.values():
            t.emit("error", ApiError(500, f"internal error ({type(error).__name__}); the request was dropped"))
        self._live.clear()
        b = self.batcher
        self.batcher = Batcher(self.session, b.max_batch, b.max_prefill_tokens)
