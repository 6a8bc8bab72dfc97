"""Untrusted JSON in, typed and bounded values out, or a one-line error naming the file.

One reader for every JSON file the project parses (size and nesting bounded before any
work) and one set of typed field reads (a JSON `"false"` is not a boolean, `64.5` is not
an integer, NaN is not a number), so a wrong value is refused by name, never run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saisa_edge.errors import SaisaError

MAX_JSON_BYTES = 16 << 20
"""Config, preprocessor, index and manifest files are kilobytes; 16 MiB is far above any real one."""
MAX_INT = 1 << 53
"""Integers read as numbers must be exact in a float (and convertible at all: 10**400 is not)."""
REQUIRED: Any = object()
"""Default marking a field that must be present."""


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from `path`, read only if it is at most `max_bytes`, or a one-line error."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise SaisaError(f"{path}: file not found") from None
    except OSError as e:
        raise SaisaError(f"{path}: not readable ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise SaisaError(f"{path}: larger than {max_bytes >> 20} MiB; not a JSON file this toolkit reads")
    return loads_json(data, str(path))


def loads_json(data: bytes | str, where: str) -> dict[str, Any]:
    """Parse a JSON object; deep nesting, huge integers and bad UTF-8 become one-line errors."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except RecursionError:
        raise SaisaError(f"{where}: not readable JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise SaisaError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, and integers over Python's digit limit
        raise SaisaError(f"{where}: not readable JSON ({one_line(str(e))})") from None
    if not isinstance(value, dict):
        raise SaisaError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def one_line(text: str, limit: int = 80) -> str:
    """`text` (often a library's multi-line message) squeezed onto one short line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """`value` for an error message: short, one line, whatever it is."""
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return one_line(repr(value), 60)


def integer(value: Any, what: str, lo: int, hi: int) -> int:
    """`value` if it is a JSON integer (not a bool, not 64.0) in [lo, hi]."""
    if type(value) is not int or not lo <= value <= hi:
        raise SaisaError(f"{what} must be an integer in [{lo}, {hi}], got {show(value)}")
    return value


def number(value: Any, what: str, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    """`value` as a finite float in [lo, hi] (or (lo, hi] with `open_lo`); ints are numbers too."""
    ok = (type(value) is int and abs(value) <= MAX_INT) or (type(value) is float and math.isfinite(value))
    ok = ok and value <= hi
    ok = ok and (value > lo if open_lo else value >= lo)
    if not ok:
        bound = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise SaisaError(f"{what} must be a finite number {bound}, got {show(value)}")
    return float(value)


def boolean(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise SaisaError(f"{what} must be true or false (a JSON boolean), got {show(value)}")
    return value


def string(value: Any, what: str, max_len: int = 4096) -> str:
    if type(value) is not str or not 0 < len(value) <= max_len:
        raise SaisaError(f"{what} must be a non-empty string of at most {max_len} characters, got {show(value)}")
    return value


def mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SaisaError(f"{what} must be a JSON object, got {show(value)}")
    return value


class Fields:
    """Typed reads of one JSON object's fields; each read removes the field, `rest` is what is left.

    A field that is absent, or `null`, takes its default; `REQUIRED` means it must be there.
    """

    def __init__(self, raw: Mapping[str, Any], where: str):
        self.raw = dict(raw)
        self.where = where

    def _take(self, name: str, default: Any) -> Any:
        value = self.raw.pop(name, None)
        if value is None and default is REQUIRED:
            raise SaisaError(f"{self.where}: required field {name!r} is missing")
        return value

    def what(self, name: str) -> str:
        return f"{self.where}: field {name!r}"

    def integer(self, name: str, default: Any, lo: int, hi: int) -> Any:
        value = self._take(name, default)
        return default if value is None else integer(value, self.what(name), lo, hi)

    def number(self, name: str, default: Any, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> Any:
        value = self._take(name, default)
        return default if value is None else number(value, self.what(name), lo, hi, open_lo=open_lo)

    def boolean(self, name: str, default: Any) -> Any:
        value = self._take(name, default)
        return default if value is None else boolean(value, self.what(name))

    def string(self, name: str, default: Any) -> Any:
        value = self._take(name, default)
        return default if value is None else string(value, self.what(name))

    def raw_value(self, name: str) -> Any:
        return self._take(name, None)

    def rest(self) -> set[str]:
        return set(self.raw)
