"""Every artifact folder is written to a temporary sibling and renamed into place,
and carries a manifest with the versions that made it and a checksum per file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from saisa_edge import __version__
from saisa_edge.errors import SaisaError

MANIFEST_NAME = "saisa-edge-manifest.json"
MANIFEST_VERSION = 1
_LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime", "numpy")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    kind: str
    details: dict[str, Any]
    files: dict[str, FileEntry]
    saisa_edge_version: str = __version__
    manifest_version: int = MANIFEST_VERSION
    libraries: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_manifest(folder: Path, kind: str, details: dict[str, Any]) -> Manifest:
    """Checksum every file under `folder` and write the manifest beside them."""
    files = {
        p.relative_to(folder).as_posix(): FileEntry(sha256_file(p), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = Manifest(kind, details, files, libraries=library_versions())
    (folder / MANIFEST_NAME).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest as written, or None when it has none or it cannot be parsed."""
    try:
        return dict(json.loads((folder / MANIFEST_NAME).read_text()))
    except (OSError, ValueError):
        return None


@contextmanager
def atomic_folder(out: Path, force: bool, flag: str = "-o") -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` only once the block finishes."""
    out = Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise SaisaError(f"{flag} {out}: already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
