"""Engine builds, all but the TensorRT calls: GPU probing, target and attention mode,
optimization profiles and the checks that refuse a build before it starts.

Tested without TensorRT; `trt_build` only carries these out. The engine folder's manifest
and the checks that refuse a mismatched engine belong to the format layer (`saisa_edge.artifacts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saisa_edge.artifacts import ENGINE_KIND, Artifact
from saisa_edge.artifacts.folders import check_output
from saisa_edge.artifacts import names as io
from saisa_edge.errors import SaisaError
from saisa_edge.targets import TENSORRT_INT4_BLOCKS, Target, by_compute_capability, check_precision, target as named_target

ATTENTION_MODES = ("auto", "plugin", "native", "decomposed")
PYTHON_AOT_PLUGINS = (10, 9)  # tensorrt.plugin with ahead-of-time implementations
NATIVE_ATTENTION = (10, 14)  # ONNX Attention in TensorRT's parser
Dims = tuple[int, ...]


def version_tuple(version: str) -> tuple[int, int]:
    major, minor, *_ = (int(p) for p in version.split(".")[:2] + ["0"])
    return major, minor


@dataclass(frozen=True)
class BuildOptions:
    target: Target
    attention: str = "auto"
    max_batch: int = 1
    max_context: int | None = None  # default: the artifact's


def resolve_attention(requested: str, variant: str, trt_version: str) -> str:
    """The attention path for an artifact exported as `variant` (custom/plugin/native).

    custom artifacts carry the node and its body: `decomposed` inlines the body, `plugin`
    drops it so the node binds to the plugin. plugin artifacts have the node only;
    native artifacts have ONNX Attention and no NAAViT node at all. `auto` takes what the
    artifact was exported for, and for custom the plugin where TensorRT has AOT plugins
    (10.9+: JetPack 7.2's 10.16, not JetPack 6's 10.3), else the body.
    """
    if requested not in ATTENTION_MODES:
        raise SaisaError(f"--attention {requested!r}: choose one of {', '.join(ATTENTION_MODES)}")
    version = version_tuple(trt_version)
    if requested == "auto":
        if variant in ("native", "plugin"):
            requested = variant
        elif version >= PYTHON_AOT_PLUGINS:
            requested = "plugin"
        else:
            requested = "decomposed"
    if requested == "plugin":
        if variant == "native":
            raise SaisaError("--attention plugin: the artifact was exported with --attention native and has no "
                             "saisa::NAAViTAttention node; export with --attention custom or plugin")
        if version < PYTHON_AOT_PLUGINS:
            fix = "use --attention decomposed" if variant == "custom" else \
                "export with --attention custom and build with --attention decomposed"
            raise SaisaError(f"--attention plugin: TensorRT {trt_version} has no AOT Python plugins (10.9+); {fix}")
    if requested == "native":
        if variant != "native":
            raise SaisaError("--attention native: export the artifact with --attention native --opset 23 first")
        if version < NATIVE_ATTENTION:
            raise SaisaError(f"--attention native: TensorRT {trt_version} cannot parse ONNX Attention (10.14+); "
                             "export with --attention custom and build with --attention decomposed")
    if requested == "decomposed" and variant != "custom":
        raise SaisaError(f"--attention decomposed: the artifact ({variant} variant) has no function body; "
                         "export with --attention custom")
    return requested


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes per input of one optimization profile."""

    name: str
    shapes: dict[str, tuple[Dims, Dims, Dims]]


def profiles(art: Artifact, graph: str, max_batch: int, max_context: int) -> list[Profile]:
    """Optimization profiles per graph: vision and visual_kv one each; the decoder one for
    prefill (many new tokens, little past) and one for decode (one token, a long past)."""
    cfg = art.config
    t, v = cfg.text, cfg.vision
    n = cfg.num_visual_tokens
    kv, d = t.num_key_value_heads, t.head_dim
    if max_batch < 1:
        raise SaisaError(f"--max-batch {max_batch}: must be at least 1")
    if not n < max_context <= art.max_context:
        raise SaisaError(f"--max-context {max_context}: must exceed the {n} visual tokens and be at most the "
                         f"artifact's {art.max_context}")
    batch = (1, 1, max_batch)

    def three(shape: Callable[[int], Dims]) -> tuple[Dims, Dims, Dims]:
        return shape(0), shape(1), shape(2)  # min, opt, max

    if graph == "vision":
        s = v.crop_size
        return [Profile("vision", {io.PIXEL_VALUES: three(lambda i: (batch[i], 3, s, s))})]
    if graph == "visual_kv":
        return [Profile("visual_kv", {io.FEATURES: three(lambda i: (batch[i], n, cfg.mm.mm_hidden_size)),
                                      io.VISUAL_START: three(lambda i: (batch[i],))})]
    text_room = max_context - n  # text positions left beside the image
    visual_len = (0, n, n)  # 0: text-only requests
    out = []
    for name, query, past in (("prefill", (1, min(128, text_room), text_room), (0, 0, text_room - 1)),
                              ("decode", (1, 1, 1), (0, min(256, text_room - 1), text_room - 1))):
        shapes = {
            io.INPUT_IDS: three(lambda i: (batch[i], query[i])),
            io.POSITION_IDS: three(lambda i: (batch[i], query[i])),
            io.PAST_POSITIONS: three(lambda i: (batch[i], past[i])),
            io.VISUAL_END: three(lambda i: (batch[i],)),
        }
        for layer in range(t.num_hidden_layers):
            for kind in ("key", "value"):
                shapes[io.past(kind, layer)] = three(lambda i: (batch[i], kv, past[i], d))
                shapes[io.visual(kind, layer)] = three(lambda i: (batch[i], kv, visual_len[i], d))
        out.append(Profile(name, shapes))
    return out


