"""Issue 12, items 8 and 9: every Pillow mode becomes the right 8-bit RGB pixel, and an image's
cost is bounded by its declared size, checked before decoding."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from saisa_edge.config import VisionConfig
from saisa_edge.errors import SaisaError
from saisa_edge.inputs import image
from saisa_edge.inputs.image import MAX_IMAGE_PIXELS, expand_to_square, load_image, preprocess, to_rgb
from tests import imagefiles
from tests.conftest import DEMO_IMAGE

CLIP_L = VisionConfig()


def _one(mode: str, value) -> Image.Image:
    return Image.new(mode, (1, 1), value)


def _palette(mode: str) -> Image.Image:
    img = Image.new(mode, (1, 1))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), (1, 7) if mode == "PA" else 1)
    return img


# Expected values computed by hand: 16-bit v -> round(v * 255 / 65535); LAB L=128 is L* 50.2,
# which is sRGB 119; YCbCr by the JPEG (BT.601 full range) equations; alpha is dropped as
# LLaVA's .convert('RGB') drops it.
_MODES = [
    (_one("1", 1), (255, 255, 255)),
    (_one("1", 0), (0, 0, 0)),
    (_one("L", 77), (77, 77, 77)),
    (_one("LA", (77, 3)), (77, 77, 77)),
    (_palette("P"), (200, 100, 50)),
    (_palette("PA"), (200, 100, 50)),
    (_one("RGB", (10, 20, 30)), (10, 20, 30)),
    (_one("RGBA", (10, 20, 30, 0)), (10, 20, 30)),
    (_one("CMYK", (0, 255, 255, 0)), (255, 0, 0)),
    (_one("CMYK", (0, 0, 0, 255)), (0, 0, 0)),
    (_one("YCbCr", (76, 85, 255)), (254, 0, 0)),
    (_one("YCbCr", (128, 128, 128)), (128, 128, 128)),
    (_one("LAB", (128, 128, 128)), (119, 119, 119)),
    (_one("HSV", (0, 255, 255)), (255, 0, 0)),
    (_one("HSV", (85, 255, 255)), (0, 255, 0)),
    (_one("I;16", 32768), (128, 128, 128)),
    (_one("I;16", 65535), (255, 255, 255)),
    (_one("I;16", 257), (1, 1, 1)),
    (Image.frombytes("I;16B", (1, 1), b"\x80\x00"), (128, 128, 128)),
    (Image.frombytes("I;16L", (1, 1), b"\x00\x80"), (128, 128, 128)),
    (Image.frombytes("I;16N", (1, 1), np.array([20000], np.uint16).tobytes()), (78, 78, 78)),
    (_one("I", 32768), (128, 128, 128)),
    (_one("I", -5), (0, 0, 0)),
    (_one("I", 70000), (255, 255, 255)),
    (_one("F", 127.6), (128, 128, 128)),
    (_one("F", -3.0), (0, 0, 0)),
    (_one("F", 300.0), (255, 255, 255)),
]


@pytest.mark.parametrize("img, want", _MODES, ids=[f"{i.mode}-{w}" for i, w in _MODES])
def test_every_mode_gives_the_hand_computed_pixel(img, want):
    rgb = to_rgb(img, "test")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == want


def test_lab_white_is_white():
    got = to_rgb(_one("LAB", (255, 128, 128)), "test").getpixel((0, 0))
    assert all(abs(g - 255) <= 1 for g in got)  # D50 -> D65 rounding in Little CMS


def test_float_nan_pixels_are_refused():
    with pytest.raises(SaisaError, match="img.tiff: the image has NaN or infinite pixels"):
        to_rgb(_one("F", float("nan")), "img.tiff")


def test_sixteen_bit_png_is_not_white(tmp_path):
    """Pillow opens it as I;16 and `convert('RGB')` clips every value over 255: all white."""
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 20000], [40000, 65535]], np.uint16)).save(path)
    got = np.asarray(load_image(path))[..., 0]
    assert got.tolist() == [[0, 78], [156, 255]]


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_modes_round_trip_through_tiff(tmp_path, mode):
    values = np.array([[0, 1000], [30000, 65535]]) if mode != "F" else np.array([[0, 12.4], [200.5, 255]])
    img = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert img.mode == mode
    img.save(tmp_path / "deep.tiff")
    want = [[0, 4], [117, 255]] if mode != "F" else [[0, 12], [200, 255]]  # rint: 200.5 -> 200
    assert np.asarray(load_image(tmp_path / "deep.tiff"))[..., 1].tolist() == want


# --- bounds before decoding (item 9) -------------------------------------------------------------


def _peak_rss_mb(code: str) -> dict:
    """Run `code` in a fresh interpreter; report its peak RSS over its RSS before, in MiB (the
    kernel's high-water mark is reset first, so the imports' own peak hides nothing)."""
    script = (
        "import json\n"
        "from saisa_edge.inputs.image import load_image, preprocess\n"
        "from saisa_edge.config import VisionConfig\n"
        "from pathlib import Path\n"
        "from tests.memory import peak_growth_mb\n"
        "out = {}\n"
        "def work():\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
        "out['grew_mb'] = peak_growth_mb(work)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("w, h", [(1, 20000), (100000, 1)])
def test_thin_images_cost_little(tmp_path, w, h):
    """1 x 20000 used 1.9 GB (a 20000**2 canvas) and 1 x 100000 raised MemoryError."""
    path = tmp_path / "thin.png"
    path.write_bytes(imagefiles.png(w, h))
    assert path.stat().st_size < 400
    out = _peak_rss_mb(
        f"x = preprocess(load_image(Path({str(path)!r})), VisionConfig())\n"
        "out['shape'] = list(x.shape)"
    )
    assert out["shape"] == [3, 336, 336]
    assert out["grew_mb"] < 200, out  # the padded canvas is at most EXACT_SIDE**2 * 3 bytes (48 MiB)


_LARGEST_SIDE = {"PNG": 2**31 - 1, "BMP": 2**31 - 1, "GIF": 65535, "JPEG": 65535, "WEBP": 16384}
_BIG = [(fmt, w, h) for fmt in imagefiles.FORMATS
        for w, h in [(20000, 20000), (16384, 16384), (9000, 9000), (MAX_IMAGE_PIXELS + 1, 1), (70000, 70000)]
        if max(w, h) <= _LARGEST_SIDE[fmt]]


@pytest.mark.parametrize("fmt, w, h", _BIG)
def test_declared_size_over_the_bound_is_refused_before_decoding(tmp_path, fmt, w, h):
    path = tmp_path / f"big.{fmt.lower()}"
    path.write_bytes(imagefiles.with_size(imagefiles.encode(fmt), fmt, w, h))
    with pytest.raises(SaisaError) as e:
        load_image(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--image {path}: ")
    assert "megapixels" in message or f"over {MAX_IMAGE_PIXELS} pixels" in message or "cannot decode" in message


def test_bomb_message_names_the_bound(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(imagefiles.with_size(imagefiles.encode("PNG"), "PNG", 20000, 20000))
    with pytest.raises(SaisaError, match=f"over {MAX_IMAGE_PIXELS} pixels"):
        load_image(path, flag="--images")
    path.write_bytes(imagefiles.with_size(imagefiles.encode("PNG"), "PNG", 9000, 9000))
    with pytest.raises(SaisaError, match=r"is 9000 x 9000 pixels, over the bound .*64 megapixels"):
        load_image(path)


def test_declared_size_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    path.write_bytes(imagefiles.encode("PNG", (64, 64)))
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(SaisaError, match="is 64 x 64 pixels"):
        load_image(path)


def test_concurrent_loads_leave_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """Two threads opening at once (a server decoding two uploads): catch_warnings saves and
    restores the process-wide filters, so without the lock the later thread restores a list
    holding the earlier one's "error" filter, and bomb warnings raise everywhere after."""
    import threading
    import time
    import warnings

    path = tmp_path / "ok.png"
    path.write_bytes(imagefiles.encode("PNG", (32, 32)))
    real_open = Image.open

    def slow_open(*args, **kwargs):
        time.sleep(0.2)  # both threads inside the filter block at once, unless serialised
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    before = list(warnings.filters)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(load_image(path))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(results) == 2 and warnings.filters == before


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(SaisaError, match="is a folder"):
        load_image(tmp_path)


