"""Load a SAISA checkpoint folder (LLaVA layout) into the PyTorch reference.

Modules are built on the meta device and filled tensor by tensor from the files,
each checked against the shape the config implies, so a model is never built from
a checkpoint that does not match its own config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saisa_edge.checkpoint.tensors import TensorFiles
from saisa_edge.config import SaisaConfig, VisionConfig, parse_config, parse_vision_config, read_json
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.model.clip import ClipVisionTower
from saisa_edge.model.llama import SaisaLM
from saisa_edge.progress import track

# Tensors real LLaVA/SAISA checkpoints carry that inference never reads: the global
# projector (overwritten at every layer), a copy of the vision tower, RoPE buffers.
_UNUSED = re.compile(r"^model\.(mm_projector|vision_tower|vision_resampler)\.|\.rotary_emb\.inv_freq$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: config, decoder, vision tower and tokenizer, ready to run."""

    path: Path
    config: SaisaConfig
    lm: SaisaLM
    vision: ClipVisionTower
    tokenizer: PromptTokenizer
    vision_tower_path: Path

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
    return parse_vision_config(read_json(folder / "config.json"), read_json(pre) if pre.exists() else None, where)


def load_weights(module: nn.Module, files: TensorFiles, prefix: str, dtype: torch.dtype, tied: dict[str, str]) -> None:
    """Load every parameter of `module` from `files` (names prefixed by `prefix`), checking shapes."""
    wanted = module.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    for name in track(wanted, f"loading {files.folder.name}", total=len(wanted)):
        source = prefix + name
        if source not in files.names() and name in tied:
            continue
        if source not in files.names():
            raise SaisaError(f"{files.folder}: tensor {source!r} is missing; the checkpoint is incomplete")
        tensor = files.get(source)
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise SaisaError(
                f"{files.file_of(source)}: tensor {source!r} has shape {tuple(tensor.shape)}, "
                f"but config.json implies {tuple(wanted[name].shape)}"
            )
        state[name] = tensor.to(dtype)
    for name, source in tied.items():
        state.setdefault(name, state[source])
    module.load_state_dict(state, assign=True, strict=True)


def load_checkpoint(path: Path, vision_tower: Path | None = None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a SAISA checkpoint and its vision tower into the PyTorch reference."""
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

    files = TensorFiles.open(path)
    with torch.device("meta"):
        lm, tower = SaisaLM(cfg), ClipVisionTower(cfg)
    expected = {"lm_head.weight"} | {n for n in lm.state_dict()}
    extra = sorted(n for n in files.names() - expected if not _UNUSED.search(n))
    if extra:
        raise SaisaError(
            f"{path}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not part of the model config.json "
            "describes; the weights and config.json do not belong together"
        )
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.text.tie_word_embeddings else {}
    load_weights(lm, files, "", dtype, tied)
    load_weights(tower, TensorFiles.open(tower_path), "", dtype, {})
    lm.eval()
    tower.eval()
    tokenizer = PromptTokenizer.load(path)
    return Checkpoint(path, cfg, lm, tower, tokenizer, tower_path)
