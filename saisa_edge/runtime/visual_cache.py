"""The visual K/V cache, the point of SAISA: an image is encoded once, then every request
about it reads the same read-only K/V (no copies; another RoPE offset is a rotation).

In memory: LRU under a byte budget, safe under concurrent use (one computation per image
at a time). On disk (optional): one safetensors file per image under its own budget (LRU
by access time), written to a temporary name and renamed into place. A file carries its
full key (format version, model identity, dtype, storage, pixel digest) and the offset
it was computed at inside the checksummed content, so a file copied or linked under
another image's name is a miss, never a wrong answer. A file that is unreadable,
corrupt or from another key is deleted and the image recomputed. Every disk failure
(full disk, an entry that cannot be removed, a directory in an entry's place) is a
warning and the cache goes on in memory only.

The folder may be shared with other files: only names of the scheme below are ever
written or removed (`saisa-kv-<key>.safetensors`, temporaries `.saisa-kv-<key>.tmp-<pid>-<tag>`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_arrays, save as save_arrays

from saisa_edge.artifacts.folders import writer_alive
from saisa_edge.config import TextConfig
from saisa_edge.errors import SaisaError
from saisa_edge.progress import warn
from saisa_edge.runtime.kv import VisualKV
from saisa_edge.runtime.kv_storage import STORAGES, PackedKV, pack, unpack

FORMAT_VERSION = "3"
PREFIX = "saisa-kv-"
SUFFIX = ".safetensors"
DEFAULT_DISK_MB = 8192.0
STALE_SECONDS = 3600  # a temporary file this old belongs to a writer that died
ORPHAN_SECONDS = 60  # ... or this old when its writer's pid is gone from this machine

# safetensors' numpy API knows no bf16 or fp8: such arrays are stored as same-width integers
# (the file records the real dtype) and viewed back.
_STORED_AS = {"bfloat16": np.dtype(np.uint16), "float8_e4m3fn": np.dtype(np.uint8)}


def pixel_digest(pixels: np.ndarray) -> str:
    """Identity of a preprocessed image (its fp32 pixels)."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()


def budget_bytes(mb: float, flag: str) -> int:
    """A size in MiB from a flag or an argument, as bytes (`inf`, NaN and negatives refused)."""
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb < 0:
        raise SaisaError(f"{flag} {mb}: give a finite number of MiB >= 0")
    return int(mb * 2**20)


@dataclass(frozen=True)
class EntryKey:
    """Everything a cached entry depends on; all of it is checked when a file is read."""

    identity: str
    dtype: str
    storage: str
    pixels: str

    @property
    def digest(self) -> str:
        text = f"{FORMAT_VERSION}|{self.identity}|{self.dtype}|{self.storage}|{self.pixels}"
        return hashlib.sha256(text.encode()).hexdigest()


def _content_digest(key: EntryKey, start: int, arrays: dict[str, np.ndarray]) -> str:
    """Checksum of the key, the offset and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"{FORMAT_VERSION}|{key.identity}|{key.dtype}|{key.storage}|{key.pixels}|{start}".encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"|{name}|{a.dtype.name}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def encode(key: EntryKey, kv: PackedKV) -> bytes:
    """A cache file's bytes: safetensors with the key and checksum in its metadata."""
    arrays = kv.arrays()
    start = int(kv.starts[0])
    stored = {n: a.view(_STORED_AS.get(a.dtype.name, a.dtype)) for n, a in arrays.items()}
    meta = {"format": FORMAT_VERSION, "model": key.identity, "dtype": key.dtype, "storage": key.storage,
            "pixels": key.pixels, "start": str(start), "layers": str(len(kv.keys)),
            "dtypes": json.dumps({n: a.dtype.name for n, a in arrays.items()}),
            "sha256": _content_digest(key, start, arrays)}
    return bytes(save_arrays(stored, metadata=meta))


