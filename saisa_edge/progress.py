"""Progress for long work, on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
_console = Console(stderr=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar (drawn only on a terminal)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_console, transient=True, disable=not _console.is_terminal) as bar:
        yield from bar.track(items, total=total, description=description)


def say(message: str) -> None:
    """A status line on stderr."""
    _console.print(message, highlight=False, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    """A one-line warning on stderr: something was skipped, the work goes on."""
    _console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)
