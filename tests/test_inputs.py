"""Request inputs: LLaVA-1.5 image preprocessing, templates and tokenisation as the original."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from saisa_edge.config import VisionConfig
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.image import expand_to_square, load_image, preprocess
from tests.conftest import DEMO_IMAGE

CLIP_L = VisionConfig()


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (336, 336), (100, 37), (1000, 1000)])
@pytest.mark.parametrize("pad", [True, False])
def test_preprocess_equals_transformers_clip_processor(size, pad):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=list(CLIP_L.image_mean), image_std=list(CLIP_L.image_std), resample=3,
    )
    img = _random_image(*size)
    ref_input = expand_to_square(img, CLIP_L.image_mean) if pad else img
    want = np.asarray(proc(ref_input, return_tensors="np")["pixel_values"][0], dtype=np.float32)
    got = preprocess(img, CLIP_L, pad=pad)
    assert isinstance(got, np.ndarray) and got.shape == (3, 336, 336) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_pad_uses_mean_colour_and_centres():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = expand_to_square(img, CLIP_L.image_mean)
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == tuple(int(m * 255) for m in CLIP_L.image_mean)
    assert sq.getpixel((20, 10)) == (255, 0, 0) and sq.getpixel((20, 29)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) != (255, 0, 0) and sq.getpixel((20, 30)) != (255, 0, 0)


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "BMP"), ("CMYK", "JPEG"),
     ("RGB", "WEBP"), ("RGBA", "WEBP"), ("P", "GIF")],
)
def test_formats_and_modes_decode_to_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    _random_image(32, 24).convert(mode).save(path, fmt)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 24)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_broken_image(tmp_path, content):
    path = tmp_path / "broken.png"
    if content is None:
        data = DEMO_IMAGE.read_bytes()
        content = data[: len(data) // 3]
    path.write_bytes(content)
    with pytest.raises(SaisaError, match=f"--image {path}: cannot decode"):
        load_image(path)


def test_missing_image(tmp_path):
    with pytest.raises(SaisaError, match="file not found"):
        load_image(tmp_path / "none.png")

