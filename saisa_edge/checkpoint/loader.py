"""Load a SAISA checkpoint folder (LLaVA layout) into the PyTorch reference.

Modules are built on the meta device and filled tensor by tensor from the files,
each checked against the shape the config implies, so a model is never built from
a checkpoint that does not match its own config.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saisa_edge.artifacts import CHECKPOINT_KIND, MANIFEST_NAME, open_folder
from saisa_edge.checkpoint.tensors import TensorFiles
from saisa_edge.config import SaisaConfig, VisionConfig, parse_config, parse_vision_config
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.model.clip import ClipVisionTower
from saisa_edge.model.llama import SaisaLM
from saisa_edge.progress import track
from saisa_edge.strict import read_json

# Tensors real LLaVA/SAISA checkpoints carry that inference never reads: the global
# projector (overwritten at every layer), a copy of the vision tower, RoPE buffers.
_UNUSED = re.compile(r"^model\.(mm_projector|vision_tower|vision_resampler)\.|\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Checkpoint:
    """A loaded checkpoint: config, decoder, vision tower and tokenizer, ready to run."""

    path: Path
    config: SaisaConfig
    lm: SaisaLM
    vision: ClipVisionTower
    tokenizer: PromptTokenizer
    vision_tower_path: Path
    content_digest: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype


def resolve_vision_tower(checkpoint: Path, mm_vision_tower: str, override: Path | None) -> Path:
    """The local CLIP folder: `--vision-tower`, else `mm_vision_tower` if it is a local path."""
    if override is not None:
        if not (override / "config.json").is_file():
            raise SaisaError(f"--vision-tower {override}: not a CLIP vision folder (no config.json)")
        return override
    candidate = Path(mm_vision_tower).expanduser()
    candidate = candidate if candidate.is_absolute() else checkpoint / candidate
    if (candidate / "config.json").is_file():
        return candidate
    raise SaisaError(
        f"{checkpoint / 'config.json'}: mm_vision_tower {mm_vision_tower!r} is not a local folder "
        "(model hubs are not reachable); pass --vision-tower PATH to a local CLIP vision tower folder"
    )


def load_vision_config(folder: Path) -> VisionConfig:
    pre = folder / "preprocessor_config.json"
    where = str(folder / "config.json")
    return parse_vision_config(read_json(folder / "config.json"), read_json(pre) if pre.exists() else None, where,
                               str(pre))


def verify_manifest(folder: Path) -> str | None:
    """Check every file of a `make-checkpoint` folder against its manifest (the format layer's
    one check: every file listed, paths inside, sizes and sha256, each file hashed once) and
    return a digest of the checked contents: the checkpoint's identity. None when the folder
    has no manifest: a checkpoint the user brought."""
    if not (folder / MANIFEST_NAME).exists():
        return None
    files = open_folder(folder, CHECKPOINT_KIND).manifest.files
    table = json.dumps({n: files[n].sha256 for n in sorted(files)}).encode()
    return hashlib.sha256(table).hexdigest()


@dataclass
class CheckpointSource:
    """A checkpoint folder whose config and files have been checked; tensors read on demand.

    The one place that maps a model tensor name to its file and checks its shape, so the
    loader and the exporter (which streams tensors straight from the files) agree.
    """

    path: Path
    config: SaisaConfig
    vision_tower_path: Path
    lm_files: TensorFiles
    tower_files: TensorFiles
    content_digest: str | None = None

    @property
    def tied(self) -> bool:
        return self.config.text.tie_word_embeddings

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name` (decoder or `vision_model.*`) as stored, checked to have `shape`."""
        files = self.tower_files if name.startswith("vision_model.") else self.lm_files
        if name == "lm_head.weight" and self.tied:
            name = "model.embed_tokens.weight"
        if name not in files.names():
            raise SaisaError(f"{files.folder}: tensor {name!r} is missing; the checkpoint is incomplete")
        stored = files.shape(name)
        if stored != tuple(shape):
            raise SaisaError(
                f"{files.file_of(name)}: tensor {name!r} has shape {stored}, but config.json implies {tuple(shape)}"
            )
        return files.get(name)


def open_checkpoint(path: Path, vision_tower: Path | None = None) -> CheckpointSource:
    """Check a SAISA checkpoint folder and its vision tower without reading any weights."""
    path = Path(path)
    if not path.is_dir():
        raise SaisaError(f"{path}: not a folder; expected a SAISA checkpoint folder with config.json")
    cfg = parse_config(read_json(path / "config.json"), str(path / "config.json"))
    tower_path = resolve_vision_tower(path, cfg.mm.vision_tower, vision_tower)
    vision_cfg = load_vision_config(tower_path)
    if vision_cfg.hidden_size != cfg.mm.mm_hidden_size:
        raise SaisaError(
            f"{tower_path}: vision tower hidden size {vision_cfg.hidden_size} does not match the "
            f"projectors' mm_hidden_size {cfg.mm.mm_hidden_size} in {path / 'config.json'}; "
            "pass the vision tower this checkpoint was trained with"
        )
    cfg = SaisaConfig(text=cfg.text, mm=cfg.mm, vision=vision_cfg)
    cfg.vision_layers_used()
    files = TensorFiles.open(path)
    layers = 1 + max((int(m[1]) for n in files.names() if (m := _LAYER.match(n))), default=-1)
    if layers != cfg.text.num_hidden_layers:
        raise SaisaError(f"{path / 'config.json'}: num_hidden_layers is {cfg.text.num_hidden_layers}, but the "
                         f"weights hold {layers} decoder layers; the weights and config.json do not belong together")
    with torch.device("meta"):
        expected = set(SaisaLM(cfg).state_dict()) | {"lm_head.weight"}
    extra = sorted(n for n in files.names() - expected if not _UNUSED.search(n))
    if extra:
        raise SaisaError(
            f"{path}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not part of the model config.json "
            "describes; the weights and config.json do not belong together"
        )
    return CheckpointSource(path, cfg, tower_path, files, TensorFiles.open(tower_path), verify_manifest(path))


def load_weights(module: nn.Module, source: CheckpointSource, dtype: torch.dtype) -> None:
    """Fill every parameter of a meta-device `module` from `source`, converted to `dtype`."""
    wanted = module.state_dict(keep_vars=True)
    tied = source.tied and "lm_head.weight" in wanted
    names = [n for n in wanted if not (tied and n == "lm_head.weight")]
    state = {n: source.tensor(n, tuple(wanted[n].shape)).to(dtype) for n in track(names, "loading weights")}
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    module.load_state_dict(state, assign=True, strict=True)


def load_checkpoint(path: Path, vision_tower: Path | None = None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a SAISA checkpoint and its vision tower into the PyTorch reference."""
    source = open_checkpoint(path, vision_tower)
    with torch.device("meta"):
        lm, tower = SaisaLM(source.config), ClipVisionTower(source.config)
    load_weights(lm, source, dtype)
    load_weights(tower, source, dtype)
    lm.eval()
    tower.eval()
    tokenizer = PromptTokenizer.load(source.path)
    return Checkpoint(source.path, source.config, lm, tower, tokenizer, source.vision_tower_path,
                      source.content_digest)
