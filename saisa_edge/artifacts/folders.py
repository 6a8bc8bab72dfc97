"""Every output folder is written to a temporary sibling and renamed into place.

The one guard for outputs: `--force` replaces only a folder that is an earlier output of
the same command (its manifest's kind), never a command's input, a folder holding it or
one inside it. The siblings have our own names, `.{name}.partial-{pid}-{hex8}` and
`.{name}.old-{pid}-{hex8}`; a run finding stale ones (writer gone, or older than a day)
restores a replaced folder a killed writer left out of place and deletes the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from saisa_edge.errors import SaisaError

STALE_SECONDS = 24 * 3600  # a sibling this old is stale even if its PID was reused


def _sibling(out: Path, role: str) -> Path:
    return out.parent / f".{out.name}.{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def writer_alive(pid: int) -> bool:
    """Whether process `pid` (a writer named in a temporary's name) still runs on this machine."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no process could have that number
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _writer_gone(pid: int, path: Path) -> bool:
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:  # a sibling already gone
        return False
    return age > STALE_SECONDS or not writer_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(out: Path) -> None:
    """Put back a folder a killed replacement left as `.old-*`, and delete stale siblings of `out`."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}$")
    try:
        entries = list(out.parent.iterdir()) if out.name else []
    except OSError:
        return
    stale = [(m.group(1), p) for p in entries if (m := pattern.match(p.name)) and _writer_gone(int(m.group(2)), p)]
    for role, p in sorted(stale, key=lambda rp: -rp[1].lstat().st_mtime):  # newest old copy first
        if role == "old" and not out.exists() and not out.is_symlink():
            p.rename(out)
        else:
            _remove(p)


def _related(out: Path, inputs: Sequence[Path], flag: str) -> None:
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            how = "is" if target == source else ("is inside" if source in target.parents else "contains")
            raise SaisaError(f"{flag} {out}: {how} the input {given}; write the output to another folder")


def check_output(out: Path, force: bool, flag: str = "-o", kind: str | None = None,
                 inputs: Sequence[Path] = ()) -> None:
    """Refuse an output that is, holds or lies in an input, or that `force` may not replace.

    An existing non-empty `out` is replaced only with `force`, and only if it holds a
    manifest of `kind` (any saisa-edge manifest when `kind` is None).
    """
    from saisa_edge.artifacts.manifest import KINDS, MANIFEST_NAME, kind_of

    out = Path(out)
    _related(out, inputs, flag)
    recover(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise SaisaError(f"{flag} {out}: exists and is not a folder; remove it or choose another name")
        if any(out.iterdir()):
            if not force:
                raise SaisaError(f"{flag} {out}: already exists; pass --force to replace it")
            found = kind_of(out)
            if found is None or (kind is not None and found != kind):
                what = f"`saisa-edge {KINDS.get(kind, kind)}`" if kind else "saisa-edge"
                holds = f"holds a {found!r} folder" if found else f"has no {MANIFEST_NAME}"
                raise SaisaError(f"{flag} {out}: {holds}, not an earlier output of {what}; --force replaces only "
                                 "those: remove it yourself or choose another folder")


@contextmanager
def atomic_folder(out: Path, force: bool, flag: str = "-o", kind: str | None = None,
                  inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` only once the block finishes (`check_output` first)."""
    out = Path(out)
    check_output(out, force, flag, kind, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = _sibling(out, "old")
        out.rename(old)
        tmp.rename(out)  # dying before this line leaves `old`, which `recover` puts back
        _remove(old)
    else:
        tmp.rename(out)
