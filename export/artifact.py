"""The artifact folder: three graphs, tokenizer files and a manifest that makes it self-sufficient.

`export_artifact` writes it (atomically, weights streamed from the checkpoint);
`saisa_edge.artifacts.open_artifact` checks it before use.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from saisa_edge.artifacts import ARTIFACT_KIND, atomic_folder, write_manifest
from saisa_edge.checkpoint.loader import CheckpointSource
from saisa_edge.config import DTYPE_NAMES, SaisaConfig
from saisa_edge.errors import SaisaError
from saisa_edge.export import naavit
from saisa_edge.export.graph import EMBED_LIMIT, Graph
from saisa_edge.artifacts.names import DECODER_FORMS
from saisa_edge.export.contrib import MS_DOMAIN, ROTARY_MULTIPLE, build_contrib_decoder
from saisa_edge.export.graphs import build_decoder, build_vision, build_visual_kv
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.model.dtypes import TORCH_DTYPES
from saisa_edge.progress import say
from saisa_edge.runtime.kv import PAD_POSITION

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
    decoder_form: str = "standard"  # names.DECODER_FORMS: the portable NAAViT decoder, or ONNX Runtime's fused ops


def _check(options: ExportOptions, cfg: SaisaConfig) -> int:
    if options.dtype not in DTYPE_NAMES:
        raise SaisaError(f"--dtype {options.dtype!r} is not supported; choose one of {', '.join(DTYPE_NAMES)}")
    if options.opset not in OPSETS:
        raise SaisaError(f"--opset {options.opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1}")
    if options.attention not in naavit.VARIANTS:
        raise SaisaError(f"--attention {options.attention!r} is unknown; choose one of {', '.join(naavit.VARIANTS)}")
    if options.attention == "native" and options.opset < naavit.NATIVE_MIN_OPSET:
        raise SaisaError(f"--attention native needs --opset {naavit.NATIVE_MIN_OPSET} or later (ONNX Attention)")
    if options.decoder_form not in DECODER_FORMS:
        raise SaisaError(f"--decoder-form {options.decoder_form!r} is unknown; choose one of {', '.join(DECODER_FORMS)}")
    if options.decoder_form == "contrib":
        if options.dtype != "fp32":
            raise SaisaError(f"--decoder-form contrib --dtype {options.dtype}: the contrib form runs fp32 on ONNX Runtime's "
                             "CPU kernels; export fp32 (and shrink the weights with calibrate --precision int8_wo/int4_wo)")
        if cfg.text.head_dim % ROTARY_MULTIPLE:
            raise SaisaError(f"--decoder-form contrib: head_dim {cfg.text.head_dim} is not a multiple of "
                             f"{ROTARY_MULTIPLE} (GroupQueryAttention's rotary); use --decoder-form standard")
    limit = cfg.text.max_position_embeddings
    context = options.max_context or limit
    if not cfg.num_visual_tokens < context <= limit:
        raise SaisaError(f"--max-context {context}: must exceed the {cfg.num_visual_tokens} visual tokens and be "
                         f"at most the model's max_position_embeddings {limit}")
    return context


def _decoder_domains(options: ExportOptions) -> tuple[list[onnx.FunctionProto], list[tuple[str, int]]]:
    """The decoder's local functions and extra opset domains."""
    if options.decoder_form == "contrib":
        return [], [(MS_DOMAIN, 1)]
    functions = [naavit.function(options.opset)] if options.attention == "custom" else []
    return functions, [(naavit.DOMAIN, naavit.DOMAIN_VERSION)] if options.attention != "native" else []


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files of `src` that exist, into `dst` (artifacts and engines carry their tokenizer)."""
    for f in _TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


def export_artifact(source: CheckpointSource, out: Path, options: ExportOptions, force: bool = False,
                    embed_limit: int = EMBED_LIMIT) -> dict[str, Any]:
    """Write the artifact folder for `source`; returns the manifest details.

    Graphs whose weights exceed `embed_limit` bytes keep them in `<graph>.onnx.data`.
    """
    context = _check(options, source.config)
    dtype = TORCH_DTYPES[options.dtype]
    tokenizer = PromptTokenizer.load(source.path)
    contrib = options.decoder_form == "contrib"
    builders = {
        "vision": lambda: build_vision(source, dtype, options.opset),
        "visual_kv": lambda: build_visual_kv(source, dtype),
        "decoder": (lambda: build_contrib_decoder(source, dtype, context)) if contrib
        else (lambda: build_decoder(source, dtype, options.attention)),
    }
    graphs: dict[str, Any] = {}
    with atomic_folder(out, force, kind=ARTIFACT_KIND, inputs=(source.path, source.vision_tower_path)) as tmp:
        for name, build in builders.items():
            t0 = time.perf_counter()
            g: Graph = build()
            functions, domains = _decoder_domains(options) if name == "decoder" else ([], [])
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
            "decoder_form": options.decoder_form,
            "max_context": context,
            "conv_mode": tokenizer.default_conv_mode(),
            "templates": {k: dataclasses.asdict(v) for k, v in TEMPLATES.items()},
            "image": {"aspect_ratio": source.config.mm.image_aspect_ratio,
                      "resize_shortest_edge": source.config.vision.resize_shortest_edge,
                      "crop_size": source.config.vision.crop_size, "image_mean": source.config.vision.image_mean,
                      "image_std": source.config.vision.image_std, "resample": "bicubic"},
            "naavit": {"domain": naavit.DOMAIN, "op_type": naavit.OP_TYPE, "plugin_version": naavit.PLUGIN_VERSION,
                       "pad_position": PAD_POSITION},
            "graphs": graphs,
            "source": {"checkpoint": str(source.path), "vision_tower": str(source.vision_tower_path)},
        }
        write_manifest(tmp, ARTIFACT_KIND, details)
    return details
