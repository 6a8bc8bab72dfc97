"""Issue 12: seeded random mutation of config.json (checkpoint and vision tower), JSON bytes and
image headers. Every case either loads correctly or is one line of SaisaError: never another
exception, never a hang (a generous per-case time), never an allocation over a stated bound.

Seeds are fixed, so a failure reproduces; `SAISA_FUZZ_CASES` scales the number of cases."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from saisa_edge.artifacts import MANIFEST_NAME
from saisa_edge.checkpoint.presets import TOWER_DIR, _clip_files, tiny
from saisa_edge.cli import main
from saisa_edge.config import SaisaConfig, VisionConfig, parse_config, parse_vision_config
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.image import MAX_IMAGE_PIXELS
from saisa_edge.strict import loads_json
from tests import imagefiles
from tests.conftest import DEMO_IMAGE

CASES = int(os.environ.get("SAISA_FUZZ_CASES", "300"))
CASE_SECONDS = 20.0
"""A hang detector, not a timing target: every case here takes milliseconds to a second."""
PARSE_BYTES = 4 << 20
"""Parsing a config of a few KiB must not allocate more than this (Python allocations, tracemalloc)."""
IMAGE_RSS_MB = (MAX_IMAGE_PIXELS * 4 >> 20) + 256
"""An image case may decode up to MAX_IMAGE_PIXELS at 4 bytes each, plus the padded canvas and slack."""

_NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, 7, 64, 2**31, 2**63, 10**30, 10**400, -(10**30), 0.5, 64.0, 64.5, -2.5, 1e-300,
    1e300, math.nan, math.inf, -math.inf, "", "x", "64", "false", "linear", [], [1], [0.5, 0.5], [1, 2, 3],
    ["a", "b", "c"], {}, {"factor": 2.0}, {"type": "linear"}, {"rope_type": "llama3", "factor": -1},
    {"shortest_edge": 0}, {"height": 56, "width": 57}, [[[[[]]]]],
]


def _mutate(rng: random.Random, obj: dict[str, Any], extra_keys: list[str]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.randint(1, 3)):
        keys = sorted(obj) + extra_keys
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.15 and key in obj:
            del obj[key]
        elif roll < 0.3 and type(obj.get(key)) in (int, float) and abs(obj[key]) < 1e15:
            obj[key] = rng.choice([obj[key] * 2, obj[key] - 1, -obj[key], obj[key] + 0.5, obj[key] * 10**6])
        else:
            obj[key] = rng.choice(_NASTY)
    return obj


def _one_line(e: SaisaError) -> None:
    text = str(e)
    assert text and "\n" not in text and len(text) < 500, text


def _bounded(fn, *args) -> Any:
    """`fn(*args)`: its result or its SaisaError, within the time and Python-allocation bounds."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except SaisaError as e:
        _one_line(e)
        return e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - t0 < CASE_SECONDS
        assert peak < PARSE_BYTES, peak


_ROPE_KEYS = ["rope_scaling", "rope_parameters", "head_dim", "mm_vision_tower", "eos_token_id", "rms_norm_eps",
              "tie_word_embeddings", "rope_theta", "vision_tower"]


def test_fuzz_checkpoint_config():
    rng = random.Random(1201)
    base = tiny().config
    accepted = 0
    for _ in range(CASES):
        raw = _mutate(rng, base, _ROPE_KEYS)
        if rng.random() < 0.3:
            raw["rope_scaling"] = _mutate(rng, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                          ["type"])
        out = _bounded(parse_config, raw, "config.json")
        if isinstance(out, SaisaConfig):
            accepted += 1
            _assert_valid_text(out)
    assert 0 < accepted < CASES  # the mutations reach both outcomes


def _assert_valid_text(cfg: SaisaConfig) -> None:
    t = cfg.text
    assert all(type(v) is int and v >= 1 for v in (t.vocab_size, t.hidden_size, t.num_hidden_layers,
                                                      t.num_attention_heads, t.num_key_value_heads))
    assert t.num_attention_heads % t.num_key_value_heads == 0 and t.head_dim % 2 == 0
    assert math.isfinite(t.rms_norm_eps) and t.rms_norm_eps > 0 and math.isfinite(t.rope_theta) and t.rope_theta > 0
    assert type(t.tie_word_embeddings) is bool and isinstance(cfg.mm.vision_tower, str)
    assert t.rope_scaling is None or (math.isfinite(t.rope_scaling.factor) and t.rope_scaling.factor > 0)


