"""The contrib decoder form on ONNX Runtime: K/V in slot order, in one buffer per loaded
model, bound to the graph through I/O binding and updated in place by GroupQueryAttention.

Slot p of a row holds the K/V of position p. A request's text before the image fills
slots 0..s-1, the image's K/V (computed once by visual_kv.onnx) are copied into slots
s..s+N_v-1 once per request, and the text after the image continues from s+N_v: causal
attention over the slots is then exactly SAISA's attention. A prompt is run row by row, one
call per run of consecutive positions (GroupQueryAttention takes a multi-token chunk after
a past for one row at a time); decode steps run the whole batch, each row at its own slot.

The buffer has one occupant, a `Lineage` (the K/V of one request or conversation as it
grows). A `SlotCache` is a `TextCache` that reads its entries from its lineage; when a
lineage another one displaces is still referenced (a conversation between turns), it keeps
a copy of its slots first, so every cache stays valid. Decode steps allocate nothing: ids,
seqlens and logits live in preallocated arrays bound once per batch size.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import onnxruntime as ort

from saisa_edge.artifacts import names as io
from saisa_edge.backends import Observer
from saisa_edge.config import TextConfig
from saisa_edge.errors import SaisaError
from saisa_edge.runtime.kv import PAD_POSITION, TextCache, VisualKV

KINDS = ("key", "value")


class Lineage:
    """The K/V slots of one request's rows: `data` [layers, 2, rows, kv_heads, slots, head_dim] is
    a view of the shared buffer while this lineage occupies it, else its own copy."""

    def __init__(self, data: np.ndarray, vocab_size: int, lock: threading.RLock):
        self.data, self.lock = data, lock  # the buffer's lock: reads wait for a call that may displace us
        self.filled = np.zeros(data.shape[2], dtype=np.int64)  # per row: slots below this are written
        self.visual: VisualKV | None = None  # the image K/V last written into the slots
        # decode steps' logits, bound as the graph's output: one array per request, not per step
        self.logits = np.zeros((data.shape[2], 1, vocab_size), dtype=np.float32)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)

    @property
    def rows(self) -> int:
        return int(self.data.shape[2])

    def detach(self) -> None:
        """Keep a copy of the written slots: the shared buffer is about to hold another lineage."""
        self.data = self.data[:, :, :, :, : int(self.filled.max(initial=0))].copy()

    def gather(self, positions: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Keys and values [rows, kv_heads, T, head_dim] per layer of the entries at `positions`
        [rows, T] (zeros where a position is padding)."""
        with self.lock:
            data = self.data
            valid = positions < data.shape[4]
            slots = np.where(valid, positions, 0)
            rows = np.arange(positions.shape[0])[:, None]
            mask = valid[:, None, :, None]
            out = [[np.where(mask, data[layer, k][rows, :, slots].transpose(0, 2, 1, 3), 0)
                    for layer in range(data.shape[0])] for k in range(2)]
        return tuple(out[0]), tuple(out[1])

    def scatter(self, cache: TextCache) -> None:
        """Write a text cache's entries into their slots."""
        rows, entries = np.nonzero(cache.positions < self.data.shape[4])
        slots = cache.positions[rows, entries]
        for layer in range(self.data.shape[0]):
            for k, arrays in enumerate((cache.keys, cache.values)):
                self.data[layer, k][rows, :, slots] = arrays[layer][rows, :, entries]
        np.maximum.at(self.filled, rows, slots + 1)

    def place(self, visual: VisualKV) -> None:
        """Copy each row's image K/V into slots start..start+N_v-1 (one image: every row's)."""
        shared = len(visual.starts) == 1
        for row in range(self.rows):
            source = 0 if shared else row
            start = int(visual.starts[source])
            end = start + visual.length
            if end > self.data.shape[4]:  # a row without an image (VisualKV.batch's padding)
                continue
            for layer in range(self.data.shape[0]):
                self.data[layer, 0, row, :, start:end] = visual.keys[layer][source]
                self.data[layer, 1, row, :, start:end] = visual.values[layer][source]
            self.filled[row] = max(int(self.filled[row]), end)
        self.visual = visual


class SlotCache(TextCache):
    """A text cache whose entries live in a lineage's slots (the positions say which);
    keys and values are gathered in text order when read, as a `TextCache` has them."""

    def __init__(self, lineage: Lineage, positions: np.ndarray):
        object.__setattr__(self, "lineage", lineage)
        object.__setattr__(self, "positions", positions)

    lineage: Lineage

    @property
    def keys(self) -> tuple[np.ndarray, ...]:
        return self.lineage.gather(self.positions)[0]

    @property
    def values(self) -> tuple[np.ndarray, ...]:
        return self.lineage.gather(self.positions)[1]

    def truncated(self, n: int) -> TextCache:
        keys, values = self.lineage.gather(self.positions[:, :n])
        return TextCache(keys, values, self.positions[:, :n].copy())

    def copy(self) -> TextCache:
        return self.truncated(self.length)