def decode(data: bytes, key: EntryKey, layers: int) -> PackedKV:
    """A cache file's entry, or ValueError saying why it is not this key's."""
    if len(data) < 8:
        raise ValueError("truncated")
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    found = (meta.get("format"), meta.get("model"), meta.get("dtype"), meta.get("storage"), meta.get("pixels"))
    if found != (FORMAT_VERSION, key.identity, key.dtype, key.storage, key.pixels):
        raise ValueError("written for another image, model, precision, storage or format version")
    if int(meta.get("layers", -1)) != layers:
        raise ValueError("written for another number of layers")
    dtypes = json.loads(meta["dtypes"])
    stored = load_arrays(data)
    arrays = {name: a.view(np.dtype(dtypes[name]) if dtypes[name] in _STORED_AS else a.dtype)
              for name, a in stored.items()}
    if dtypes.keys() != arrays.keys() or any(a.dtype.name != dtypes[n] for n, a in arrays.items()):
        raise ValueError("arrays do not match their recorded dtypes")
    start = int(meta["start"])
    if _content_digest(key, start, arrays) != meta.get("sha256"):
        raise ValueError("checksum mismatch")
    return PackedKV.from_arrays(key.storage, arrays, layers, start)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_hits: int = 0
    disk_discarded: int = 0
    disk_evictions: int = 0


