"""Incremental detokenisation with stop strings: text is released as soon as it is final."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TextStream:
    """Feed generated ids; `on_text` gets each new piece of final text.

    Text is held back while it could still change: while it ends in an incomplete
    UTF-8 sequence, in a run of byte-fallback tokens (a sentencepiece decoder turns
    every byte of an invalid run into U+FFFD, earlier bytes included) or in what could
    be the start of a stop string. A completed stop string ends the stream and is dropped.
    """

    decode: Callable[[list[int]], str]
    stops: tuple[str, ...]
    on_text: Callable[[str], None] | None = None
    byte_ids: frozenset[int] = frozenset()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    stopped: bool = False
    text: str = ""

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared."""
        self.ids.append(token)
        full = self.decode(self.ids)
        for stop in self.stops:
            cut = full.find(stop)
            if stop and cut >= 0:
                self.stopped = True
                full = full[:cut]
        self.text = full
        if self.stopped:
            self._emit(len(full))
            return True
        hold = max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        if full.endswith("\ufffd"):
            hold = max(hold, 1)
        settled = len(self.ids)
        while settled and self.ids[settled - 1] in self.byte_ids:
            settled -= 1
        if settled < len(self.ids):
            hold = max(hold, len(full) - len(os.path.commonprefix([full, self.decode(self.ids[:settled])])))
        self._emit(len(full) - hold)
        return False

    def finish(self) -> str:
        self._emit(len(self.text))
        return self.text

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            if self.on_text:
                self.on_text(self.text[self.emitted : upto])
            self.emitted = upto
