"""The manifest every folder carries, and the checks done once when a folder is opened.

A manifest names its folder's kind and a size and sha256 per file. Opening checks, in
order: the JSON's shape, the manifest version, the kind, that every named path stays
inside the folder (no `..`, no absolute path, no symlink out), that every file in the
folder is named, and each file's size and checksum, each file hashed once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from saisa_edge import __version__
from saisa_edge.errors import SaisaError

MANIFEST_NAME = "saisa-edge-manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest is kilobytes; refuse before parsing anything huge
CHECKPOINT_KIND, ARTIFACT_KIND, ENGINE_KIND = "checkpoint", "onnx-artifact", "tensorrt-engines"
KINDS = {CHECKPOINT_KIND: "make-checkpoint", ARTIFACT_KIND: "export", ENGINE_KIND: "build"}  # kind -> its writer
_LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime", "numpy")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


@dataclass(frozen=True)
class Opened:
    """A folder whose manifest and files were checked; `manifest_sha256` identifies the manifest as read."""

    path: Path
    manifest: Manifest
    manifest_sha256: str


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


def _again(kind: str | None) -> str:
    """What to do about a folder whose manifest does not hold: write it again (a checkpoint may
    also be the user's own, once the manifest that no longer describes it is gone)."""
    if kind == CHECKPOINT_KIND:
        return f"run `saisa-edge make-checkpoint` again, or delete {MANIFEST_NAME} to run the folder as your own"
    return f"run `saisa-edge {KINDS[kind]}` again" if kind in KINDS else "write the folder again"


def _load(folder: Path, kind: str | None) -> tuple[dict[str, Any], str]:
    """The manifest's JSON object and the sha256 of its bytes."""
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise SaisaError(f"{folder}: not a folder")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise SaisaError(f"{path}: over {MAX_MANIFEST_BYTES >> 20} MiB, not a saisa-edge manifest")
        data = path.read_bytes()
    except FileNotFoundError:
        what = f"a {kind!r} folder made by `saisa-edge {KINDS[kind]}`" if kind in KINDS else "a saisa-edge folder"
        raise SaisaError(f"{folder}: no {MANIFEST_NAME}; not {what}") from None
    except OSError as e:
        raise SaisaError(f"{path}: unreadable ({e.strerror or e}); {_again(kind)}") from None
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit int, nesting past the recursion limit
        reason = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise SaisaError(f"{path}: not valid JSON ({reason}); {_again(kind)}") from None
    if not isinstance(raw, dict):
        raise SaisaError(f"{path}: holds a JSON {type(raw).__name__}, not a manifest object; {_again(kind)}")
    return raw, hashlib.sha256(data).hexdigest()


def parse_manifest(raw: dict[str, Any], where: Path, kind: str | None = None) -> Manifest:
    """The typed manifest of a JSON object: exact keys, version, `kind` (if given) and file entries."""
    names = {f.name for f in fields(Manifest)}
    again = _again(kind)
    if set(raw) != names:
        missing, extra = sorted(names - set(raw)), sorted(set(raw) - names)
        raise SaisaError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else []))
            + f"; {again}")
    version = raw["manifest_version"]
    if type(version) is not int or version != MANIFEST_VERSION:
        raise SaisaError(f"{where}: manifest_version {version!r}; this saisa-edge reads version {MANIFEST_VERSION} "
                         f"only ({again} with it)")
    if kind is not None and raw["kind"] != kind:
        raise SaisaError(f"{where.parent}: holds a {raw['kind']!r}, not a {kind!r} folder (made by `saisa-edge "
                         f"{KINDS.get(kind, kind)}`)")
    for key, typ in (("kind", str), ("saisa_edge_version", str), ("details", dict), ("files", dict),
                     ("libraries", dict)):
        if not isinstance(raw[key], typ):
            raise SaisaError(f"{where}: {key} is a JSON {type(raw[key]).__name__}, not {typ.__name__}; {again}")
    files = {}
    for name, entry in raw["files"].items():
        ok = (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"} and isinstance(entry["sha256"], str)
              and _SHA256.match(entry["sha256"]) and type(entry["bytes"]) is int and entry["bytes"] >= 0)
        if not ok:
            raise SaisaError(f"{where}: files[{name!r}] is not {{sha256: 64 hex digits, bytes: a size}}; {again}")
        files[name] = FileEntry(entry["sha256"], entry["bytes"])
    return Manifest(raw["kind"], raw["details"], files, raw["saisa_edge_version"], version, raw["libraries"])


def inside(folder: Path, name: object, where: str) -> Path:
    """`folder / name` for a relative path that stays inside `folder`, symlinks resolved; else a one-line error."""
    root = folder.resolve()
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise SaisaError(f"{where}: {name!r} is not a relative file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise SaisaError(f"{where}: {name!r} leaves the folder {folder}; every path must stay inside it")
    path = folder / pure
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise SaisaError(f"{where}: {name!r} is a link to {resolved}, outside the folder {folder}")
    return path


def check_files(folder: Path, manifest: Manifest, verify: bool = True, kind: str | None = None) -> None:
    """Every file named is inside the folder, present and unchanged (hashed once); no file goes unnamed."""
    again = _again(kind)
    where = str(folder / MANIFEST_NAME)
    named = {inside(folder, name, where).resolve() for name in manifest.files}
    for p in sorted(folder.resolve().rglob("*")):
        if p.name != MANIFEST_NAME and not p.is_dir() and p.resolve() not in named:
            raise SaisaError(f"{p}: not covered by {MANIFEST_NAME}'s checksums; remove it or {again}")
    for name, entry in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise SaisaError(f"{file}: missing from the folder; {again}")
        if file.stat().st_size != entry.bytes or (verify and sha256_file(file) != entry.sha256):
            raise SaisaError(f"{file}: does not match its checksum in {MANIFEST_NAME}; {again}")


def open_folder(folder: Path, kind: str | None = None, verify: bool = True) -> Opened:
    """Read and check `folder`'s manifest and files once (see the module's docstring)."""
    from saisa_edge.artifacts.folders import recover

    folder = Path(folder)
    if not folder.exists():
        recover(folder)  # a replacement killed between its renames
    raw, digest = _load(folder, kind)
    manifest = parse_manifest(raw, folder / MANIFEST_NAME, kind)
    check_files(folder, manifest, verify, kind)
    return Opened(folder, manifest, digest)


def kind_of(folder: Path) -> str | None:
    """The kind a folder's manifest claims (unchecked), or None: for choosing how to open it."""
    try:
        raw, _ = _load(Path(folder), None)
    except SaisaError:
        return None
    value = raw.get("kind")
    return value if isinstance(value, str) else None


def named(manifest: Manifest, name: object, where: str) -> str:
    """A file name the details give, which must be one the checksums cover."""
    if not isinstance(name, str) or name not in manifest.files:
        raise SaisaError(f"{where}: {name!r} is not among the manifest's checksummed files")
    return name
