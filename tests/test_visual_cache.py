"""The visual K/V cache: hits, offset rotation, eviction, disk persistence, corruption,
concurrency, and a writer killed midway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from saisa_edge.backends.pytorch import TorchBackend
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.runtime.kv import VisualKV
from saisa_edge.config import TextConfig
from saisa_edge.runtime import visual_cache
from saisa_edge.runtime.visual_cache import VisualCache
from tests.conftest import DEMO_IMAGE


@pytest.fixture
def backend(tiny_ckpt):
    return TorchBackend(tiny_ckpt)


def _pixels(backend, seed: int | None = None) -> np.ndarray:
    if seed is None:
        return preprocess(load_image(DEMO_IMAGE), backend.config.vision)
    s = backend.config.vision.crop_size
    return np.random.default_rng(seed).standard_normal((3, s, s), dtype=np.float32)


def _compute(backend, pixels, start, calls):
    def compute() -> VisualKV:
        calls.append(start)
        return backend.visual_kv(backend.vision(pixels[None]), start)

    return compute


def _cache(backend, mb: float = 64, folder=None) -> VisualCache:
    return VisualCache(backend.config.text, backend.identity, backend.dtype, int(mb * 2**20), folder)


def _same(a: VisualKV, b: VisualKV, atol: float = 0.0) -> None:
    assert np.array_equal(a.starts, b.starts)
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_hit_returns_the_same_tensors(backend):
    cache, calls = _cache(backend), []
    px = _pixels(backend)
    first, hit1 = cache.get(px, 20, _compute(backend, px, 20, calls))
    second, hit2 = cache.get(px.copy(), 20, _compute(backend, px, 20, calls))
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
    half = VisualCache(backend.config.text, backend.identity, "fp16", 2**26, tmp_path)
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
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file

        with safe_open(str(path), framework="np") as f:
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
import sys, time, numpy as np
from pathlib import Path
from saisa_edge.runtime import visual_cache
from saisa_edge.runtime.kv import VisualKV
from saisa_edge.config import TextConfig

def slow_write(path, data):
    with open(path, "xb") as f:  # half a file, then hang: the kill lands mid-write
        f.write(data[:1000])
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
visual_cache._write_file = slow_write
cfg = TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, max_position_embeddings=64)
cache = visual_cache.VisualCache(cfg, "m", "fp32", 2**20, Path(sys.argv[1]))
kv = VisualKV((np.ones((1, 1, 4, 8), np.float32),), (np.ones((1, 1, 4, 8), np.float32),), np.array([0]))
cache.get(np.zeros((3, 4, 4), np.float32), 0, lambda: kv)
"""

_CFG = TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1, max_position_embeddings=64)


def _one(value: float = 1.0) -> VisualKV:
    return VisualKV((np.full((1, 1, 4, 8), value, np.float32),), (np.full((1, 1, 4, 8), value, np.float32),),
                    np.array([0]))


def _px(seed: int) -> np.ndarray:
    return np.full((3, 4, 4), seed, np.float32)


def test_writer_killed_midway_leaves_no_usable_file(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(tmp_path.glob("*.safetensors"))  # only a hidden temporary file remains
    assert len(list(tmp_path.glob(".saisa-kv-*.tmp-*"))) == 1
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    kv = _one()
    got, hit = cache.get(np.zeros((3, 4, 4), np.float32), 0, lambda: kv)
    assert not hit and got is kv and len(list(tmp_path.glob("*.safetensors"))) == 1
    orphan = next(tmp_path.glob(".saisa-kv-*.tmp-*"))
    os.utime(orphan, (time.time() - 2 * visual_cache.ORPHAN_SECONDS,) * 2)  # its writer is dead: an orphan
    VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    assert not orphan.exists()


def test_only_its_own_names_are_cleaned(tmp_path):
    """Files that merely look temporary belong to somebody else: never removed."""
    theirs = [tmp_path / ".notes.tmp-1-abc", tmp_path / "x.tmp-99999999-1", tmp_path / "model.safetensors"]
    for f in theirs:
        f.write_bytes(b"keep me")
        os.utime(f, (time.time() - 10 * visual_cache.STALE_SECONDS,) * 2)
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path, disk_budget_bytes=1)
    cache.get(_px(1), 0, _one)
    assert all(f.read_bytes() == b"keep me" for f in theirs)
    live = tmp_path / f".saisa-kv-{'0' * 64}.tmp-{os.getpid()}-abcd1234"  # a writer alive now: kept
    live.write_bytes(b"")
    VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    assert live.exists()