def test_fuzz_vision_config():
    rng = random.Random(1202)
    spec = VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        image_size=56, patch_size=14, crop_size=56, resize_shortest_edge=56)
    base, base_pre = _clip_files(spec)
    accepted = 0
    for _ in range(CASES):
        raw = _mutate(rng, base, ["vision_config"]) if rng.random() < 0.6 else dict(base)
        pre = _mutate(rng, base_pre, []) if rng.random() < 0.6 else dict(base_pre)
        out = _bounded(parse_vision_config, raw, pre, "config.json", "preprocessor_config.json")
        if isinstance(out, VisionConfig):
            accepted += 1
            assert out.image_size % out.patch_size == 0 and out.crop_size == out.image_size
            assert all(s > 0 and math.isfinite(s) for s in out.image_std) and len(out.image_mean) == 3
    assert 0 < accepted < CASES


def test_fuzz_json_bytes():
    rng = random.Random(1203)
    text = json.dumps(tiny().config, indent=1).encode()
    inserts = [b"[" * 5000, b"9" * 5000, b"\xff", b"\x00", b"NaN", b"-Infinity", b'"\\ud800"', b"{", b"}", b","]
    for _ in range(CASES):
        data = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            roll = rng.random()
            if roll < 0.4:
                data[at] = rng.randrange(256)
            elif roll < 0.7:
                data[at:at] = rng.choice(inserts)
            else:
                del data[at: at + rng.randint(1, 8)]
        out = _bounded(loads_json, bytes(data), "config.json")
        if isinstance(out, dict):
            _bounded(parse_config, out, "config.json")


# --- end to end, each in a fresh interpreter that measures its own peak memory ---------------------


def _run_script(script: str, timeout: float) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


_CASE_LOOP = """
import json, sys, time
from saisa_edge.errors import SaisaError
from tests.memory import peak_growth_mb
def case(name, fn):
    out = {"ok": True}
    def run():
        try:
            fn()
        except SaisaError as e:
            out.update(ok=False, error=str(e))
        except BaseException as e:
            out.update(ok=False, crash=type(e).__name__ + ": " + str(e)[:300])
    t0 = time.perf_counter()
    out.update(grew_mb=peak_growth_mb(run), name=name, seconds=time.perf_counter() - t0)
    print(json.dumps(out), flush=True)
"""


def _check(results: list[dict[str, Any]], n: int, rss_bound_mb: float) -> None:
    assert len(results) == n
    for r in results:
        assert "crash" not in r, r
        assert r["ok"] or "\n" not in r["error"], r
        assert r["seconds"] < CASE_SECONDS, r
        assert r["grew_mb"] < rss_bound_mb, r


def _image_cases(rng: random.Random, folder: Path, n: int) -> list[Path]:
    sides = [0, 1, 2, 3, 255, 256, 4095, 4097, 8191, 8193, 16383, 65535, 70000, 2**31 - 1]
    paths = []
    for i in range(n):
        fmt = imagefiles.FORMATS[i % len(imagefiles.FORMATS)]
        mode = rng.choice(["RGB", "L", "P"] if fmt in ("PNG", "BMP", "GIF") else ["RGB", "L"])
        data = imagefiles.encode(fmt, (rng.randint(1, 40), rng.randint(1, 40)), mode)
        if rng.random() < 0.8:
            data = imagefiles.with_size(data, fmt, rng.choice(sides) or 1, rng.choice(sides) or 1)
        mutable = bytearray(data)
        for _ in range(rng.choice([0, 0, 1, 3])):  # byte flips in the headers
            mutable[rng.randrange(min(64, len(mutable)))] = rng.randrange(256)
        path = folder / f"{i:04d}.{fmt.lower()}"
        path.write_bytes(bytes(mutable))
        paths.append(path)
    return paths


