"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms.

Small enough to write here rather than add a dependency: label sets are fixed per metric,
values are guarded by one lock, rendering is a snapshot.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    return "+Inf" if x == math.inf else repr(float(x)) if isinstance(x, float) else str(x)


@dataclass
class Counter:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    kind: str = "counter"
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *labels: str, by: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + by

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self.values.items())]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    kind: str = "histogram"
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float, times: int = 1) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
        self.total += value * times
        self.n += times

    def lines(self) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        out = [f'{self.name}_bucket{{le="{_number(float(b))}"}} {c}' for b, c in zip(self.buckets, counts)]
        return out + [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {_number(self.total)}",
                      f"{self.name}_count {self.n}"]


class Metrics:
    """The server's metrics; those added with `gauge` are read at render time (queue depth, cache bytes...)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = Counter("saisa_requests_total", "Chat completion requests by HTTP status (or cancelled).",
                                ("status",))
        self.tokens = Counter("saisa_generated_tokens_total", "Tokens generated.")
        self.prompt_tokens = Counter("saisa_prompt_tokens_total", "Prompt tokens, visual positions included.")
        self.cache = Counter("saisa_visual_cache_requests_total", "Requests with an image by visual cache outcome.",
                             ("outcome",))
        self.ttft = Histogram("saisa_time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.tpot = Histogram("saisa_time_per_output_token_seconds", "Decode step time, once per row in the batch.",
                              LATENCY_BUCKETS)
        self.batch = Histogram("saisa_batch_size", "Rows in each decode step.", BATCH_BUCKETS)
        self.read: dict[str, tuple[str, str, Callable[[], float]]] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """A value read when rendered (`kind` counter for totals kept elsewhere, e.g. the cache's stats)."""
        self.read[name] = (help, kind, read)

    def render(self) -> str:
        with self.lock:
            out = []
            for m in (self.requests, self.tokens, self.prompt_tokens, self.cache, self.ttft, self.tpot, self.batch):
                out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.lines()]
        for name, (help, kind, read) in self.read.items():
            out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(read())}"]
        return "\n".join(out) + "\n"