class SlotDecoder:
    """Runs a contrib decoder graph over the shared K/V buffer ([max_batch, context] slots)."""

    def __init__(self, session: ort.InferenceSession, cfg: TextConfig, context: int, dtype: np.dtype[Any],
                 max_batch: int, observe: Observer | None = None):
        self.session, self.context, self.max_batch = session, context, max_batch
        self._layers = cfg.num_hidden_layers
        # zero-filled on demand by the OS: only the slots a request writes take memory
        self.buffer = np.zeros((self._layers, 2, max_batch, cfg.num_key_value_heads, context, cfg.head_dim), dtype)
        self._occupant: weakref.ref[Lineage] | None = None
        self._ids = np.zeros((max_batch, 1), dtype=np.int64)
        self._seqlens = np.zeros(max_batch, dtype=np.int32)
        self._total = np.zeros((), dtype=np.int32)
        self._vocab = cfg.vocab_size
        self._lock = threading.RLock()  # one buffer: calls (and cache reads) from several threads take turns
        self._steps: dict[int, ort.IOBinding] = {}
        self._observe = observe
        bound = {io.LOGITS, *(io.present(k, i) for i in range(self._layers) for k in KINDS)}
        self._extra = [o.name for o in session.get_outputs() if o.name not in bound] if observe else []

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: TextCache,
                visual: VisualKV | None) -> tuple[np.ndarray, TextCache]:
        """As `Backend.forward`; a decode step's logits are the request's own array, which its next step overwrites."""
        rows, width = ids.shape
        if rows > self.max_batch:
            raise SaisaError(f"a batch of {rows} requests exceeds the {self.max_batch} rows of the K/V buffer; "
                             "open the model with a larger max_batch or send fewer requests at once")
        real = positions < PAD_POSITION
        if np.any(positions[real] >= self.context):
            raise SaisaError(f"position {int(positions[real].max())} is beyond the artifact's context of "
                             f"{self.context}; shorten the prompt or export with a larger --max-context")
        with self._lock:
            lineage = self._lineage(cache, rows)
            if visual is not None and lineage.visual is not visual:
                lineage.place(visual)
            logits = self._step(lineage, ids, positions) if width == 1 else self._prompt(lineage, ids, positions)
            np.maximum.at(lineage.filled, np.nonzero(real)[0], positions[real] + 1)
        return logits, SlotCache(lineage, np.concatenate([cache.positions, positions], axis=1))

    def _lineage(self, cache: TextCache, rows: int) -> Lineage:
        """The lineage `cache` continues, in the shared buffer (moved there if it was elsewhere)."""
        current = self._occupant() if self._occupant is not None else None
        if isinstance(cache, SlotCache) and cache.lineage is current and current.rows == rows:
            return current
        if current is not None:
            current.detach()
        lineage = Lineage(self.buffer[:, :, :rows], self._vocab, self._lock)
        if cache.length:
            lineage.scatter(cache)
        self._occupant = weakref.ref(lineage)
        return lineage

    def _bind_cache(self, binding: ort.IOBinding, rows: slice) -> None:
        for i in range(self._layers):
            for k, kind in enumerate(KINDS):
                value = ort.OrtValue.ortvalue_from_numpy(self.buffer[i, k, rows])
                binding.bind_ortvalue_input(io.past(kind, i), value)
                binding.bind_ortvalue_output(io.present(kind, i), value)
        for name in self._extra:
            binding.bind_output(name)

    def _run(self, binding: ort.IOBinding) -> None:
        self.session.run_with_iobinding(binding)
        if self._observe is not None:
            outputs = binding.get_outputs()  # in binding order: logits, the K/V buffers, then any taps
            taps = outputs[1 + 2 * self._layers:]
            self._observe("decoder", {io.LOGITS: outputs[0].numpy(),
                                      **{name: v.numpy() for name, v in zip(self._extra, taps)}})

    def _step(self, lineage: Lineage, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token per row, the whole batch in one call, each row writing its own slot."""
        rows = ids.shape[0]
        at = positions[:, 0]
        # a finished row (padding) writes past its own entries, where nothing will read
        idle = np.minimum(lineage.filled, self.context - 1)
        self._seqlens[:rows] = np.where(at < self.context, at, idle)
        self._total[...] = int(self._seqlens[:rows].max()) + 1
        self._ids[:rows] = ids
        binding = self._steps.get(rows)
        if binding is None:
            binding = self._steps[rows] = self.session.io_binding()
            for name, array in ((io.INPUT_IDS, self._ids[:rows]), (io.SEQLENS_K, self._seqlens[:rows]),
                                (io.TOTAL_LENGTH, self._total)):
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            binding.bind_ortvalue_output(io.LOGITS, lineage.logits_value)  # bound first: outputs[0]
            self._bind_cache(binding, slice(0, rows))
        else:  # rebinding a name keeps its place
            binding.bind_ortvalue_output(io.LOGITS, lineage.logits_value)
        self._run(binding)
        return lineage.logits

    def _prompt(self, lineage: Lineage, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Several tokens: row by row, one call per run of consecutive positions."""
        logits = np.zeros((*ids.shape, self._vocab), dtype=np.float32)
        for row in range(ids.shape[0]):
            entries = np.nonzero(positions[row] < self.context)[0]
            breaks = np.nonzero(np.diff(positions[row, entries]) != 1)[0] + 1
            for run in np.split(entries, breaks):
                if not run.size:
                    continue
                last = int(positions[row, run[-1]])
                binding = self.session.io_binding()
                binding.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(ids[row:row + 1, run]))
                binding.bind_cpu_input(io.SEQLENS_K, np.array([last], dtype=np.int32))
                binding.bind_cpu_input(io.TOTAL_LENGTH, np.array(last + 1, dtype=np.int32))
                binding.bind_output(io.LOGITS)
                self._bind_cache(binding, slice(row, row + 1))
                self._run(binding)
                logits[row, run] = binding.get_outputs()[0].numpy()[0]
        return logits
