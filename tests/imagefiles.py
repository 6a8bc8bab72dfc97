"""Small image files whose headers declare any size: what the bound tests and the fuzz test feed
the decoder. Each format is written by Pillow, then its declared dimensions are rewritten where
the format stores them (PNG IHDR, GIF screen and frame, BMP info header, JPEG SOF, WebP VP8/VP8L)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

FORMATS = ("PNG", "GIF", "BMP", "JPEG", "WEBP")


def encode(fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, 90)
    img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def with_size(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """`data` (written by `encode`) with its declared width and height replaced; the pixel data
    is left as it was, so it no longer matches."""
    b = bytearray(data)
    if fmt == "PNG":
        b[16:24] = struct.pack(">II", w, h)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif fmt == "GIF":
        b[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
        frame = b.index(b"\x2c", 13)  # image descriptor (no global colour table at this size)
        b[frame + 5: frame + 9] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif fmt == "BMP":
        b[18:26] = struct.pack("<ii", w, h)
    elif fmt == "JPEG":
        sof = next(i for i in range(2, len(b) - 1) if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC2))
        b[sof + 5: sof + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
    elif fmt == "WEBP":  # VP8L: 14 bits of width - 1, then 14 bits of height - 1
        bits = struct.unpack("<I", bytes(b[21:25]))[0]
        bits = (bits & ~0xFFFFFFF) | ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
        b[21:25] = struct.pack("<I", bits)
    else:
        raise ValueError(fmt)
    return bytes(b)


def png(w: int, h: int) -> bytes:
    """A valid greyscale PNG of w x h zeros, compressed: 1 x 20000 is about 150 bytes."""
    raw = zlib.compress(b"\x00" * ((w + 1) * h), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