def test_fuzz_image_headers(tmp_path):
    """Each case: load_image + preprocess to [3, 56, 56], or a one-line SaisaError."""
    n = max(len(imagefiles.FORMATS), CASES // 3)
    _image_cases(random.Random(1204), tmp_path, n)
    script = _CASE_LOOP + f"""
from pathlib import Path
from saisa_edge.config import VisionConfig
from saisa_edge.inputs.image import load_image, preprocess
cfg = VisionConfig(image_size=56, crop_size=56, resize_shortest_edge=56)
def one(p):
    x = preprocess(load_image(p), cfg)
    assert tuple(x.shape) == (3, 56, 56)
for p in sorted(Path({str(tmp_path)!r}).iterdir()):
    case(p.name, lambda: one(p))
"""
    results = _run_script(script, timeout=CASE_SECONDS * n)
    _check(results, n, IMAGE_RSS_MB)
    assert any(r["ok"] for r in results) and any(not r["ok"] for r in results)


def test_fuzz_checkpoint_load(tmp_path, tiny_dir):
    """Mutated config.json and tower config in a real checkpoint folder: load_checkpoint succeeds
    or refuses in one line; its memory stays near the tiny model's."""
    rng = random.Random(1205)
    n = max(4, CASES // 10)
    base = json.loads((tiny_dir / "config.json").read_text())
    tower = json.loads((tiny_dir / TOWER_DIR / "config.json").read_text())
    for i in range(n):
        ck = tmp_path / f"c{i:03d}"
        shutil.copytree(tiny_dir, ck)
        (ck / MANIFEST_NAME).unlink()  # edited by hand: a checkpoint the user brought
        if i % 3 == 2:
            (ck / TOWER_DIR / "config.json").write_text(json.dumps(_mutate(rng, tower, [])))
        else:
            (ck / "config.json").write_text(json.dumps(_mutate(rng, base, _ROPE_KEYS)))
    script = _CASE_LOOP + f"""
from pathlib import Path
from saisa_edge.checkpoint.loader import load_checkpoint
for ck in sorted(Path({str(tmp_path)!r}).iterdir()):
    case(ck.name, lambda: load_checkpoint(ck))
"""
    results = _run_script(script, timeout=CASE_SECONDS * n)
    _check(results, n, 512)


@pytest.mark.parametrize(
    "how, message",
    [
        ("tie-string", "'tie_word_embeddings' must be true or false"),
        ("huge-png", "over .* pixels"),
        ("nan-weights", "holds 1 NaN or infinite value"),
        ("deep-png", None),
        ("bad-utf8-prompt", "--prompt: not valid UTF-8 text"),
    ],
)
def test_cli_end_to_end(tmp_path, tiny_dir, how, message):
    """Through the command: exit 2 with one line, or exit 0 (a 16-bit PNG runs)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    ck, image, prompt = tiny_dir, DEMO_IMAGE, "Hi"
    if how in ("tie-string", "nan-weights"):
        ck = tmp_path / "c"
        shutil.copytree(tiny_dir, ck)
        (ck / MANIFEST_NAME).unlink()
    if how == "tie-string":
        cfg = json.loads((ck / "config.json").read_text())
        (ck / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings="false")))
    elif how == "nan-weights":
        tensors = load_file(ck / "model.safetensors")
        tensors["model.norm.weight"][0] = math.nan
        save_file(tensors, ck / "model.safetensors")
    elif how == "huge-png":
        image = tmp_path / "huge.png"
        image.write_bytes(imagefiles.with_size(imagefiles.encode("PNG"), "PNG", 20000, 20000))
    elif how == "bad-utf8-prompt":
        prompt = os.fsdecode(b"caf\xe9")  # how a non-UTF-8 argv arrives: a lone surrogate
    else:
        image = tmp_path / "deep.png"
        Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(image)
    r = CliRunner().invoke(main, ["run", str(ck), "--image", str(image), "--prompt", prompt, "--max-new-tokens", "2"])
    assert "Traceback" not in r.output
    if message is None:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert re.search(message, r.stderr), r.stderr
