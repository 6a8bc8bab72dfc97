"""The PyTorch reference as a backend (runs checkpoints).

The runtime speaks numpy; this backend converts at its boundary, sharing memory both
ways (`torch.from_numpy`, `Tensor.numpy`; bf16 through a same-width integer view).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from saisa_edge.artifacts import CHECKPOINT_KIND, MANIFEST_NAME, open_folder, sha256_file
from saisa_edge.checkpoint.loader import Checkpoint
from saisa_edge.model import split
from saisa_edge.model.dtypes import TORCH_DTYPES
from saisa_edge.runtime.kv import TextCache, VisualKV

_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin")


def to_torch(a: np.ndarray) -> torch.Tensor:
    """The array's memory as a tensor (no copy, except a non-writable array, which is copied)."""
    if not a.flags.writeable:
        a = a.copy()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as an array (no copy)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config = ckpt.config
        self.dtype = next(name for name, d in TORCH_DTYPES.items() if d == ckpt.dtype)
        self.max_context = ckpt.config.text.max_position_embeddings
        self.identity = f"torch:{content_identity(ckpt.path, ckpt.vision_tower_path)}"

    @torch.no_grad()
    def vision(self, pixels: np.ndarray) -> np.ndarray:
        return to_numpy(self.ckpt.vision(to_torch(pixels).to(self.ckpt.dtype)))

    def visual_kv(self, features: np.ndarray, start: int) -> VisualKV:
        kv = split.visual_kv(self.ckpt.lm, to_torch(features), start)
        return VisualKV(tuple(map(to_numpy, kv.keys)), tuple(map(to_numpy, kv.values)), to_numpy(kv.starts))

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: TextCache,
                visual: VisualKV | None) -> tuple[np.ndarray, TextCache]:
        past = split.TextCache(tuple(map(to_torch, cache.keys)), tuple(map(to_torch, cache.values)),
                               to_torch(cache.positions))
        seen = None if visual is None else split.VisualKV(
            tuple(map(to_torch, visual.keys)), tuple(map(to_torch, visual.values)), to_torch(visual.starts))
        logits, grown = split.forward_text(self.ckpt.lm, to_torch(ids), to_torch(positions), past, seen)
        return to_numpy(logits.float()), TextCache(tuple(map(to_numpy, grown.keys)),
                                                   tuple(map(to_numpy, grown.values)), to_numpy(grown.positions))


def content_identity(checkpoint: Path, vision_tower: Path) -> str:
    """A digest of the config and weight files' contents of both folders. Checksums come from
    the checkpoint's manifest where it lists a file (written once, by make-checkpoint);
    other files are hashed here, once per backend."""
    known = {}
    if (checkpoint / MANIFEST_NAME).is_file():  # checked file by file when the checkpoint was loaded
        files = open_folder(checkpoint, CHECKPOINT_KIND, verify=False).manifest.files
        known = {(checkpoint / name).resolve(): entry.sha256 for name, entry in files.items()}
    h = hashlib.sha256()
    for folder in (checkpoint, vision_tower):
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix in _IDENTITY_SUFFIXES and p.name != MANIFEST_NAME:
                digest = known.get(p.resolve()) or sha256_file(p)
                h.update(f"{p.relative_to(folder).as_posix()}|{digest}\n".encode())
    return h.hexdigest()
