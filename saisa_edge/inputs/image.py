"""LLaVA-1.5 image preprocessing: pad to a square with the mean colour, then CLIP's processor.

Resize (shortest side, bicubic), centre crop, scale to [0, 1] and normalise, as
`CLIPImageProcessor` does it, so pixels match what the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from saisa_edge.config import VisionConfig
from saisa_edge.errors import SaisaError

DEMO_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "demo.png"
"""The bundled image (drawn by the project) that the quickstart, tests and benchmarks use."""


def load_image(path: Path, flag: str = "--image") -> Image.Image:
    """Decode an image file (first frame of an animation) as RGB, as the original code does."""
    try:
        with Image.open(path) as img:
            img.seek(0)
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise SaisaError(f"{flag} {path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SaisaError(f"{flag} {path}: cannot decode the image ({e}); use JPEG, PNG, WebP, BMP or GIF") from None


def expand_to_square(img: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """LLaVA's `expand2square`: centre the image on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(img: Image.Image, cfg: VisionConfig, pad: bool = True) -> np.ndarray:
    """RGB image -> normalised pixels [3, crop, crop] float32 (numpy: the runtime needs no torch)."""
    if pad:
        img = expand_to_square(img, cfg.image_mean)
    w, h = img.size
    short = cfg.resize_shortest_edge
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, Image.Resampling.BICUBIC)
    c = cfg.crop_size
    left, top = (size[0] - c) // 2, (size[1] - c) // 2
    img = img.crop((left, top, left + c, top + c))
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    x = (np.asarray(img, dtype=np.float32) * np.float32(1 / 255) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))
