"""Peak memory of one piece of work in this process, from the kernel's own accounting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_growth_mb(work: Callable[[], object]) -> float:
    """How far the resident set rose above its level before `work`, in MiB: the high-water
    mark (VmHWM) is reset first (Linux clear_refs 5), so earlier peaks hide nothing."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    work()
    return _status_mb("VmHWM") - before
