"""The visual K/V cache, the point of SAISA: an image is encoded once, then every request
about it reads the same read-only K/V (no copies; another RoPE offset is a rotation).

In memory: LRU under a byte budget, safe under concurrent use (one computation per image
at a time). On disk (optional): one safetensors file per image, written to a temporary
name and renamed into place, carrying format version, model identity, dtype and a
checksum; a file that is unreadable, corrupt or from another model is deleted and the
image recomputed, never used.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saisa_edge.config import TextConfig
from saisa_edge.model.split import VisualKV
from saisa_edge.progress import warn

FORMAT_VERSION = "1"


def pixel_digest(pixels: torch.Tensor) -> str:
    """Identity of a preprocessed image (its fp32 pixels)."""
    data = pixels.detach().to(torch.float32).contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _payload_digest(kv: VisualKV) -> str:
    h = hashlib.sha256()
    for t in (*kv.keys, *kv.values):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_hits: int = 0
    disk_discarded: int = 0


class VisualCache:
    """Visual K/V by image, for one model (`identity`) at one precision (`dtype`)."""

    def __init__(self, cfg: TextConfig, identity: str, dtype: torch.dtype, budget_bytes: int,
                 folder: Path | None = None):
        self.cfg, self.identity, self.dtype, self.budget = cfg, identity, dtype, budget_bytes
        self.folder = _usable_folder(folder) if folder is not None else None
        self.stats = CacheStats()
        self._entries: OrderedDict[str, VisualKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._gates = [threading.Lock() for _ in range(64)]  # one computation per image at a time

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, pixels: torch.Tensor) -> str:
        text = f"{FORMAT_VERSION}|{self.identity}|{self.dtype}|{pixel_digest(pixels)}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, pixels: torch.Tensor, start: int, compute: Callable[[], VisualKV]) -> tuple[VisualKV, bool]:
        """The image's visual K/V placed at `start`, and whether it came from the cache.

        `compute()` must return the K/V of this image at `start`; it runs at most once per
        image at a time, however many threads ask.
        """
        key = self.key(pixels)
        with self._gates[int(key[:8], 16) % len(self._gates)]:
            found = self._lookup(key)
            if found is not None:
                return found.moved_to(self.cfg, start), True
            kv = compute()
            with self._lock:
                self.stats.misses += 1
            self._remember(key, kv)
            if self.folder is not None:
                self._write(key, kv)
            return kv, False

    def _lookup(self, key: str) -> VisualKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return kv
        kv = self._read(key) if self.folder is not None else None
        if kv is not None:
            with self._lock:
                self.stats.hits += 1
                self.stats.disk_hits += 1
            self._remember(key, kv)
        return kv

    def _remember(self, key: str, kv: VisualKV) -> None:
        size = kv.nbytes
        if size > self.budget:
            return
        with self._lock:
            if key in self._entries:
                return
            while self._bytes + size > self.budget:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.stats.evictions += 1
            self._entries[key] = kv
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # --- disk -------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def _metadata(self, kv: VisualKV) -> dict[str, str]:
        return {"format": FORMAT_VERSION, "model": self.identity, "dtype": str(self.dtype),
                "start": str(int(kv.starts[0])), "layers": str(len(kv.keys)), "sha256": _payload_digest(kv)}

    def _write(self, key: str, kv: VisualKV) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tensors = {f"key.{i}": k.contiguous() for i, k in enumerate(kv.keys)}
        tensors.update({f"value.{i}": v.contiguous() for i, v in enumerate(kv.values)})
        try:
            save_file(tensors, str(tmp), metadata=self._metadata(kv))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warn(f"visual cache: cannot write {path} ({e}); keeping the image in memory only")

    def _read(self, key: str) -> VisualKV | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                layers = int(meta.get("layers", -1))
                if (meta.get("format"), meta.get("model"), meta.get("dtype")) != (
                        FORMAT_VERSION, self.identity, str(self.dtype)) or layers != self.cfg.num_hidden_layers:
                    raise ValueError("written by another model, precision or format version")
                keys = tuple(f.get_tensor(f"key.{i}") for i in range(layers))
                values = tuple(f.get_tensor(f"value.{i}") for i in range(layers))
            kv = VisualKV(keys, values, torch.tensor([int(meta["start"])]))
            if _payload_digest(kv) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            return kv
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            warn(f"visual cache: discarding {path} ({e}); recomputing the image")
            path.unlink(missing_ok=True)
            with self._lock:
                self.stats.disk_discarded += 1
            return None


STALE_SECONDS = 3600  # a temporary file this old belongs to a writer that died


def _usable_folder(folder: Path) -> Path | None:
    """The folder if it can be written (stale temporaries of dead writers removed), else None
    with a warning (the cache stays in memory)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
        for tmp in folder.glob(".*.tmp-*"):
            if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink(missing_ok=True)
        return folder
    except OSError as e:
        warn(f"--cache-dir {folder}: not writable ({e}); running without a persistent cache")
        return None
