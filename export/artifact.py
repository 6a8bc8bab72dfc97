"""The artifact folder: three graphs, tokenizer files and a manifest that makes it self-sufficient.

`export_artifact` writes it (atomically, weights streamed from the checkpoint);
`read_artifact` checks it (manifest version, checksums, graphs present) before use.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from saisa_edge.artifacts import (
    MANIFEST_NAME, MANIFEST_VERSION, atomic_folder, read_manifest, sha256_file, write_manifest,
)
from saisa_edge.checkpoint.loader import CheckpointSource
from saisa_edge.config import DTYPES, MultimodalConfig, RopeScaling, SaisaConfig, TextConfig, VisionConfig
from saisa_edge.errors import SaisaError
from saisa_edge.export import naavit
from saisa_edge.export.graph import EMBED_LIMIT, Graph
from saisa_edge.export.graphs import build_decoder, build_vision, build_visual_kv
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.progress import say

KIND = "onnx-artifact"
OPSETS = range(18, 24)
DEFAULT_OPSET = 19
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    opset: int = DEFAULT_OPSET
    attention: str = "custom"
    max_context: int | None = None


def _check(options: ExportOptions, cfg: SaisaConfig) -> int:
    if options.dtype not in DTYPES:
        raise SaisaError(f"--dtype {options.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if options.opset not in OPSETS:
        raise SaisaError(f"--opset {options.opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1}")
    if options.attention not in naavit.VARIANTS:
        raise SaisaError(f"--attention {options.attention!r} is unknown; choose one of {', '.join(naavit.VARIANTS)}")
    if options.attention == "native" and options.opset < naavit.NATIVE_MIN_OPSET:
        raise SaisaError(f"--attention native needs --opset {naavit.NATIVE_MIN_OPSET} or later (ONNX Attention)")
    limit = cfg.text.max_position_embeddings
    context = options.max_context or limit
    if not cfg.num_visual_tokens < context <= limit:
        raise SaisaError(f"--max-context {context}: must exceed the {cfg.num_visual_tokens} visual tokens and be "
                         f"at most the model's max_position_embeddings {limit}")
    return context


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files of `src` that exist, into `dst` (artifacts and engines carry their tokenizer)."""
    for f in _TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


def _is_artifact(folder: Path) -> bool:
    return (read_manifest(folder) or {}).get("kind") == KIND


def export_artifact(source: CheckpointSource, out: Path, options: ExportOptions, force: bool = False,
                    embed_limit: int = EMBED_LIMIT) -> dict[str, Any]:
    """Write the artifact folder for `source`; returns the manifest details.

    Graphs whose weights exceed `embed_limit` bytes keep them in `<graph>.onnx.data`.
    """
    context = _check(options, source.config)
    dtype = DTYPES[options.dtype]
    tokenizer = PromptTokenizer.load(source.path)
    builders = {
        "vision": lambda: build_vision(source, dtype, options.opset),
        "visual_kv": lambda: build_visual_kv(source, dtype),
        "decoder": lambda: build_decoder(source, dtype, options.attention),
    }
    graphs: dict[str, Any] = {}
    with atomic_folder(out, force or _is_artifact(out)) as tmp:
        for name, build in builders.items():
            t0 = time.perf_counter()
            g: Graph = build()
            functions = [naavit.function(options.opset)] if name == "decoder" and options.attention == "custom" else []
            domains = [(naavit.DOMAIN, naavit.DOMAIN_VERSION)] if name == "decoder" and options.attention != "native" else []
            facts = g.save(tmp / f"{name}.onnx", options.opset, functions, domains, embed_limit)
            onnx.checker.check_model(str(tmp / f"{name}.onnx"), full_check=True)
            graphs[name] = {
                "file": f"{name}.onnx", **facts,
                "inputs": [v.as_json() for v in g.inputs], "outputs": [v.as_json() for v in g.outputs],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            say(f"exported {name}.onnx ({facts['weights_bytes'] / 2**20:.1f} MiB of weights, {facts['nodes']} nodes)")
        copy_tokenizer(source.path, tmp)
        details = {
            "config": dataclasses.asdict(source.config),
            "dtype": options.dtype, "opset": options.opset, "attention": options.attention,
            "max_context": context,
            "conv_mode": tokenizer.default_conv_mode(),
            "templates": {k: dataclasses.asdict(v) for k, v in TEMPLATES.items()},
            "image": {"aspect_ratio": source.config.mm.image_aspect_ratio,
                      "resize_shortest_edge": source.config.vision.resize_shortest_edge,
                      "crop_size": source.config.vision.crop_size, "image_mean": source.config.vision.image_mean,
                      "image_std": source.config.vision.image_std, "resample": "bicubic"},
            "naavit": {"domain": naavit.DOMAIN, "op_type": naavit.OP_TYPE, "plugin_version": naavit.PLUGIN_VERSION,
                       "pad_position": naavit.PAD_POSITION},
            "graphs": graphs,
            "source": {"checkpoint": str(source.path), "vision_tower": str(source.vision_tower_path)},
        }
        write_manifest(tmp, KIND, details)
    return details


@dataclass(frozen=True)
class Artifact:
    """A checked artifact folder."""

    path: Path
    config: SaisaConfig
    details: dict[str, Any]
    files: dict[str, Any]  # name -> {sha256, bytes}, from the manifest

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.details["dtype"]]

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
