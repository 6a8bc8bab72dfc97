"""Typed model configuration, parsed strictly from a LLaVA-style `config.json`.

Every field that changes the numerics is read here and nowhere else; fields that
would change them in a way this toolkit does not implement are refused with a
message naming the field, so a checkpoint is never run with silently wrong maths.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saisa_edge.errors import SaisaError

DTYPE_NAMES = ("fp32", "fp16", "bf16")
"""The dtype names every command accepts (torch's dtypes: `model.dtypes`, numpy's: `runtime.kv`)."""

# Bookkeeping fields of HF / LLaVA / SAISA configs that do not affect inference.
_IGNORED_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype",
        "transformers_version", "use_cache", "pad_token_id", "initializer_range",
        "pretraining_tp", "attention_dropout", "freeze_mm_mlp_adapter",
        "freeze_mm_vision_resampler", "tune_mm_mlp_adapter", "tune_mm_vision_resampler",
        "mm_projector_lr", "mm_vision_tower_lr", "unfreeze_mm_vision_tower",
        "mm_use_im_patch_token", "mm_resampler_type", "tokenizer_model_max_length",
        "tokenizer_padding_side", "image_grid_pinpoints", "use_mm_proj", "mm_hidden_act",
        "is_llava_style", "bos_token_id", "output_attentions", "output_hidden_states",
        "return_dict", "chunk_size_feed_forward", "tf_legacy_loss", "use_bfloat16",
    }
)
_PROJECTOR_RE = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of LLaMA configs: `linear` (position interpolation) or `llama3`."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TextConfig:
    """The LLaMA decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim_override: int | None = None
    eos_token_ids: tuple[int, ...] = (2,)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class MultimodalConfig:
    """How the image reaches each decoder layer."""

    vision_tower: str
    mm_hidden_size: int
    select_layer: int = -2
    select_feature: str = "patch"
    projector_depth: int = 2  # mlp{N}x_gelu; 0 means a single `linear` projector
    image_aspect_ratio: str = "pad"

    @property
    def pads_images(self) -> bool:
        """LLaVA-1.5's `pad`: images are centred on a square before CLIP's preprocessing."""
        return self.image_aspect_ratio == "pad"


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision transformer and its image preprocessing; defaults: CLIP ViT-L/14-336."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    crop_size: int = 336
    resize_shortest_edge: int = 336

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class SaisaConfig:
    """A whole SAISA model: decoder, multimodal wiring and (once resolved) the vision tower."""

    text: TextConfig
    mm: MultimodalConfig
    vision: VisionConfig = field(default_factory=VisionConfig)

    def vision_layers_used(self) -> int:
        """How many CLIP encoder layers run to reach hidden state `select_layer`."""
        n, k = self.vision.num_hidden_layers, self.mm.select_layer
        used = n + 1 + k if k < 0 else k
        if not 0 <= used <= n:
            raise SaisaError(f"mm_vision_select_layer={k} is outside a {n}-layer vision tower")
        return used

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_patches + (1 if self.mm.select_feature == "cls_patch" else 0)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a one-line error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SaisaError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaisaError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise SaisaError(f"{path}: expected a JSON object")
    return data


def _rope_scaling(raw: dict[str, Any] | None, where: str) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(raw["factor"]),
            float(raw.get("low_freq_factor", 1.0)),
            float(raw.get("high_freq_factor", 4.0)),
            int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise SaisaError(
        f"{where}: rope_scaling type {kind!r} is not supported (supported: linear, llama3); "
        "dynamic and yarn scaling make visual keys depend on the sequence length"
    )


