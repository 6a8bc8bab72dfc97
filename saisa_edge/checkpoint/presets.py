"""Checkpoints to work with, written in the original LLaVA layout (`make-checkpoint`).

`tiny`: random weights, MHA, a sentencepiece tokenizer trained on the spot: seconds.
`smol`: SmolLM2-135M-Instruct (real weights, tokenizer and chat template, GQA 9/3),
a CLIP ViT-L/14-336-shaped tower and per-layer projectors, the last two random
(no vision weights are reachable): the image path is untrained. The projectors' last
linears are then fitted so that an image reads like varied text (`fit_projectors`).
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from saisa_edge import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from saisa_edge.artifacts import CHECKPOINT_KIND, atomic_folder, write_manifest
from saisa_edge.checkpoint import fit_projectors as fit
from saisa_edge.config import VisionConfig, parse_config, parse_vision_config
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.model.clip import ClipVisionModel, ClipVisionTower
from saisa_edge.model.dtypes import TORCH_DTYPES as DTYPES
from saisa_edge.model.llama import SaisaLM
from saisa_edge.progress import say, track

TOWER_DIR = "clip-vision-tower"
_CLIP_L_336 = VisionConfig()
_TINY_VISION = VisionConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    image_size=56, patch_size=14, crop_size=56, resize_shortest_edge=56,
)
_TINY_CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in this image? ASSISTANT: A red square on a blue background.
USER: Describe the picture in detail. ASSISTANT: There is a small cat sitting on a wooden chair.
What colour is the car? How many people are there? Is it day or night?
The quick brown fox jumps over the lazy dog. 0123456789 images, tokens, layers, keys, values.
"""
FIT_IMAGES = [DEMO_IMAGE, *sorted((DEMO_IMAGE.parent / "calibration").glob("*.png"))[:6]]
"""The images the smol projectors are fitted on, all towards one passage; the validation images
stay held out. Fitted on the demo image alone, other images came out 1.5-2.5x the passage's
RMS and not text-like (no held-out image of ten answered "What is the capital of France?",
half of the answers were not words)."""
FIT_DEMO_WEIGHT = 30.0
"""The demo image's rows count this many times each other image's in the fit: the quickstart's
image stays close to the passage (and answers), while the others pull the map towards what
all images share."""
FIT_PROMPTS = DEMO_IMAGE.parent / "calibration" / "prompts.txt"


@dataclass
class CheckpointSpec:
    """Everything a preset writes: config, tensors, tokenizer and the vision tower."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    write_tokenizer: Callable[[Path], None]
    vision: VisionConfig
    vision_tensors: dict[str, torch.Tensor]
    details: dict[str, Any] = field(default_factory=dict)


def llava_config(text: dict[str, Any], vision: VisionConfig) -> dict[str, Any]:
    """A `config.json` as LLaVA/SAISA training writes it."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_act": "silu",
        "rope_scaling": None,
        "attention_bias": False,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": vision.hidden_size,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": TOWER_DIR,
        "tokenizer_model_max_length": text["max_position_embeddings"],
        "tokenizer_padding_side": "right",
        "use_cache": True,
        "pretraining_tp": 1,
        **text,
    }


def _clip_files(vision: VisionConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) of a HF CLIP vision folder."""
    config = {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": vision.num_channels,
        "layer_norm_eps": vision.layer_norm_eps,
        "hidden_act": vision.hidden_act,
        "projection_dim": 768,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }
    pre = {
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": {"height": vision.crop_size, "width": vision.crop_size},
        "size": {"shortest_edge": vision.resize_shortest_edge},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
    }
    return config, pre


def randomize(module: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights with O(1) activations: norms at 1/0, matrices N(0, 1/fan_in), embeddings N(0, 1)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, std=1 / math.sqrt(fan_in), generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, generator=gen)
    for name, p in module.named_parameters():
        if name.endswith("class_embedding"):
            nn.init.normal_(p, generator=gen)
    return {k: v.detach() for k, v in module.state_dict().items()}


def _vision_tensors(vision: VisionConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A whole random `CLIPVisionModel` (every layer and the post-layernorm, as real towers ship)."""
    model = nn.Module()
    model.vision_model = ClipVisionModel(vision, vision.num_hidden_layers)
    model.vision_model.post_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
    return randomize(model, gen)


