"""The bundled calibration and validation images, drawn here so they carry no licence.

Scenes a vision-language model is asked about (landscapes, charts, signs, objects on
a table, text, clocks), each made from a seed; `python -m saisa_edge.calibration.draw`
redraws the files shipped in `saisa_edge/assets/`.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from saisa_edge.resources import asset

Scene = Callable[[random.Random, int, int], Image.Image]
_WORDS = ("STOP", "OPEN", "EXIT", "CAFE", "SALE", "PARK", "BUS 42", "NO ENTRY", "HOTEL", "PHARMACY")


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def landscape(rng: random.Random, w: int, h: int) -> Image.Image:
    img = _gradient(w, h, (rng.randrange(60, 140), rng.randrange(120, 200), 255), (255, rng.randrange(180, 240), 200))
    draw = ImageDraw.Draw(img)
    sun = (rng.randrange(w), rng.randrange(h // 3))
    draw.ellipse([sun[0] - 30, sun[1] - 30, sun[0] + 30, sun[1] + 30], fill=(255, 220, 80))
    for layer in range(3):
        base = h // 2 + layer * h // 8
        points = [(0, h)] + [(x, base - rng.randrange(h // 4)) for x in range(0, w + 40, 40)] + [(w, h)]
        shade = 40 + layer * 40
        draw.polygon(points, fill=(shade // 2, shade + rng.randrange(60), shade // 3))
    for _ in range(rng.randrange(2, 6)):  # trees
        x, y = rng.randrange(w), rng.randrange(2 * h // 3, h)
        draw.rectangle([x - 3, y - 20, x + 3, y], fill=(90, 60, 30))
        draw.polygon([(x - 15, y - 15), (x + 15, y - 15), (x, y - 50)], fill=(20, 110 + rng.randrange(60), 40))
    return img


def bar_chart(rng: random.Random, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    n = rng.randrange(3, 8)
    draw.line([(30, 20), (30, h - 30), (w - 10, h - 30)], fill=(0, 0, 0), width=2)
    slot = (w - 50) // n
    for i in range(n):
        top = rng.randrange(40, h - 40)
        draw.rectangle([40 + i * slot, top, 30 + (i + 1) * slot, h - 31], fill=_colour(rng), outline=(0, 0, 0))
        draw.text((45 + i * slot, h - 25), chr(ord("A") + i), fill=(0, 0, 0))
    draw.text((w // 3, 5), f"Sales {2018 + rng.randrange(8)}", fill=(0, 0, 0))
    return img


def sign(rng: random.Random, w: int, h: int) -> Image.Image:
    img = _gradient(w, h, (200, 200, 210), (120, 120, 130))
    draw = ImageDraw.Draw(img)
    cx, cy, r = w // 2, h // 2 - 20, min(w, h) // 4
    octagon = [(cx + r * math.cos(math.pi / 8 + k * math.pi / 4), cy + r * math.sin(math.pi / 8 + k * math.pi / 4))
               for k in range(8)]
    draw.polygon(octagon, fill=rng.choice([(200, 20, 20), (20, 90, 200), (20, 140, 60)]), outline=(255, 255, 255))
    draw.text((cx - 25, cy - 5), rng.choice(_WORDS), fill=(255, 255, 255))
    draw.rectangle([cx - 4, cy + r, cx + 4, h], fill=(90, 90, 90))
    return img


def table_objects(rng: random.Random, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (150 + rng.randrange(60), 100 + rng.randrange(40), 60))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(3, 9)):
        x, y, s = rng.randrange(w), rng.randrange(h), rng.randrange(15, 60)
        shape = rng.randrange(3)
        box = [x - s, y - s, x + s, y + s]
        if shape == 0:
            draw.ellipse(box, fill=_colour(rng), outline=(0, 0, 0))
        elif shape == 1:
            draw.rectangle(box, fill=_colour(rng), outline=(0, 0, 0))
        else:
            draw.polygon([(x, y - s), (x + s, y + s), (x - s, y + s)], fill=_colour(rng), outline=(0, 0, 0))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def document(rng: random.Random, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (255, 255, 250))
    draw = ImageDraw.Draw(img)
    draw.text((20, 15), f"INVOICE No. {rng.randrange(1000, 9999)}", fill=(0, 0, 0))
    for row in range(rng.randrange(4, 12)):
        y = 45 + row * 22
        draw.text((20, y), f"item {row + 1}", fill=(30, 30, 30))
        draw.text((w - 90, y), f"{rng.randrange(1, 500)}.{rng.randrange(100):02d}", fill=(30, 30, 30))
        draw.line([(20, y + 16), (w - 20, y + 16)], fill=(200, 200, 200))
    return img


def clock(rng: random.Random, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), _colour(rng))
    draw = ImageDraw.Draw(img)
    cx, cy, r = w // 2, h // 2, min(w, h) // 3
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 250, 250), outline=(0, 0, 0), width=4)
    for k in range(12):
        a = k * math.pi / 6
        draw.line([(cx + 0.85 * r * math.sin(a), cy - 0.85 * r * math.cos(a)),
                   (cx + r * math.sin(a), cy - r * math.cos(a))], fill=(0, 0, 0), width=3)
    hour, minute = rng.randrange(12), rng.randrange(60)
    for length, angle, width in ((0.5, (hour + minute / 60) * math.pi / 6, 6), (0.8, minute * math.pi / 30, 3)):
        draw.line([(cx, cy), (cx + length * r * math.sin(angle), cy - length * r * math.cos(angle))],
                  fill=(0, 0, 0), width=width)
    return img


SCENES: tuple[Scene, ...] = (landscape, bar_chart, sign, table_objects, document, clock)
SIZES = ((336, 336), (480, 320), (320, 480), (400, 300))
CALIBRATION_SEED, VALIDATION_SEED = 1, 2


def draw_set(folder: Path, count: int, seed: int) -> list[Path]:
    """`count` scenes of every kind in turn, of several aspect ratios, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        scene = SCENES[i % len(SCENES)]
        img = scene(rng, *SIZES[i % len(SIZES)])
        path = folder / f"{i:02d}-{scene.__name__}.png"
        img.save(path, optimize=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    assets = Path(sys.argv[1]) if len(sys.argv) > 1 else asset()
    draw_set(assets / "calibration", 12, CALIBRATION_SEED)
    draw_set(assets / "validation", 6, VALIDATION_SEED)
