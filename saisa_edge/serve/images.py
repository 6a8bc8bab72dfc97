"""An image part's URL -> decoded RGB image, bounded: encoded bytes, then the declared pixel
count (before any pixel is decoded, as `saisa-edge run` bounds files), then the decoder.

Oversized input is a 413, anything else that is not a PNG, JPEG or WebP image a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from saisa_edge.errors import SaisaError
from saisa_edge.inputs.image import ImageTooLarge, load_image
from saisa_edge.serve.protocol import ApiError, ImagePart

FORMATS = {"PNG", "JPEG", "WEBP"}
_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,(.*)", re.DOTALL)


def image_bytes(part: ImagePart, max_bytes: int, local_root: Path | None) -> bytes:
    """The encoded image a data: URL carries, or a file:// path's bytes under `local_root`."""
    if part.url.startswith("file://"):
        return _local_file(part.url, max_bytes, local_root)
    m = _DATA_URL.fullmatch(part.url)
    if m is None:
        raise SaisaError("image_url: give data:image/png|jpeg|webp;base64,... (PNG, JPEG or WebP)")
    if len(m.group(2)) > (max_bytes + 2) // 3 * 4:
        raise ApiError(413, f"image_url: the image is over {max_bytes >> 20} MiB encoded", "image_too_large")
    try:
        return base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise SaisaError("image_url: the data: URL is not valid base64") from None


def _local_file(url: str, max_bytes: int, root: Path | None) -> bytes:
    if root is None:
        raise SaisaError("image_url: file:// URLs are refused; start the server with --allow-local-images DIR")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise SaisaError("image_url: a file:// URL must name a local path (file:///...)")
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(root.resolve()):
        raise SaisaError(f"image_url: {path} is outside --allow-local-images {root}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise SaisaError(f"image_url: {path}: not readable ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise ApiError(413, f"image_url: {path} is over {max_bytes >> 20} MiB", "image_too_large")
    return data


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB through `load_image`, whose pixel bound (checked on the declared size
    before decoding) is a 413 here."""
    try:
        decoded = load_image(data, "image_url")
    except ImageTooLarge as e:
        raise ApiError(413, str(e), "image_too_large") from None
    with Image.open(io.BytesIO(data)) as img:  # decoded above, so it opens
        fmt = img.format
    if fmt not in FORMATS:
        raise SaisaError(f"image_url: a {fmt} image; send PNG, JPEG or WebP")
    return decoded