class VisualCache:
    """Visual K/V by image, for one model (`identity`) at one compute dtype name (`dtype`),
    stored as `storage` (native, int8 or fp8). `folder` adds a disk cache of at most
    `disk_budget_bytes`."""

    def __init__(self, cfg: TextConfig, identity: str, dtype: str, budget_bytes: int,
                 folder: Path | None = None, storage: str = "native",
                 disk_budget_bytes: int = int(DEFAULT_DISK_MB * 2**20)):
        if storage not in STORAGES:
            raise SaisaError(f"--cache-storage {storage}: choose one of {', '.join(STORAGES)}")
        self.cfg, self.identity, self.dtype, self.budget = cfg, identity, dtype, budget_bytes
        self.storage, self.disk_budget = storage, disk_budget_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, PackedKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._disk_lock = threading.Lock()
        self._gates = [threading.Lock() for _ in range(64)]  # one computation per image at a time
        self.folder, self.writable = _open_folder(folder) if folder is not None else (None, False)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def entry_key(self, pixels: np.ndarray) -> EntryKey:
        return EntryKey(self.identity, self.dtype, self.storage, pixel_digest(pixels))

    def key(self, pixels: np.ndarray) -> str:
        return self.entry_key(pixels).digest

    def get(self, pixels: np.ndarray, start: int, compute: Callable[[], VisualKV]) -> tuple[VisualKV, bool]:
        """The image's visual K/V placed at `start`, and whether it came from the cache.

        `compute()` must return the K/V of this image at `start`; it runs at most once per
        image at a time, however many threads ask.
        """
        key = self.entry_key(pixels)
        digest = key.digest
        with self._gates[int(digest[:8], 16) % len(self._gates)]:
            found = self._lookup(key)
            if found is not None:
                return unpack(found, self.dtype).moved_to(self.cfg, start), True
            kv = compute()
            with self._lock:
                self.stats.misses += 1
            packed = pack(kv, self.storage)
            self._remember(digest, packed)
            folder = self.folder
            if self.writable and folder is not None:
                self._write(folder, key, packed)
            return (kv if self.storage == "native" else unpack(packed, self.dtype)), False

    def _lookup(self, key: EntryKey) -> PackedKV | None:
        digest = key.digest
        with self._lock:
            kv = self._entries.get(digest)
            if kv is not None:
                self._entries.move_to_end(digest)
                self.stats.hits += 1
                return kv
        folder = self.folder  # one read: a disk failure in another thread may turn it off
        kv = self._read(folder, key) if folder is not None else None
        if kv is not None:
            with self._lock:
                self.stats.hits += 1
                self.stats.disk_hits += 1
            self._remember(digest, kv)
        return kv

    def _remember(self, digest: str, kv: PackedKV) -> None:
        size = kv.nbytes
        if size > self.budget:
            return
        with self._lock:
            if digest in self._entries:
                return
            while self._bytes + size > self.budget:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.stats.evictions += 1
            self._entries[digest] = kv
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # --- disk -------------------------------------------------------------------------------

    def path(self, key: EntryKey, folder: Path | None = None) -> Path:
        """Where `key`'s file lives (in `folder`, else the cache's folder)."""
        base = folder or self.folder
        if base is None:
            raise ValueError("this cache has no folder")
        return base / f"{PREFIX}{key.digest}{SUFFIX}"

    def _memory_only(self, why: str) -> None:
        warn(f"visual cache: {why}; keeping the cache in memory only")
        self.folder, self.writable = None, False

    def _write(self, folder: Path, key: EntryKey, kv: PackedKV) -> None:
        path = self.path(key, folder)
        data = encode(key, kv)
        if len(data) > self.disk_budget:
            return
        tmp = path.with_name(f".{path.name[: -len(SUFFIX)]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with self._disk_lock:
                self._make_room(folder, len(data))
                _write_file(tmp, data)
                os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._memory_only(f"cannot write {path} ({e})")

    def _make_room(self, folder: Path, incoming: int) -> None:
        """Remove the least recently used entries until `incoming` bytes fit the disk budget."""
        entries = []
        for p in folder.glob(f"{PREFIX}*{SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # another process removed it
            entries.append((st.st_atime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total + incoming <= self.disk_budget:
                break
            p.unlink(missing_ok=True)
            total -= size
            with self._lock:
                self.stats.disk_evictions += 1

    def _read(self, folder: Path, key: EntryKey) -> PackedKV | None:
        path = self.path(key, folder)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # a directory or an unreadable file in the entry's place
            self._discard(path, str(e))
            return None
        try:
            kv = decode(data, key, self.cfg.num_hidden_layers)
        except Exception as e:  # anything malformed (safetensors raises its own error type)
            self._discard(path, str(e) or type(e).__name__)
            return None
        if self.writable:
            try:
                os.utime(path, (time.time(), path.stat().st_mtime))  # access time: the disk LRU's order
            except OSError:
                pass
        return kv

    def _discard(self, path: Path, why: str) -> None:
        warn(f"visual cache: discarding {path} ({why}); recomputing the image")
        with self._lock:
            self.stats.disk_discarded += 1
        if not self.writable:
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as e:  # undeletable, or a directory: never read it again
            self._memory_only(f"cannot remove {path} ({e})")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _open_folder(folder: Path) -> tuple[Path | None, bool]:
    """(folder, writable): a writable folder has its own dead writers' temporaries removed; a
    read-only one still serves its valid entries; an unusable one is None (memory only)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warn(f"--cache-dir {folder}: not writable ({e}); running without a persistent cache")
        return None, False
    try:
        _probe(folder)
    except OSError as e:
        if not os.access(folder, os.R_OK | os.X_OK):
            warn(f"--cache-dir {folder}: not readable ({e}); running without a persistent cache")
            return None, False
        warn(f"--cache-dir {folder}: read-only ({e}); using its entries, writing none")
        return folder, False
    for tmp in folder.glob(f".{PREFIX}*.tmp-*"):
        try:
            if _orphan(tmp):
                tmp.unlink()
        except OSError:
            continue  # another process's, or gone already
    return folder, True


def _probe(folder: Path) -> None:
    """Raises OSError unless a file can be created and removed in `folder`."""
    probe = folder / f".{PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    probe.write_bytes(b"")
    probe.unlink()


def _orphan(tmp: Path) -> bool:
    """A temporary whose writer died: old, or its pid gone from this machine for a while."""
    age = time.time() - tmp.stat().st_mtime
    if age > STALE_SECONDS:
        return True
    try:
        pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except (ValueError, IndexError):
        return False
    return age > ORPHAN_SECONDS and not writer_alive(pid)
