"""Find and read the tensors of a HF-style folder: safetensors or `.bin`, sharded or not.

Reading is lazy and per tensor, so only the tensors a model asks for are read, and
every failure names the file and says what to do.
"""

from __future__ import annotations

import json
from collections.abc import KeysView
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from saisa_edge.errors import SaisaError

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def _corrupt(path: Path, err: Exception) -> SaisaError:
    return SaisaError(f"{path}: truncated or corrupt weight file ({err}); copy or download it again")


class TensorFiles:
    """Name -> file map over one folder's weight files, opened on demand."""

    def __init__(self, folder: Path, locations: dict[str, Path]):
        self.folder = folder
        self._where = locations
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, folder: Path) -> "TensorFiles":
        for index_name in _INDEXES:
            index = folder / index_name
            if index.exists():
                return cls(folder, _from_index(index))
        files = [folder / n for n in _SINGLES if (folder / n).exists()]
        files = files or sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files:
            raise SaisaError(
                f"{folder}: no weights found (expected *.safetensors, pytorch_model*.bin or an *.index.json)"
            )
        locations: dict[str, Path] = {}
        for f in files:
            locations.update(dict.fromkeys(_names(f), f))
        return cls(folder, locations)

    def names(self) -> KeysView[str]:
        return self._where.keys()

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor(name)
            if path not in self._bins:
                self._bins[path] = _load_bin(path)
            return self._bins[path][name]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _corrupt(path, e) from None
        except KeyError:
            raise SaisaError(f"{path}: tensor {name!r} listed in the index is not in this file") from None


def _from_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SaisaError(f"{index}: not a valid weight index ({e})") from None
    locations = {name: index.parent / shard for name, shard in weight_map.items()}
    for shard in sorted(set(locations.values())):
        if not shard.exists():
            raise SaisaError(f"{index}: lists shard {shard.name}, which is missing from {index.parent}")
    return locations


def _names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from None
    try:
        return list(_load_bin(path))
    except (OSError, RuntimeError) as e:
        raise _corrupt(path, e) from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a damaged pickle/zip
        raise _corrupt(path, e) from None
    if not isinstance(data, dict):
        raise SaisaError(f"{path}: not a state dict")
    return data
