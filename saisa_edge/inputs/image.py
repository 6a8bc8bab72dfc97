"""LLaVA-1.5 image preprocessing: pad to a square with the mean colour, then CLIP's processor.

Resize (shortest side, bicubic), centre crop, scale to [0, 1] and normalise, as
`CLIPImageProcessor` does it, so pixels match what the model was trained on.

Decoding is bounded by the size the file declares, checked before any pixel is decoded,
and the work after it by `EXACT_SIDE`: a tiny file cannot make either cost gigabytes.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from saisa_edge.config import VisionConfig
from saisa_edge.errors import SaisaError
from saisa_edge.resources import asset
from saisa_edge.strict import one_line

DEMO_IMAGE = asset("demo.png")
"""The bundled image (drawn by the project) that the quickstart, tests and benchmarks use."""

MAX_IMAGE_PIXELS = 1 << 26
"""Images over 67 megapixels (8192 x 8192) are refused before decoding: at most 4 bytes a
pixel, 256 MiB decoded. Pillow's own checks at open (a warning over 89 megapixels, an error
over 179) are above it and give the same one-line refusal."""
EXACT_SIDE = 4096
"""Padding a W x H image to a square costs max(W, H)**2 pixels. Up to this side (48 MiB of
canvas; 12-megapixel phone photos are 4032 x 3024) it is done exactly as LLaVA does; a longer
non-square image is first resized (bicubic) to fit, then padded, which keeps a 1 x 100000
image from becoming a 100000**2 canvas."""


_OPENING = threading.Lock()
"""Held while Pillow reads a header with its bomb warning made an error. catch_warnings saves
and restores the process's filter list, so two threads inside it at once can leave the other's
filter behind (or drop it); decoding the pixels runs outside the lock."""


class ImageTooLarge(SaisaError):
    """Over the pixel bound (a server answers 413, not 400)."""


def load_image(path: Path | bytes, flag: str = "--image") -> Image.Image:
    """Decode an image file, or an encoded image's bytes (a server's upload), as 8-bit RGB
    (the first frame of an animation).

    The size the header declares is checked before decoding; any failure of the decoder on
    the file (Pillow raises many kinds on a damaged file) is a one-line error naming it.
    """
    where = f"{flag} {path}" if isinstance(path, Path) else flag
    try:
        with _OPENING, warnings.catch_warnings():  # the filters are process-wide: one opener at a time
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path if isinstance(path, Path) else io.BytesIO(path))  # the header only
        with img:
            check_image_size(img.size, where)
            img.seek(0)
            img.load()
            return to_rgb(img, where)
    except FileNotFoundError:
        raise SaisaError(f"{where}: file not found") from None
    except IsADirectoryError:
        raise SaisaError(f"{where}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{where}: the image is over {MAX_IMAGE_PIXELS} pixels; "
                         "downscale it first") from None
    except SaisaError:
        raise
    except MemoryError:
        raise SaisaError(f"{where}: not enough memory to decode the image; downscale it first") from None
    except Exception as e:
        raise SaisaError(f"{where}: cannot decode the image ({one_line(str(e) or type(e).__name__)}); "
                         "use JPEG, PNG, WebP, BMP or GIF") from None


def check_image_size(size: tuple[int, int], where: str) -> None:
    """The one bound on decoding, applied to the declared size before any pixel is decoded."""
    w, h = size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise (ImageTooLarge if w * h > MAX_IMAGE_PIXELS else SaisaError)(f"{where}: the image is {w} x {h} pixels, over the bound of {MAX_IMAGE_PIXELS} "
                         f"({MAX_IMAGE_PIXELS >> 20} megapixels); downscale it first")


_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image, where: str) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    8-bit modes go through `convert("RGB")` as LLaVA's `Image.open(f).convert('RGB')`: alpha is
    dropped, not composited (what the model was trained on), CMYK/YCbCr/LAB/HSV are converted
    colorimetrically. Pillow clips 16-bit grey at 255 (a 16-bit PNG turns white): 16-bit and
    32-bit integer grey (`I`, which is how Pillow may open 16-bit PNGs) are scaled from
    0..65535 to 0..255 with rounding, and float grey (`F`) is taken on Pillow's own 0..255
    scale, rounded (Pillow truncates) and clipped; NaN or infinite pixels are refused.
    """
    if img.mode in _SIXTEEN_BIT:
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if not np.isfinite(values).all():
            raise SaisaError(f"{where}: the image has NaN or infinite pixels")
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        return img.convert("RGB")
    return Image.fromarray(grey, "L").convert("RGB")


def expand_to_square(img: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """LLaVA's `expand2square`: centre the image on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def fit_within(img: Image.Image, side: int) -> Image.Image:
    """`img` itself, or resized (bicubic) so that its longer side is `side`."""
    w, h = img.size
    if max(w, h) <= side:
        return img
    scale = side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def crop_aspect(img: Image.Image, ratio: float) -> Image.Image:
    """`img` itself, or its centre cut to `ratio` long:short; the shortest-side resize and the
    centre crop after it never use more."""
    w, h = img.size
    if max(w, h) <= ratio * min(w, h):
        return img
    keep = int(ratio * min(w, h))
    return img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h) if w > h else
                    (0, (h - keep) // 2, w, (h - keep) // 2 + keep))


def preprocess(img: Image.Image, cfg: VisionConfig, pad: bool = True) -> np.ndarray:
    """RGB image -> normalised pixels [3, crop, crop] float32 (numpy: the runtime needs no torch).

    Exactly LLaVA's arithmetic for any image whose padded square side is at most `EXACT_SIDE`
    (or whose aspect ratio stays under EXACT_SIDE**2 / shortest_edge**2 without padding);
    beyond, the image is first reduced (see `EXACT_SIDE`), so the work stays bounded.
    """
    if pad:
        w, h = img.size
        img = expand_to_square(img if w == h else fit_within(img, EXACT_SIDE), cfg.image_mean)
    short = cfg.resize_shortest_edge
    img = crop_aspect(img, EXACT_SIDE**2 / short**2)
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, Image.Resampling.BICUBIC)
    c = cfg.crop_size
    left, top = (size[0] - c) // 2, (size[1] - c) // 2
    img = img.crop((left, top, left + c, top + c))
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    x = (np.asarray(img, dtype=np.float32) * np.float32(1 / 255) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))
