"""Find and read the tensors of a HF-style folder: safetensors or `.bin`, sharded or not.

Reading is lazy and per tensor, so only the tensors a model asks for are read; shapes come
from the files' headers before any data is read, every tensor read is checked to hold finite
floats, and every failure names the file and says what to do.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections.abc import KeysView
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from saisa_edge.errors import SaisaError
from saisa_edge.strict import one_line, read_json

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""What weights may be stored as; integers or booleans in a weight file are a broken export."""

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def _corrupt(path: Path, err: Exception) -> SaisaError:
    return SaisaError(f"{path}: truncated or corrupt weight file ({one_line(str(err))}); copy or download it again")


class TensorFiles:
    """Name -> file map over one folder's weight files, opened on demand."""

    def __init__(self, folder: Path, locations: dict[str, Path]):
        self.folder = folder
        self._where = locations
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._opened: dict[Path, Any] = {}  # one safetensors handle per file: its header is parsed once

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

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the file's header: no tensor data is read."""
        return tuple(self._read(name, header_only=True))

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored, refused unless it is finite floating point."""
        tensor = self._read(name, header_only=False)
        assert isinstance(tensor, torch.Tensor)
        check_weight(tensor, name, self._where[name])
        return tensor

    def _read(self, name: str, header_only: bool) -> torch.Tensor | list[int]:
        path = self._where[name]
        try:
            if path.suffix == ".safetensors":
                if path not in self._opened:
                    self._opened[path] = safe_open(str(path), framework="pt")
                f = self._opened[path]
                return list(f.get_slice(name).get_shape()) if header_only else f.get_tensor(name)
            if path not in self._bins:
                self._bins[path] = _load_bin(path)
            tensor = self._bins[path][name]
            return list(tensor.shape) if header_only else tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _corrupt(path, e) from None
        except KeyError:
            raise SaisaError(f"{path}: tensor {name!r} listed in the index is not in this file") from None


def check_weight(tensor: torch.Tensor, name: str, path: Path) -> None:
    """The one guard on every weight read (load and export): a float dtype, no NaN or Inf.

    One pass over the tensor as it is read, with no temporary: its minimum and maximum are
    finite exactly when every value is (NaN propagates through both). About 15 times faster
    than `isfinite(t).all()`, which allocates a mask (measured on 108 MiB: 40 ms against 650 ms).
    """
    if tensor.dtype not in WEIGHT_DTYPES:
        raise SaisaError(f"{path}: tensor {name!r} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
                         "weights must be float32, float16 or bfloat16: the file is not a model export")
    if tensor.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(tensor)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise SaisaError(f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s); the weights are "
                         "broken (a diverged training run or a bad conversion): use an earlier checkpoint")


_SHARD = re.compile(r"^[^/\\]+\.(safetensors|bin)$")


def _from_index(index: Path) -> dict[str, Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(n, str) and isinstance(s, str) and _SHARD.match(s) and s not in (".", "..")
        for n, s in weight_map.items()
    ):
        raise SaisaError(f"{index}: not a valid weight index: 'weight_map' must map tensor names to "
                         "*.safetensors or *.bin file names in the same folder")
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
    """A `.bin` state dict through torch's weights-only unpickler: memory-mapped when it is the
    zip format, read whole when it is the legacy (pre-1.6) format, which cannot be mapped."""
    try:
        zipped = zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # torch warns about pickle protocols it then refuses anyway
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise SaisaError(
            f"{path}: not a safe weights file (its pickle asks for {found[1] if found else 'objects other than tensors'}"
            "), so it was not loaded; convert it to safetensors where it was made, or use a safetensors copy"
        ) from None
    except Exception as e:  # torch.load raises many kinds on a damaged pickle/zip
        raise _corrupt(path, e) from None
    if not isinstance(data, dict) or not all(isinstance(t, torch.Tensor) for t in data.values()):
        raise SaisaError(f"{path}: not a state dict (a mapping of names to tensors)")
    return data