# --- resize before padding (item 9) ----------------------------------------------------------------


def _llava(img: Image.Image) -> np.ndarray:
    """LLaVA's order on any size: pad to the full square, then CLIP's resize and crop."""
    return preprocess(expand_to_square(img, CLIP_L.image_mean), CLIP_L, pad=False)


@pytest.mark.parametrize("size", [(4096, 1000), (640, 4096), (4000, 3000), (37, 3)])
def test_exact_llava_order_up_to_the_exact_side(size):
    img = load_image(DEMO_IMAGE).resize(size, Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(preprocess(img, CLIP_L), _llava(img))


@pytest.mark.parametrize("size", [(6000, 1500), (300, 8000), (5000, 3000)])
def test_reduced_before_padding_above_it_within_three_levels(size):
    """Measured on the demo image: at most 3 of 255 levels apart, 0.01 on average."""
    img = load_image(DEMO_IMAGE).resize(size, Image.Resampling.BICUBIC)
    std = np.asarray(CLIP_L.image_std, np.float32)[:, None, None]
    levels = np.abs((preprocess(img, CLIP_L) - _llava(img)) * std * 255)
    assert float(levels.max()) <= 3.001 and float(levels.mean()) < 0.05


def test_extreme_aspect_without_padding_is_bounded():
    """`square` mode resizes the shortest side to 336: a 1 x 100000 image would be 336 x 33.6M."""
    img = Image.new("RGB", (100000, 1), (200, 10, 10))
    x = preprocess(img, CLIP_L, pad=False)
    assert x.shape == (3, 336, 336)
    want = (200 / 255 - CLIP_L.image_mean[0]) / CLIP_L.image_std[0]
    assert abs(float(x[0, 100, 100]) - want) < 1e-5