def _lm_tensors(config: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = parse_config(config, "preset")
    lm = SaisaLM(cfg)
    tensors = randomize(lm, gen)
    if cfg.text.tie_word_embeddings:
        del tensors["lm_head.weight"]
    return tensors


def _train_sentencepiece(folder: Path) -> None:
    """A LLaMA-style sentencepiece tokenizer (byte fallback, dummy prefix) on a built-in corpus."""
    import sentencepiece as spm

    lines = [line for line in _TINY_CORPUS.splitlines() if line] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=480, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "model_max_length": 2048, "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def tiny(seed: int = 0, **text_overrides: Any) -> CheckpointSpec:
    """Random MHA decoder (GQA and other shapes through `text_overrides`), tiny CLIP tower."""
    text = {
        "vocab_size": 480, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    text.update(text_overrides)
    gen = torch.Generator().manual_seed(seed)
    config = llava_config(text, _TINY_VISION)
    return CheckpointSpec(
        config, _lm_tensors(config, gen), _train_sentencepiece,
        _TINY_VISION, _vision_tensors(_TINY_VISION, gen), {"seed": seed},
    )


def smol(seed: int = 0) -> CheckpointSpec:
    """SmolLM2-135M-Instruct + random CLIP ViT-L/14-336-shaped tower + per-layer projectors
    drawn at random, then fitted into the text model's distribution (`fit_projectors`)."""
    from saisa_edge.checkpoint.smollm2 import gguf_path, read_llama_gguf

    path = gguf_path()
    say(f"reading SmolLM2-135M-Instruct from {path.name}")
    text, real = read_llama_gguf(path)
    gen = torch.Generator().manual_seed(seed)
    config = llava_config(text, _CLIP_L_336)
    tensors = _lm_tensors(config, gen)
    tensors.update(real)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def write_tokenizer(folder: Path) -> None:
        tokenizer.save_pretrained(str(folder))

    say("drawing a random CLIP ViT-L/14-336 vision tower (no vision weights are reachable)")
    vision_tensors = _vision_tensors(_CLIP_L_336, gen)
    with tempfile.TemporaryDirectory() as folder:  # the runtime's tokenizer, on the files the preset writes
        write_tokenizer(Path(folder))
        prompt_tokenizer = PromptTokenizer.load(Path(folder))
    fitted, fit_details = _fit_smol_projectors(config, tensors, vision_tensors, prompt_tokenizer)
    tensors.update(fitted)
    return CheckpointSpec(
        config, tensors, write_tokenizer, _CLIP_L_336, vision_tensors,
        {"seed": seed, "text_weights": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
         "untrained": ["vision tower", "per-layer projectors"], "projector_fit": fit_details},
    )


def _fit_smol_projectors(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], vision_tensors: dict[str, torch.Tensor],
    tokenizer: PromptTokenizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The fitted last projector linears, and what was done, for the manifest."""
    cfg = parse_config(config, "preset")
    with torch.device("meta"):
        lm, tower = SaisaLM(cfg), ClipVisionTower(cfg)
    lm.load_state_dict({"lm_head.weight": tensors["model.embed_tokens.weight"], **tensors}, strict=True, assign=True)
    wanted = tower.state_dict()
    tower.load_state_dict({k: vision_tensors[k] for k in wanted}, strict=True, assign=True)
    images = FIT_IMAGES
    with torch.no_grad():
        pixels = torch.stack([torch.as_tensor(preprocess(load_image(p), cfg.vision)) for p in images])
        features = torch.cat([tower(pixels[i : i + 1]) for i in track(range(len(images)), "vision features of the fit images")])
    template = TEMPLATES[tokenizer.default_conv_mode()]
    text = template.prompt([(IMAGE_PLACEHOLDER + "\n", None)])
    ids = tokenizer.encode(text)
    prefix = ids[: ids.index(IMAGE_TOKEN_INDEX)]
    prompts = [line for line in FIT_PROMPTS.read_text().splitlines() if line and not line.startswith("#")]
    end = tokenizer.tokenize("\n")  # what the original's tokenisation drops after <image> (see fit_projectors)
    passage = fit.text_passages(tokenizer.tokenize(" ".join(prompts)), 1, cfg.num_visual_tokens, end)
    say(f"fitting the projectors on {len(images)} images to SmolLM2's hidden states of a passage of the calibration prompts")
    targets = fit.layer_inputs(lm, prefix, passage)
    weights = torch.tensor([FIT_DEMO_WEIGHT if p == DEMO_IMAGE else 1.0 for p in images])
    details = {
        "method": "last projector linear per layer fitted by weighted ridge least squares (ridge "
                  f"{fit.RIDGE:g} x mean variance of the projector's GELU activations, bias free) so that P_l(F) "
                  "of every fit image reproduces SmolLM2's layer-l input hidden states of one passage of the bundled "
                  "calibration prompts (joined by spaces, 576 tokens) closed by a line break and placed in the "
                  f"image's place after the prompt's prefix; the demo image's rows weigh {FIT_DEMO_WEIGHT:g}x the "
                  "others'; the first linear stays as drawn. The image path is untrained: it carries no "
                  "information about the image.",
        "fit_images": [f"saisa_edge/{p.relative_to(DEMO_IMAGE.parent.parent).as_posix()}" for p in images],
        "image_weights": weights.tolist(),
        "passage": {"tokens": cfg.num_visual_tokens, "end": "\n",
                    "text": f"saisa_edge/assets/calibration/{FIT_PROMPTS.name}", "prefix": text.split(IMAGE_PLACEHOLDER)[0]},
    }
    return fit.fit_projectors(lm, features, targets, weights), details


@dataclass(frozen=True)
class Preset:
    build: Callable[..., CheckpointSpec]
    dtype: str  # the on-disk dtype it is written in unless asked otherwise


PRESETS = {"tiny": Preset(tiny, "fp32"), "smol": Preset(smol, "fp16")}


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], fmt: str, shard_mb: float) -> None:
    """Write HF-style weight files: one file, or shards plus an index when `shard_mb` > 0."""
    ext, stem = (".safetensors", "model") if fmt == "safetensors" else (".bin", "pytorch_model")
    limit = shard_mb * 2**20 if shard_mb > 0 else math.inf
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].contiguous()
        size += nbytes
    n = len(shards)
    names = [f"{stem}{ext}"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}{ext}" for i in range(n)]
    for shard, file in track(list(zip(shards, names)), f"writing {folder.name}", total=n):
        if fmt == "safetensors":
            save_file(shard, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / file)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: file for shard, file in zip(shards, names) for name in shard},
        }
        (folder / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(
    spec: CheckpointSpec, out: Path, *, dtype: str, fmt: str = "safetensors", shard_mb: float = 0,
    force: bool = False, preset: str = "custom",
) -> Path:
    """Write `spec` as a LLaVA-style checkpoint folder with its vision tower inside."""
    torch_dtype = DTYPES[dtype]
    with atomic_folder(out, force, kind=CHECKPOINT_KIND) as tmp:
        config = dict(spec.config, torch_dtype=str(torch_dtype).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_tensors(tmp, {k: v.to(torch_dtype) for k, v in spec.tensors.items()}, fmt, shard_mb)
        spec.write_tokenizer(tmp)
        tower = tmp / TOWER_DIR
        tower.mkdir()
        clip_config, preprocessor = _clip_files(spec.vision)
        assert parse_vision_config(clip_config, preprocessor, "preset") == spec.vision
        (tower / "config.json").write_text(json.dumps(clip_config, indent=2))
        (tower / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        save_tensors(tower, {k: v.to(torch_dtype) for k, v in spec.vision_tensors.items()}, "safetensors", 0)
        write_manifest(tmp, CHECKPOINT_KIND, {"preset": preset, "dtype": dtype, "format": fmt, **spec.details})
    return out