def test_a_file_under_another_images_name_is_a_miss(tmp_path):
    """Entry B's file copied (or linked) to entry A's name never answers for A."""
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    a, b = _px(1), _px(2)
    cache.get(a, 0, lambda: _one(1.0))
    cache.get(b, 0, lambda: _one(2.0))
    path_a, path_b = cache.path(cache.entry_key(a)), cache.path(cache.entry_key(b))
    path_a.write_bytes(path_b.read_bytes())
    fresh = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    got, hit = fresh.get(a, 0, lambda: _one(1.0))
    assert not hit and float(got.keys[0][0, 0, 0, 0]) == 1.0 and fresh.stats.disk_discarded == 1
    path_a.unlink()
    path_a.symlink_to(path_b)
    got, hit = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path).get(a, 0, lambda: _one(1.0))
    assert not hit and float(got.keys[0][0, 0, 0, 0]) == 1.0


def test_the_offset_is_checksummed(tmp_path):
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    cache.get(_px(1), 0, _one)
    path = cache.path(cache.entry_key(_px(1)))
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"start":"0"', b'"start":"5"'))
    assert data != path.read_bytes()
    fresh = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    assert not fresh.get(_px(1), 0, _one)[1] and fresh.stats.disk_discarded == 1


def test_disk_budget_keeps_the_most_recently_used(tmp_path):
    size = len(visual_cache.encode(visual_cache.EntryKey("m", "fp32", "native", "x" * 64),
                                   visual_cache.pack(_one(), "native")))
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path, disk_budget_bytes=int(2.5 * size))
    for i in range(2):
        cache.get(_px(i), 0, _one)
    first = cache.path(cache.entry_key(_px(0)))
    os.utime(first, (time.time() + 60, first.stat().st_mtime))  # image 0 read last
    cache.get(_px(2), 0, _one)
    names = {p.name for p in tmp_path.glob("saisa-kv-*.safetensors")}
    assert len(names) == 2 and first.name in names and cache.stats.disk_evictions == 1
    for i in range(3, 40):
        cache.get(_px(i), 0, _one)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 2.5 * size


def test_disk_full_warns_and_keeps_memory(tmp_path, monkeypatch, capsys):
    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(visual_cache, "_write_file", full)
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    assert not cache.get(_px(1), 0, _one)[1]
    assert "No space left on device" in capsys.readouterr().err and cache.folder is None
    assert cache.get(_px(1), 0, _one)[1]  # memory still serves
    assert not list(tmp_path.glob("*saisa-kv-*"))


def test_a_directory_in_an_entrys_place(tmp_path, capsys):
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    path = cache.path(cache.entry_key(_px(1)))
    (path / "inner").mkdir(parents=True)
    kv, hit = cache.get(_px(1), 0, _one)
    assert not hit and "memory only" in capsys.readouterr().err
    assert cache.get(_px(1), 0, _one)[1]


def test_undeletable_bad_entry_and_read_only_folder(tmp_path, monkeypatch, capsys):
    cache = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    cache.get(_px(1), 0, _one)
    cache.get(_px(2), 0, _one)
    bad = cache.path(cache.entry_key(_px(2)))
    bad.write_bytes(b"garbage")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(visual_cache, "_probe", denied)  # the folder is read-only
    ro = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    assert "read-only" in capsys.readouterr().err and not ro.writable
    assert ro.get(_px(1), 0, lambda: pytest.fail("a valid entry is used"))[1]
    assert not ro.get(_px(2), 0, _one)[1] and bad.exists()  # bad, left alone: a miss, no crash
    monkeypatch.undo()
    writable = VisualCache(_CFG, "m", "fp32", 2**20, tmp_path)
    monkeypatch.setattr(Path, "unlink", denied)  # the bad entry cannot be removed
    assert not writable.get(_px(2), 0, _one)[1] and writable.folder is None
    assert "memory only" in capsys.readouterr().err
    assert writable.get(_px(2), 0, lambda: pytest.fail("kept in memory"))[1]