def cache_bytes(art: Artifact, max_batch: int, max_context: int) -> int:
    """Device memory of the K/V a full batch holds at the longest context (visual + text)."""
    t = art.config.text
    itemsize = 4 if art.dtype == "fp32" else 2
    return 2 * t.num_hidden_layers * max_batch * t.num_key_value_heads * max_context * t.head_dim * itemsize


def check_fits(art: Artifact, options: BuildOptions, weights_bytes: int, max_context: int) -> None:
    """Refuse a build whose weights plus K/V cannot fit the target's memory budget."""
    need = weights_bytes + cache_bytes(art, options.max_batch, max_context) + options.target.workspace_gib * 2**30
    have = options.target.memory_gib * 2**30
    if need > have:
        raise SaisaError(f"--target {options.target.name}: weights, K/V for --max-batch {options.max_batch} x "
                         f"--max-context {max_context} and workspace need {need / 2**30:.1f} GiB of its "
                         f"{options.target.memory_gib:g} GiB; lower --max-batch or --max-context, or quantize")


def check_precision_for(art: Artifact, target: Target) -> None:
    check_precision(target, art.precision)
    recipe = art.details.get("quantization", {}).get("recipe", {})
    if recipe.get("target") == "cpu" and target.compute_capability is not None:
        raise SaisaError(f"{art.path}: calibrated for --target cpu (7-bit int8 or MatMulNBits: ONNX Runtime forms); "
                         f"calibrate again with --target {target.name}")
    if recipe.get("group_size") not in (None, *TENSORRT_INT4_BLOCKS):
        raise SaisaError(f"{art.path}: int4 in groups of {recipe['group_size']}; TensorRT's INT4 blocks are "
                         f"{' or '.join(map(str, TENSORRT_INT4_BLOCKS))}: calibrate again with --group-size 128")


def gpu_and_tensorrt() -> tuple[Any, tuple[int, int]]:
    """TensorRT and this GPU's compute capability, or a one-line error saying what to install."""
    from saisa_edge.backends.tensorrt import INSTALL_HINT, import_tensorrt

    trt = import_tensorrt("build")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise SaisaError(f"build: cuda-python is not installed (pip install cuda-python); {INSTALL_HINT}") from None

    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise SaisaError(f"build: no CUDA GPU found ({err}); {INSTALL_HINT}")
    return trt, (int(props.major), int(props.minor))


def build_here(art: Artifact, output: Path, target: str, attention: str, max_batch: int, max_context: int | None,
               force: bool) -> str:
    """Build `art`'s engines for this machine's GPU into `output`; returns what was built, in words."""
    check_output(output, force, kind=ENGINE_KIND, inputs=(art.path,))  # before probing: refused on any machine
    if art.decoder_form != "standard":
        raise SaisaError(f"{art.path}: its decoder is the {art.decoder_form} form (ONNX Runtime's fused ops); "
                         "TensorRT builds from the standard form: export with --decoder-form standard")
    trt, capability = gpu_and_tensorrt()
    chosen = by_compute_capability(*capability) if target == "auto" else named_target(target)
    if chosen.compute_capability is None:
        raise SaisaError("--target cpu: engines are for GPUs; run the artifact with ONNX Runtime instead")
    if chosen.compute_capability != capability:
        raise SaisaError(f"--target {chosen.name} is compute capability {chosen.sm}, this GPU is sm_"
                         f"{capability[0]}{capability[1]}; build on the target device (engines are not portable)")
    check_precision_for(art, chosen)
    options = BuildOptions(chosen, attention, max_batch, max_context)
    context = max_context or art.max_context
    mode = resolve_attention(attention, art.details["attention"], trt.__version__)
    weights = sum(g["weights_bytes"] for g in art.details["graphs"].values())
    check_fits(art, options, weights, context)
    from saisa_edge.plugins.trt_build import build_engines

    build_engines(art, output, options, mode, context, capability, force)
    return f"{chosen.name}, attention {mode}"