def parse_config(raw: dict[str, Any], where: str) -> SaisaConfig:
    """Validate a checkpoint's `config.json` (already loaded) into a `SaisaConfig`.

    `where` names the file in error messages.
    """
    raw = dict(raw)
    if raw.get("model_type") != "llava_llama":
        raise SaisaError(
            f"{where}: model_type is {raw.get('model_type')!r}, expected 'llava_llama' "
            "(a SAISA checkpoint in the LLaVA layout)"
        )

    def take(name: str, default: Any = ..., kind: type = int) -> Any:
        if name not in raw:
            if default is ...:
                raise SaisaError(f"{where}: required field {name!r} is missing")
            return default
        value = raw.pop(name)
        try:
            return kind(value) if value is not None else default
        except (TypeError, ValueError):
            raise SaisaError(f"{where}: field {name!r} has invalid value {value!r}") from None

    hidden = take("hidden_size")
    heads = take("num_attention_heads")
    hidden_act = take("hidden_act", "silu", str)
    if hidden_act != "silu":
        raise SaisaError(f"{where}: hidden_act {hidden_act!r} is not supported (LLaMA uses 'silu')")

    rope_params = raw.pop("rope_parameters", None) or {}
    rope_theta = take("rope_theta", float(rope_params.get("rope_theta", 10000.0)), float)
    rope_scaling = _rope_scaling(raw.pop("rope_scaling", None) or rope_params, where)
    eos = raw.pop("eos_token_id", 2)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))

    text = TextConfig(
        vocab_size=take("vocab_size"),
        hidden_size=hidden,
        intermediate_size=take("intermediate_size"),
        num_hidden_layers=take("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=take("num_key_value_heads", heads),
        max_position_embeddings=take("max_position_embeddings", 4096),
        rms_norm_eps=take("rms_norm_eps", 1e-6, float),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=take("tie_word_embeddings", False, bool),
        attention_bias=take("attention_bias", False, bool),
        mlp_bias=take("mlp_bias", False, bool),
        head_dim_override=take("head_dim", None),
        eos_token_ids=eos_ids,
    )
    if text.num_attention_heads % text.num_key_value_heads:
        raise SaisaError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={text.num_key_value_heads}"
        )

    if "mm_vision_tower" not in raw and "vision_tower" not in raw:
        raise SaisaError(f"{where}: no mm_vision_tower: this is not a multimodal LLaVA/SAISA config")
    tower = take("mm_vision_tower", None, str) or take("vision_tower", None, str)
    raw.pop("vision_tower", None)

    projector = take("mm_projector_type", "linear", str)
    match = _PROJECTOR_RE.match(projector)
    if projector == "linear":
        depth = 0
    elif match and int(match.group(1)) >= 1:
        depth = int(match.group(1))
    else:
        raise SaisaError(
            f"{where}: mm_projector_type {projector!r} is not supported "
            "(supported: linear, mlp<N>x_gelu such as mlp2x_gelu)"
        )
    merge = take("mm_patch_merge_type", "flat", str)
    if merge != "flat":
        raise SaisaError(
            f"{where}: mm_patch_merge_type {merge!r} (LLaVA-NeXT anyres) is not supported yet; "
            "only LLaVA-1.5 'flat' checkpoints can be run"
        )
    aspect = take("image_aspect_ratio", "pad", str)
    if aspect not in ("pad", "square"):
        raise SaisaError(
            f"{where}: image_aspect_ratio {aspect!r} is not supported yet (supported: pad, square)"
        )
    feature = take("mm_vision_select_feature", "patch", str)
    if feature not in ("patch", "cls_patch"):
        raise SaisaError(f"{where}: mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")
    if take("mm_use_im_start_end", False, bool):
        raise SaisaError(f"{where}: mm_use_im_start_end=true is not supported (LLaVA-1.5 uses false)")

    mm = MultimodalConfig(
        vision_tower=tower,
        mm_hidden_size=take("mm_hidden_size"),
        select_layer=take("mm_vision_select_layer", -2),
        select_feature=feature,
        projector_depth=depth,
        image_aspect_ratio=aspect,
    )
    unknown = sorted(set(raw) - _IGNORED_FIELDS)
    if unknown:
        raise SaisaError(
            f"{where}: unknown config field(s) {', '.join(unknown)}: this toolkit cannot tell "
            "whether they change the model; remove them if they are bookkeeping"
        )
    return SaisaConfig(text=text, mm=mm)


# transformers' CLIPVisionConfig defaults (ViT-B/32): what a field missing from a CLIP
# config.json means. Hub configs of CLIP-L list only the fields that differ.
_HF_CLIP_DEFAULTS = VisionConfig(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, crop_size=224, resize_shortest_edge=224,
)


def parse_vision_config(raw: dict[str, Any], preprocessor: dict[str, Any] | None, where: str) -> VisionConfig:
    """A CLIP vision config (`CLIPVisionConfig`, or `CLIPConfig` with `vision_config`)."""
    vc = raw.get("vision_config", raw)
    model_type = vc.get("model_type", raw.get("model_type"))
    if model_type not in ("clip_vision_model", "clip"):
        raise SaisaError(f"{where}: model_type {model_type!r} is not a CLIP vision tower")
    defaults = _HF_CLIP_DEFAULTS
    act = vc.get("hidden_act", defaults.hidden_act)
    if act not in ("quick_gelu", "gelu"):
        raise SaisaError(f"{where}: hidden_act {act!r} is not supported (quick_gelu, gelu)")
    pre = preprocessor or {}
    image_size = int(vc.get("image_size", defaults.image_size))
    crop = pre.get("crop_size", image_size)
    size = pre.get("size", image_size)
    return VisionConfig(
        hidden_size=int(vc.get("hidden_size", defaults.hidden_size)),
        intermediate_size=int(vc.get("intermediate_size", defaults.intermediate_size)),
        num_hidden_layers=int(vc.get("num_hidden_layers", defaults.num_hidden_layers)),
        num_attention_heads=int(vc.get("num_attention_heads", defaults.num_attention_heads)),
        image_size=image_size,
        patch_size=int(vc.get("patch_size", defaults.patch_size)),
        num_channels=int(vc.get("num_channels", defaults.num_channels)),
        layer_norm_eps=float(vc.get("layer_norm_eps", defaults.layer_norm_eps)),
        hidden_act=act,
        image_mean=tuple(pre.get("image_mean", defaults.image_mean)),
        image_std=tuple(pre.get("image_std", defaults.image_std)),
        crop_size=int(crop["height"] if isinstance(crop, dict) else crop),
        resize_shortest_edge=int(size["shortest_edge"] if isinstance(size, dict) else size),
    )