def test_torch_identity_is_content_not_mtime(tiny_dir, tmp_path, monkeypatch):
    """Same-size weights copied over with the old mtime change the identity (no stale hits)."""
    import shutil

    from saisa_edge.artifacts import MANIFEST_NAME
    from saisa_edge.backends import pytorch

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    tower = ckpt / "clip-vision-tower"
    monkeypatch.setattr(pytorch, "sha256_file", lambda p: pytest.fail(f"{p} hashed: the manifest lists it"))
    from_manifest = pytorch.content_identity(ckpt, tower)  # make-checkpoint's manifest: no hashing
    monkeypatch.undo()
    (ckpt / MANIFEST_NAME).unlink()
    assert pytorch.content_identity(ckpt, tower) == from_manifest  # the same checksums, computed
    weights = tower / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert pytorch.content_identity(ckpt, tower) != from_manifest


@pytest.mark.parametrize("dtype, storage", [("bf16", "native"), ("fp16", "fp8"), ("fp32", "int8")])
def test_disk_round_trip_of_every_dtype_and_storage(tmp_path, dtype, storage):
    """bf16 and fp8 have no safetensors numpy type: stored as same-width integers, read back exactly."""
    from saisa_edge.runtime.kv import NUMPY_DTYPES

    rng = np.random.default_rng(0)
    kv = VisualKV((rng.standard_normal((1, 1, 4, 8)).astype(NUMPY_DTYPES[dtype]),),
                  (rng.standard_normal((1, 1, 4, 8)).astype(NUMPY_DTYPES[dtype]),), np.array([3]))
    first, _ = VisualCache(_CFG, "m", dtype, 2**20, tmp_path, storage).get(_px(1), 3, lambda: kv)
    again, hit = VisualCache(_CFG, "m", dtype, 2**20, tmp_path, storage).get(_px(1), 3, lambda: pytest.fail("disk"))
    assert hit and again.keys[0].dtype == NUMPY_DTYPES[dtype]
    assert all(np.array_equal(a, b) for a, b in zip((*first.keys, *first.values), (*again.keys, *again.values)))


@pytest.mark.parametrize("scaling", [None, ("linear", 2.0), ("llama3", 8.0)])
def test_numpy_rotation_equals_the_reference_at_the_new_offset(tiny_ckpt, scaling):
    """runtime.rope (numpy) moves keys exactly where model.rope (torch) puts them, scaling included."""
    import dataclasses

    import torch

    from saisa_edge.backends.pytorch import to_numpy
    from saisa_edge.config import RopeScaling
    from saisa_edge.model import split
    from saisa_edge.model.llama import SaisaLM

    rope = None if scaling is None else RopeScaling(scaling[0], scaling[1], 1.0, 4.0, 64)
    cfg = dataclasses.replace(tiny_ckpt.config, text=dataclasses.replace(tiny_ckpt.config.text, rope_scaling=rope))
    lm = SaisaLM(cfg)
    lm.load_state_dict(tiny_ckpt.lm.state_dict())
    features = torch.randn(1, cfg.num_visual_tokens, cfg.mm.mm_hidden_size, generator=torch.Generator().manual_seed(0))

    def at(start: int) -> VisualKV:
        kv = split.visual_kv(lm, features, start)
        return VisualKV(tuple(map(to_numpy, kv.keys)), tuple(map(to_numpy, kv.values)), to_numpy(kv.starts))

    _same(at(20).moved_to(cfg.text, 157), at(157), atol=2e-5)
