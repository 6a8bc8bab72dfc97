"""The visual K/V cache: hits, offset rotation, eviction, disk persistence, corruption,
concurrency, and a writer killed midway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.model.split import VisualKV
from saisa_edge.runtime.visual_cache import VisualCache
from tests.conftest import DEMO_IMAGE


@pytest.fixture
def backend(tiny_ckpt):
    return TorchBackend(tiny_ckpt)


def _pixels(backend, seed: int | None = None) -> torch.Tensor:
    if seed is None:
        return preprocess(load_image(DEMO_IMAGE), backend.config.vision)
    s = backend.config.vision.crop_size
    return torch.randn(3, s, s, generator=torch.Generator().manual_seed(seed))


def _compute(backend, pixels, start, calls):
    def compute() -> VisualKV:
        calls.append(start)
        return backend.visual_kv(backend.vision(pixels[None]), start)

    return compute


def _cache(backend, mb: float = 64, folder=None) -> VisualCache:
    return VisualCache(backend.config.text, backend.identity, backend.dtype, int(mb * 2**20), folder)


def _same(a: VisualKV, b: VisualKV, atol: float = 0.0) -> None:
    assert torch.equal(a.starts, b.starts)
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_hit_returns_the_same_tensors(backend):
    cache, calls = _cache(backend), []
    px = _pixels(backend)
    first, hit1 = cache.get(px, 20, _compute(backend, px, 20, calls))
    second, hit2 = cache.get(px.clone(), 20, _compute(backend, px, 20, calls))
    assert (hit1, hit2) == (False, True) and calls == [20]
    assert second is first  # shared, not copied
    assert cache.nbytes == first.nbytes > 0 and len(cache) == 1


def test_other_offset_is_a_rotation_of_cached_keys(backend):
    cache, calls = _cache(backend), []
    px = _pixels(backend)
    cache.get(px, 20, _compute(backend, px, 20, calls))
    moved, hit = cache.get(px, 57, _compute(backend, px, 57, calls))
    assert hit and calls == [20]
    fresh = backend.visual_kv(backend.vision(px[None]), 57)
    _same(moved, fresh, atol=2e-5)
    assert moved.values[0] is cache.get(px, 20, lambda: pytest.fail("recomputed"))[0].values[0]


def test_eviction_by_byte_budget(backend):
    px = [_pixels(backend, s) for s in range(3)]
    one = backend.visual_kv(backend.vision(px[0][None]), 5).nbytes
    cache, calls = _cache(backend, mb=2.5 * one / 2**20), []
    for p in px:
        cache.get(p, 5, _compute(backend, p, 5, calls))
    assert len(cache) == 2 and cache.stats.evictions == 1 and cache.nbytes == 2 * one
    cache.get(px[0], 5, _compute(backend, px[0], 5, calls))  # evicted: computed again
    assert len(calls) == 4
    tiny = _cache(backend, mb=one / 2 / 2**20)
    tiny.get(px[1], 5, _compute(backend, px[1], 5, calls))
    assert len(tiny) == 0  # larger than the whole budget: used, not kept


def test_keyed_by_model_and_precision(backend, tmp_path):
    px = _pixels(backend)
    a = _cache(backend, folder=tmp_path)
    a.get(px, 5, _compute(backend, px, 5, []))
    other = VisualCache(backend.config.text, "another-model", backend.dtype, 2**26, tmp_path)
    assert other.key(px) != a.key(px)
    half = VisualCache(backend.config.text, backend.identity, torch.float16, 2**26, tmp_path)
    assert half.key(px) != a.key(px)


def test_persists_across_instances(backend, tmp_path):
    px = _pixels(backend)
    first = _cache(backend, folder=tmp_path)
    kv, _ = first.get(px, 9, _compute(backend, px, 9, []))
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*"))
    second, calls = _cache(backend, folder=tmp_path), []
    again, hit = second.get(px, 9, _compute(backend, px, 9, calls))
    assert hit and not calls and second.stats.disk_hits == 1
    _same(again, kv)


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-model"])
def test_corrupt_files_are_discarded_and_recomputed(backend, tmp_path, damage, capsys):
    px = _pixels(backend)
    writer = _cache(backend, folder=tmp_path)
    kv, _ = writer.get(px, 9, _compute(backend, px, 9, []))
    path = next(tmp_path.glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0x55
        path.write_bytes(bytes(data))
    else:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        meta["model"] = "torch:somebody-else"
        save_file(load_file(path), str(path), metadata=meta)
    reader, calls = _cache(backend, folder=tmp_path), []
    again, hit = reader.get(px, 9, _compute(backend, px, 9, calls))
    assert not hit and calls == [9] and reader.stats.disk_discarded == 1
    _same(again, kv)
    assert "warning: visual cache: discarding" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # rewritten, whole


def test_unwritable_folder_warns_and_runs(backend, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = _cache(backend, folder=blocker / "cache")
    assert cache.folder is None
    assert "not writable" in capsys.readouterr().err
    px = _pixels(backend)
    assert not cache.get(px, 3, _compute(backend, px, 3, []))[1]
    assert cache.get(px, 3, _compute(backend, px, 3, []))[1]


def test_concurrent_requests_compute_each_image_once(backend):
    cache = _cache(backend)
    images = [_pixels(backend, s) for s in range(3)]
    calls: list[int] = []
    results: list[tuple[int, VisualKV]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        px = images[i % 3]

        def slow() -> VisualKV:
            time.sleep(0.05)
            return _compute(backend, px, 4, calls)()

        kv, _ = cache.get(px, 4, slow)
        with lock:
            results.append((i % 3, kv))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 3 and len(results) == 12 and cache.stats.hits == 9
    for image in range(3):
        same = [kv for i, kv in results if i == image]
        assert all(kv is same[0] for kv in same)


_SLOW_WRITER = """
import sys, time, torch, safetensors.torch as st
from saisa_edge.model.split import VisualKV
from saisa_edge.runtime import visual_cache
from saisa_edge.config import TextConfig

real = st.save_file
def slow_save(tensors, path, metadata=None):
    with open(path, "wb") as f:  # half a file, then hang: the kill lands mid-write
        f.write(b"x" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
visual_cache.save_file = slow_save
cfg = TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, max_position_embeddings=64)
cache = visual_cache.VisualCache(cfg, "m", torch.float32, 2**20, __import__("pathlib").Path(sys.argv[1]))
kv = VisualKV((torch.ones(1, 1, 4, 8),), (torch.ones(1, 1, 4, 8),), torch.tensor([0]))
cache.get(torch.zeros(3, 4, 4), 0, lambda: kv)
"""


def test_writer_killed_midway_leaves_no_usable_file(backend, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(tmp_path.glob("*.safetensors"))  # only a hidden temporary file remains
    assert len(list(tmp_path.glob(".*.tmp-*"))) == 1
    from saisa_edge.config import TextConfig

    cfg = TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, max_position_embeddings=64)
    cache = VisualCache(cfg, "m", torch.float32, 2**20, tmp_path)
    kv = VisualKV((torch.ones(1, 1, 4, 8),), (torch.ones(1, 1, 4, 8),), torch.tensor([0]))
    got, hit = cache.get(torch.zeros(3, 4, 4), 0, lambda: kv)
    assert not hit and got is kv and len(list(tmp_path.glob("*.safetensors"))) == 1
    stale = next(tmp_path.glob(".*.tmp-*"))
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    VisualCache(cfg, "m", torch.float32, 2**20, tmp_path)  # the dead writer's leftover is cleared
    assert not stale.exists()
