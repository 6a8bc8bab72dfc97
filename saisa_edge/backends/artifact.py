"""Reading an ONNX artifact folder for a runtime, with neither torch nor onnx: the folder
kind, its graphs' I/O names, the manifest's checks and the model config it records.

The exporter (`saisa_edge.export`) writes what this module reads and takes these
names from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saisa_edge.artifacts import MANIFEST_NAME, MANIFEST_VERSION, sha256_file
from saisa_edge.config import MultimodalConfig, RopeScaling, SaisaConfig, TextConfig, VisionConfig
from saisa_edge.errors import SaisaError

KIND = "onnx-artifact"
GRAPHS = ("vision", "visual_kv", "decoder")  # an artifact's graphs, in the order data flows
INPUT_IDS, POSITION_IDS, PAST_POSITIONS, VISUAL_END = "input_ids", "position_ids", "past_positions", "visual_end"
LOGITS, PRESENT_POSITIONS = "logits", "present_positions"
PIXEL_VALUES, FEATURES, VISUAL_START = "pixel_values", "features", "visual_start"


def past(kind: str, layer: int) -> str:
    return f"past_{kind}.{layer}"


def present(kind: str, layer: int) -> str:
    return f"present_{kind}.{layer}"


def visual(kind: str, layer: int) -> str:
    return f"visual_{kind}.{layer}"


@dataclass(frozen=True)
class Artifact:
    """A checked artifact folder."""

    path: Path
    config: SaisaConfig
    details: dict[str, Any]
    files: dict[str, Any]  # name -> {sha256, bytes}, from the manifest

    @property
    def dtype(self) -> str:
        """The compute dtype's name (config.DTYPE_NAMES)."""
        return str(self.details["dtype"])

    @property
    def precision(self) -> str:
        return precision_of(self.details)

    def graph(self, name: str) -> Path:
        return self.path / self.details["graphs"][name]["file"]


def precision_of(details: dict[str, Any]) -> str:
    """What an artifact's linear layers compute in: its calibration's precision, else its dtype."""
    quantization = details.get("quantization")
    return str(quantization["recipe"]["precision"] if quantization else details["dtype"])


def config_from_json(raw: dict[str, Any]) -> SaisaConfig:
    text = dict(raw["text"])
    text["rope_scaling"] = RopeScaling(**text["rope_scaling"]) if text["rope_scaling"] else None
    text["eos_token_ids"] = tuple(text["eos_token_ids"])
    vision = dict(raw["vision"])
    vision["image_mean"], vision["image_std"] = tuple(vision["image_mean"]), tuple(vision["image_std"])
    return SaisaConfig(TextConfig(**text), MultimodalConfig(**raw["mm"]), VisionConfig(**vision))


def read_artifact(path: Path, verify: bool = True) -> Artifact:
    """Open an artifact folder: manifest kind and version, every file present and (if `verify`) unchanged."""
    manifest_path = path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise SaisaError(f"{path}: no {MANIFEST_NAME}; not an artifact folder (run `saisa-edge export`)") from None
    except (OSError, ValueError) as e:
        raise SaisaError(f"{manifest_path}: unreadable ({e}); export the artifact again") from None
    if manifest.get("kind") != KIND:
        raise SaisaError(f"{path}: holds a {manifest.get('kind')!r}, not an ONNX artifact")
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise SaisaError(f"{manifest_path}: manifest version {manifest.get('manifest_version')} is not "
                         f"{MANIFEST_VERSION}; export the artifact again with this saisa-edge")
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise SaisaError(f"{file}: missing from the artifact; export it again")
        if file.stat().st_size != entry["bytes"] or (verify and sha256_file(file) != entry["sha256"]):
            raise SaisaError(f"{file}: does not match its checksum in {MANIFEST_NAME}; export the artifact again")
    details = manifest["details"]
    return Artifact(path, config_from_json(details["config"]), details, manifest["files"])
