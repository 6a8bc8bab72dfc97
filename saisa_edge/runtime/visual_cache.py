"""The visual K/V cache, the point of SAISA: an image is encoded once, then every request
about it reads the same read-only K/V (no copies; another RoPE offset is a rotation).

In memory: LRU under a byte budget, safe under concurrent use (one computation per image
at a time). On disk (optional): one safetensors file per image, written to a temporary
name and renamed into place, carrying format version, model identity, dtype, storage
(see `kv_storage`) and a checksum; a file that is unreadable, corrupt or from another model is deleted and the
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
from saisa_edge.runtime.kv_storage import STORAGES, PackedKV, pack, unpack

FORMAT_VERSION = "2"


def pixel_digest(pixels: torch.Tensor) -> str:
    """Identity of a preprocessed image (its fp32 pixels)."""
    data = pixels.detach().to(torch.float32).contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _payload_digest(kv: PackedKV) -> str:
    h = hashlib.sha256()
    for name, t in kv.tensors().items():
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_hits: int = 0
    disk_discarded: int = 0


class VisualCache:
    """Visual K/V by image, for one model (`identity`) at one precision (`dtype`), stored
    as `storage` (native, int8 or fp8)."""

    def __init__(self, cfg: TextConfig, identity: str, dtype: torch.dtype, budget_bytes: int,
                 folder: Path | None = None, storage: str = "native"):
        if storage not in STORAGES:
            raise ValueError(storage)
        self.cfg, self.identity, self.dtype, self.budget = cfg, identity, dtype, budget_bytes
        self.storage = storage
        self.folder = _usable_folder(folder) if folder is not None else None
        self.stats = CacheStats()
        self._entries: OrderedDict[str, PackedKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._gates = [threading.Lock() for _ in range(64)]  # one computation per image at a time

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, pixels: torch.Tensor) -> str:
        text = f"{FORMAT_VERSION}|{self.identity}|{self.dtype}|{self.storage}|{pixel_digest(pixels)}"
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
                return unpack(found, self.dtype).moved_to(self.cfg, start), True
            kv = compute()
            with self._lock:
                self.stats.misses += 1
            packed = pack(kv, self.storage)
            self._remember(key, packed)
            if self.folder is not None:
                self._write(key, packed)
            return (kv if self.storage == "native" else unpack(packed, self.dtype)), False

    def _lookup(self, key: str) -> PackedKV | None:
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

    def _remember(self, key: str, kv: PackedKV) -> None:
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

    def _metadata(self, kv: PackedKV) -> dict[str, str]:
        return {"format": FORMAT_VERSION, "model": self.identity, "dtype": str(self.dtype), "storage": self.storage,
                "start": str(int(kv.starts[0])), "layers": str(len(kv.keys)), "sha256": _payload_digest(kv)}

    def _write(self, key: str, kv: PackedKV) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            save_file(kv.tensors(), str(tmp), metadata=self._metadata(kv))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warn(f"visual cache: cannot write {path} ({e}); keeping the image in memory only")

    def _read(self, key: str) -> PackedKV | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                layers = int(meta.get("layers", -1))
                if (meta.get("format"), meta.get("model"), meta.get("dtype"), meta.get("storage")) != (
                        FORMAT_VERSION, self.identity, str(self.dtype), self.storage) \
                        or layers != self.cfg.num_hidden_layers:
                    raise ValueError("written by another model, precision, storage or format version")
                named = {name: f.get_tensor(name) for name in f.keys()}
            kv = PackedKV.from_tensors(self.storage, named, layers, int(meta["start"]))
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
