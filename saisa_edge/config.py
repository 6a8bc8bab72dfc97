"""Typed model configuration, parsed strictly from a LLaVA-style `config.json`.

Every field that changes the numerics is read here and nowhere else; fields that
would change them in a way this toolkit does not implement are refused with a
message naming the field, so a checkpoint is never run with silently wrong maths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from saisa_edge import strict
from saisa_edge.errors import SaisaError
from saisa_edge.strict import read_json  # noqa: F401  (its former home; loaders import it from here)

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


_LAYERS = 1024
_HEADS = 1024
_WIDTH = 1 << 18
_VOCAB = 1 << 22
_POSITIONS = 1 << 24
_IMAGE_SIDE = 4096
_PATCHES_PER_SIDE = 128
"""Bounds on sizes read from configs, checked before anything is allocated from them: each is
several times the largest released model of its kind (LLaMA-3.1-405B: 126 layers, width 16384,
128 heads, 128k positions; vocabularies up to 256k; CLIP towers up to 48 layers, 1024 px,
37 patches a side)."""

UPPER_BOUNDS: dict[str, int] = {
    "vocab_size": _VOCAB, "hidden_size": _WIDTH, "intermediate_size": _WIDTH, "num_hidden_layers": _LAYERS,
    "num_attention_heads": _HEADS, "num_key_value_heads": _HEADS, "max_position_embeddings": _POSITIONS,
    "original_max_position_embeddings": _POSITIONS, "head_dim_override": 4096, "eos_token_ids": _VOCAB - 1,
    "mm_hidden_size": _WIDTH, "select_layer": _LAYERS, "projector_depth": 16, "image_size": _IMAGE_SIDE,
    "patch_size": _IMAGE_SIDE, "num_channels": 3, "crop_size": _IMAGE_SIDE, "resize_shortest_edge": _IMAGE_SIDE,
}
"""The largest value of each integer field of the config dataclasses, by field name: the one table
both readers (config.json here, a manifest's config in `artifacts.schema`) bound sizes with."""


def check_text(t: TextConfig, where: str) -> None:
    """The relations between a decoder's sizes, which no single field shows."""
    if t.num_attention_heads % t.num_key_value_heads:
        raise SaisaError(f"{where}: num_attention_heads={t.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={t.num_key_value_heads}")
    if t.head_dim_override is None and t.hidden_size % t.num_attention_heads:
        raise SaisaError(f"{where}: hidden_size={t.hidden_size} is not a multiple of "
                         f"num_attention_heads={t.num_attention_heads}")
    if t.head_dim % 2:
        raise SaisaError(f"{where}: the head dimension {t.head_dim} is odd; RoPE needs it even")
    r = t.rope_scaling
    if r is not None and r.kind == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        raise SaisaError(f"{where}: rope_scaling high_freq_factor must be greater than low_freq_factor "
                         f"(got {r.low_freq_factor}, {r.high_freq_factor})")


def check_vision(v: VisionConfig, where: str) -> None:
    """The relations between a CLIP tower's sizes and its preprocessing."""
    if v.hidden_size % v.num_attention_heads:
        raise SaisaError(f"{where}: hidden_size={v.hidden_size} is not a multiple of "
                         f"num_attention_heads={v.num_attention_heads}")
    if v.image_size % v.patch_size or v.image_size // v.patch_size > _PATCHES_PER_SIDE:
        raise SaisaError(f"{where}: image_size={v.image_size} must be a multiple of patch_size={v.patch_size} "
                         f"with at most {_PATCHES_PER_SIDE} patches a side")
    if v.crop_size != v.image_size:
        raise SaisaError(f"{where}: crop_size {v.crop_size} but the tower's image_size is {v.image_size}; "
                         "they must match")
    if v.resize_shortest_edge < v.crop_size:
        raise SaisaError(f"{where}: the resize size (preprocessor 'size') {v.resize_shortest_edge} is smaller "
                         f"than crop_size {v.crop_size}")


_ROPE_NEEDS = {"linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_scaling(raw: Any, where: str, name: str = "rope_scaling") -> RopeScaling | None:
    """`rope_scaling` (or transformers 5's `rope_parameters`): a JSON object whose type is one
    this toolkit implements, with every field that type needs, typed and bounded, and nothing else."""
    if raw is None:
        return None
    what = f"{where}: field {name!r}"
    raw = strict.mapping(raw, what)
    kind = raw.get("rope_type", raw.get("type"))
    if kind is None or strict.string(kind, f"{what} type", max_len=64) == "default":
        return None
    if kind not in _ROPE_NEEDS:
        raise SaisaError(f"{where}: {name} type {kind!r} (field {name}.rope_type) is not implemented; "
                         "supported: linear, llama3")
    needs = _ROPE_NEEDS[kind]
    missing = [f for f in needs if f not in raw]
    unknown = sorted(set(raw) - {"rope_type", "type", "rope_theta", *needs})
    if missing:
        raise SaisaError(f"{where}: {name} ({kind}) lacks {', '.join(missing)}")
    if unknown:
        raise SaisaError(f"{where}: {name} ({kind}) has unknown fields {', '.join(unknown)}")
    factors = [strict.number(raw[f], f"{what} {f}", 0, 1e6, open_lo=True) for f in needs if f.endswith("factor")]
    if kind == "linear":
        return RopeScaling("linear", factors[0])
    factor, low, high = factors
    original = strict.integer(raw["original_max_position_embeddings"], f"{what} original_max_position_embeddings",
                              1, UPPER_BOUNDS["original_max_position_embeddings"])
    return RopeScaling("llama3", factor, low, high, original)


def _eos_ids(value: Any, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    return tuple(strict.integer(v, f"{where}: field 'eos_token_id'", 0, UPPER_BOUNDS["eos_token_ids"])
                 for v in values)


def parse_config(raw: dict[str, Any], where: str) -> SaisaConfig:
    """Validate a checkpoint's `config.json` (already loaded) into a `SaisaConfig`.

    `where` names the file in error messages.
    """
    if raw.get("model_type") != "llava_llama":
        raise SaisaError(
            f"{where}: model_type is {strict.show(raw.get('model_type'))}, expected 'llava_llama' "
            "(a SAISA checkpoint in the LLaVA layout)"
        )
    f = strict.Fields(raw, where)
    req = strict.REQUIRED
    B = UPPER_BOUNDS
    heads = f.integer("num_attention_heads", req, 1, B["num_attention_heads"])
    hidden_act = f.string("hidden_act", "silu")
    if hidden_act != "silu":
        raise SaisaError(f"{where}: hidden_act {hidden_act!r} is not supported (LLaMA uses 'silu')")

    rope_params = strict.mapping(f.raw_value("rope_parameters") or {}, f"{where}: field 'rope_parameters'")
    rope_theta = f.number("rope_theta", None, 0, 1e12, open_lo=True)
    if rope_theta is None:
        rope_theta = strict.number(rope_params.get("rope_theta", 10000.0), f"{where}: field 'rope_parameters' "
                                   "rope_theta", 0, 1e12, open_lo=True)
    scaling = f.raw_value("rope_scaling")
    rope_scaling = _rope_scaling(scaling, where) if scaling is not None else _rope_scaling(
        rope_params, where, "rope_parameters")
    eos_ids = _eos_ids(f.raw.pop("eos_token_id", 2), where)

    text = TextConfig(
        vocab_size=f.integer("vocab_size", req, 1, B["vocab_size"]),
        hidden_size=f.integer("hidden_size", req, 1, B["hidden_size"]),
        intermediate_size=f.integer("intermediate_size", req, 1, B["intermediate_size"]),
        num_hidden_layers=f.integer("num_hidden_layers", req, 1, B["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=f.integer("num_key_value_heads", heads, 1, heads),
        max_position_embeddings=f.integer("max_position_embeddings", 4096, 1, B["max_position_embeddings"]),
        rms_norm_eps=f.number("rms_norm_eps", 1e-6, 0, 1, open_lo=True),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=f.boolean("tie_word_embeddings", False),
        attention_bias=f.boolean("attention_bias", False),
        mlp_bias=f.boolean("mlp_bias", False),
        head_dim_override=f.integer("head_dim", None, 2, B["head_dim_override"]),
        eos_token_ids=eos_ids,
    )
    check_text(text, where)

    if f.raw.get("mm_vision_tower") is None and f.raw.get("vision_tower") is None:
        raise SaisaError(f"{where}: no mm_vision_tower: this is not a multimodal LLaVA/SAISA config")
    tower = f.string("mm_vision_tower", None) or f.string("vision_tower", None)
    f.raw.pop("vision_tower", None)

    projector = f.string("mm_projector_type", "linear")
    match = _PROJECTOR_RE.match(projector)
    if projector == "linear":
        depth = 0
    elif match and 1 <= int(match.group(1)) <= UPPER_BOUNDS["projector_depth"]:
        depth = int(match.group(1))
    else:
        raise SaisaError(
            f"{where}: mm_projector_type {strict.show(projector)} is not supported "
            "(supported: linear, mlp<N>x_gelu such as mlp2x_gelu, N <= 16)"
        )
    merge = f.string("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise SaisaError(
            f"{where}: mm_patch_merge_type {strict.show(merge)} (LLaVA-NeXT anyres) is not supported yet; "
            "only LLaVA-1.5 'flat' checkpoints can be run"
        )
    aspect = f.string("image_aspect_ratio", "pad")
    if aspect not in ("pad", "square"):
        raise SaisaError(
            f"{where}: image_aspect_ratio {strict.show(aspect)} is not supported yet (supported: pad, square)"
        )
    feature = f.string("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise SaisaError(
            f"{where}: mm_vision_select_feature {strict.show(feature)} is not supported (patch, cls_patch)"
        )
    if f.boolean("mm_use_im_start_end", False):
        raise SaisaError(f"{where}: mm_use_im_start_end=true is not supported (LLaVA-1.5 uses false)")

    mm = MultimodalConfig(
        vision_tower=tower,
        mm_hidden_size=f.integer("mm_hidden_size", req, 1, B["mm_hidden_size"]),
        select_layer=f.integer("mm_vision_select_layer", -2, -B["select_layer"] - 1, B["select_layer"]),
        select_feature=feature,
        projector_depth=depth,
        image_aspect_ratio=aspect,
    )
    unknown = sorted(f.rest() - _IGNORED_FIELDS)
    if unknown:
        raise SaisaError(
            f"{where}: unknown config field(s) {strict.show(', '.join(unknown))}: this toolkit cannot tell "
            "whether they change the model; remove them if they are bookkeeping"
        )
    return SaisaConfig(text=text, mm=mm)


# transformers' CLIPVisionConfig defaults (ViT-B/32): what a field missing from a CLIP
# config.json means. Hub configs of CLIP-L list only the fields that differ.
_HF_CLIP_DEFAULTS = VisionConfig(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, crop_size=224, resize_shortest_edge=224,
)


def _pixels(value: Any, what: str, key: str) -> int:
    """A preprocessor size: an int, or a dict holding `key` (CLIPImageProcessor's two spellings)."""
    if isinstance(value, dict):
        if key not in value:
            raise SaisaError(f"{what} has no {key!r}: expected {{{key!r}: N}} or an integer")
        if key == "height" and value.get("width", value["height"]) != value["height"]:
            raise SaisaError(f"{what} is not square ({strict.show(value)}); CLIP crops squares")
        value = value[key]
    return strict.integer(value, what, 1, UPPER_BOUNDS["crop_size"])


def _channels(value: Any, what: str, hi: float, positive: bool) -> tuple[float, float, float]:
    """Per-channel mean (in [0, 1]) or std (> 0) of a preprocessor."""
    if not isinstance(value, list) or len(value) != 3:
        raise SaisaError(f"{what} must be a list of 3 numbers (R, G, B), got {strict.show(value)}")
    r, g, b = (strict.number(v, what, 0, hi, open_lo=positive) for v in value)
    return r, g, b


def parse_vision_config(raw: dict[str, Any], preprocessor: dict[str, Any] | None, where: str,
                        preprocessor_where: str = "preprocessor_config.json") -> VisionConfig:
    """A CLIP vision config (`CLIPVisionConfig`, or `CLIPConfig` with `vision_config`) and its
    image preprocessing, type- and range-checked."""
    vc = strict.mapping(raw.get("vision_config", raw), f"{where}: field 'vision_config'")
    model_type = vc.get("model_type", raw.get("model_type"))
    if model_type not in ("clip_vision_model", "clip"):
        raise SaisaError(f"{where}: model_type {strict.show(model_type)} is not a CLIP vision tower")
    d = _HF_CLIP_DEFAULTS
    f = strict.Fields(vc, where)
    act = f.string("hidden_act", d.hidden_act)
    if act not in ("quick_gelu", "gelu"):
        raise SaisaError(f"{where}: hidden_act {strict.show(act)} is not supported (quick_gelu, gelu)")
    B = UPPER_BOUNDS
    image_size = f.integer("image_size", d.image_size, 1, B["image_size"])
    if f.integer("num_channels", 3, 1, 3) != 3:
        raise SaisaError(f"{where}: num_channels must be 3 (images are preprocessed to RGB)")
    pre_where = f"{preprocessor_where}: field"
    pre = strict.Fields(preprocessor or {}, preprocessor_where)
    crop_raw, size_raw = pre.raw_value("crop_size"), pre.raw_value("size")
    mean = pre.raw_value("image_mean")
    std = pre.raw_value("image_std")
    vision = VisionConfig(
        hidden_size=f.integer("hidden_size", d.hidden_size, 1, B["hidden_size"]),
        intermediate_size=f.integer("intermediate_size", d.intermediate_size, 1, B["intermediate_size"]),
        num_hidden_layers=f.integer("num_hidden_layers", d.num_hidden_layers, 1, B["num_hidden_layers"]),
        num_attention_heads=f.integer("num_attention_heads", d.num_attention_heads, 1, B["num_attention_heads"]),
        image_size=image_size,
        patch_size=f.integer("patch_size", d.patch_size, 1, image_size),
        num_channels=3,
        layer_norm_eps=f.number("layer_norm_eps", d.layer_norm_eps, 0, 1, open_lo=True),
        hidden_act=act,
        image_mean=d.image_mean if mean is None else _channels(mean, f"{pre_where} 'image_mean'", 1, False),
        image_std=d.image_std if std is None else _channels(std, f"{pre_where} 'image_std'", 1e3, True),
        crop_size=_pixels(image_size if crop_raw is None else crop_raw, f"{pre_where} 'crop_size'", "height"),
        resize_shortest_edge=_pixels(image_size if size_raw is None else size_raw, f"{pre_where} 'size'",
                                     "shortest_edge"),
    )
    check_vision(vision, f"{where} with {preprocessor_where}")
    return vision
