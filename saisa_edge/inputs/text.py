"""Prompt text as it enters: valid Unicode that UTF-8 can carry, or a one-line error.

On POSIX, Python decodes command-line bytes that are not UTF-8 into lone surrogates
(`surrogateescape`); tokenizers then fail deep inside with a traceback, or encode garbage.
"""

from __future__ import annotations

from saisa_edge.errors import SaisaError


def check_prompt(text: str | bytes, flag: str = "--prompt") -> str:
    """`text` as a str if it is valid UTF-8 (bytes) or free of lone surrogates (str)."""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SaisaError(f"{flag}: not valid UTF-8 (byte 0x{text[e.start]:02x} at offset {e.start}); "
                             "pass UTF-8 text") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise SaisaError(f"{flag}: not valid UTF-8 text ({what} at character {e.start}); pass UTF-8 text") from None
    return text
