"""`saisa-edge`: the command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from saisa_edge import __version__
from saisa_edge.backends import BACKENDS
from saisa_edge.calibration import recipe as recipes
from saisa_edge.config import DTYPES
from saisa_edge.errors import SaisaError
from saisa_edge.runtime.kv_storage import STORAGES


class _Group(click.Group):
    """Turns SaisaError into `error: ...` and exit 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SaisaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="saisa-edge")
def main() -> None:
    """SAISA multimodal LLMs from checkpoint to fast inference."""


@main.command("make-checkpoint")
@click.option("--preset", type=click.Choice(["tiny", "smol"]), required=True, help="What to build.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="On-disk dtype (preset default).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "bin"]), default="safetensors", show_default=True)
@click.option("--shard-mb", type=click.FloatRange(min=0), default=0, help="Shard the weights at this size (0: one file).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
def make_checkpoint(preset: str, output: Path, dtype: str | None, fmt: str, shard_mb: float, seed: int, force: bool) -> None:
    """Write a SAISA checkpoint in the original LLaVA layout, vision tower included."""
    from saisa_edge.checkpoint.presets import PRESETS, write_checkpoint
    from saisa_edge.progress import say

    t0 = time.perf_counter()
    chosen = PRESETS[preset]
    spec = chosen.build(seed=seed)
    write_checkpoint(spec, output, dtype=dtype or chosen.dtype, fmt=fmt, shard_mb=shard_mb, force=force, preset=preset)
    say(f"wrote {preset} checkpoint to {output} in {time.perf_counter() - t0:.1f} s")


def _source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the commands that run a model."""
    options = [
        click.argument("source", type=click.Path(path_type=Path)),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="auto: ONNX Runtime for an artifact folder, PyTorch for a checkpoint."),
        click.option("--vision-tower", type=click.Path(path_type=Path), default=None,
                     help="Local CLIP vision tower folder (checkpoints)."),
        click.option("--conv-mode", default=None, help="vicuna_v1, llama_3 or chatml_direct (default: from the tokenizer)."),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                     help="Compute dtype of a checkpoint (default fp32); an artifact has its own."),
        click.option("--cache-mb", type=click.FloatRange(min=0), default=1024, show_default=True,
                     help="Memory budget of the visual K/V cache."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Keep visual K/V on disk here, for later runs and other processes."),
        click.option("--cache-storage", type=click.Choice(STORAGES), default="native",
                     show_default=True, help="Store cached visual K/V quantized (half of fp16's memory)."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, help="0 (default): greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample from the k most likely (0: all)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0),
        click.option("--seed", type=int, default=None, help="Seed for sampling."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _session(source: Path, backend: str, vision_tower: Path | None, conv_mode: str | None, dtype: str | None,
             cache_mb: float, cache_dir: Path | None, cache_storage: str) -> tuple[Any, float]:
    from saisa_edge.backends import open_model
    from saisa_edge.inputs.conversation import get_template
    from saisa_edge.runtime.session import Session
    from saisa_edge.runtime.visual_cache import VisualCache

    t0 = time.perf_counter()
    model, tokenizer = open_model(source, backend, vision_tower, dtype)
    template = get_template(conv_mode or tokenizer.default_conv_mode())
    cache = VisualCache(model.config.text, model.identity, model.dtype, int(cache_mb * 2**20), cache_dir,
                        cache_storage)
    return Session(model, tokenizer, template, cache), (time.perf_counter() - t0) * 1000


def _pixels(session: Any, image: Any) -> Any:
    """Model-ready pixels of an image file or an already decoded image."""
    from saisa_edge.inputs.image import load_image, preprocess

    cfg = session.backend.config
    img = load_image(image) if isinstance(image, Path) else image
    return preprocess(img, cfg.vision, cfg.mm.pads_images)


def _echo(piece: str) -> None:
    click.echo(piece, nl=False)
    sys.stdout.flush()


@main.command()
@_source_options
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Image file (JPEG, PNG, WebP, BMP, GIF).")
@click.option("--prompt", required=True, help="The question.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(source: Path, backend: str, vision_tower: Path | None, conv_mode: str | None, dtype: str | None,
        cache_mb: float, cache_dir: Path | None, cache_storage: str, max_new_tokens: int, temperature: float,
        top_k: int, top_p: float,
        seed: int | None, image: Path | None, prompt: str, as_json: bool) -> None:
    """Answer one question about an image with SOURCE: an artifact folder or a checkpoint."""
    from saisa_edge.inputs.image import load_image
    from saisa_edge.runtime.sampling import SamplingParams
    from saisa_edge.runtime.session import Request

    img = load_image(image) if image is not None else None  # a broken image fails before the model loads
    session, load_ms = _session(source, backend, vision_tower, conv_mode, dtype, cache_mb, cache_dir, cache_storage)
    pixels = _pixels(session, img) if img is not None else None
    request = Request(prompt, pixels, SamplingParams(temperature, top_k, top_p, seed), max_new_tokens)
    result = session.generate(request, None if as_json else _echo)
    result.timings_ms = {"load": load_ms, **result.timings_ms}
    if as_json:
        cache = session.cache
        click.echo(json.dumps({**result.as_json(), "conv_mode": session.template.name,
                               "cache": {"bytes": cache.nbytes, "entries": len(cache),
                                         "persistent": str(cache.folder) if cache.folder else None}}))
    else:
        click.echo()


@main.command()
@_source_options
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Image to talk about (/image to switch).")
def chat(source: Path, backend: str, vision_tower: Path | None, conv_mode: str | None, dtype: str | None,
         cache_mb: float, cache_dir: Path | None, cache_storage: str, max_new_tokens: int, temperature: float, top_k: int,
         top_p: float, seed: int | None, image: Path | None) -> None:
    """A conversation in the terminal. /image PATH switches image, /reset starts over, /stats, /quit."""
    from saisa_edge.runtime.sampling import SamplingParams

    session, _ = _session(source, backend, vision_tower, conv_mode, dtype, cache_mb, cache_dir, cache_storage)
    conversation = session.chat(_pixels(session, image) if image is not None else None)
    params = SamplingParams(temperature, top_k, top_p, seed)
    last: dict[str, Any] = {}
    click.echo("saisa-edge chat: /image PATH, /reset, /stats, /quit", err=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        command, _, arg = line.partition(" ")
        try:
            if command == "/quit":
                break
            if command == "/reset":
                conversation.reset(conversation.pixels)
                click.echo("(conversation reset)")
            elif command == "/image":
                conversation.reset(_pixels(session, Path(arg.strip())))
                click.echo(f"(new image: {arg.strip()}; conversation reset)")
            elif command == "/stats":
                c = session.cache
                click.echo(json.dumps({"turns": len(conversation.turns), "last": last,
                                       "cache": {"bytes": c.nbytes, "entries": len(c), **vars(c.stats)}}))
            elif command.startswith("/"):
                click.echo(f"unknown command {command}; /image PATH, /reset, /stats, /quit")
            else:
                result = conversation.ask(line, params, max_new_tokens, _echo)
                click.echo()
                last = {"visual_cache": result.visual_cache, **result.as_json()["timings_ms"]}
        except SaisaError as e:  # a bad image or an over-long turn ends the turn, not the chat
            click.echo(f"error: {e}", err=True)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Artifact folder to write.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="Local CLIP vision tower folder.")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, fp16 or bf16 graphs.")
@click.option("--opset", type=int, default=None, help="ONNX opset (18..23; default 19, 23 for --attention native).")
@click.option("--attention", default="custom", show_default=True,
              help="custom: saisa::NAAViTAttention with its function body (ONNX Runtime, TensorRT decomposed); "
                   "plugin: the node only (TensorRT with the plugin); native: ONNX Attention (opset 23+).")
@click.option("--max-context", type=int, default=None, help="Longest sequence the artifact serves (default: the model's).")
@click.option("--force", is_flag=True, help="Replace an existing folder that is not an earlier export.")
def export(checkpoint: Path, output: Path, vision_tower: Path | None, dtype: str, opset: int | None, attention: str,
           max_context: int | None, force: bool) -> None:
    """Export CHECKPOINT to an artifact folder: vision, visual K/V and decoder ONNX graphs plus a manifest."""
    from saisa_edge.checkpoint.loader import open_checkpoint
    from saisa_edge.export.artifact import DEFAULT_OPSET, ExportOptions, export_artifact
    from saisa_edge.export.naavit import NATIVE_MIN_OPSET
    from saisa_edge.progress import say

    t0 = time.perf_counter()
    source = open_checkpoint(checkpoint, vision_tower)
    opset = opset or (NATIVE_MIN_OPSET if attention == "native" else DEFAULT_OPSET)
    export_artifact(source, output, ExportOptions(dtype, opset, attention, max_context), force)
    say(f"wrote {output} in {time.perf_counter() - t0:.1f} s")


def _thresholds(f: Callable[..., Any]) -> Callable[..., Any]:
    """Pass-mark overrides shared by `validate` and `calibrate`'s accuracy report."""
    options = [
        click.option("--min-cosine", type=float, default=None, help="Lowest logit cosine allowed (per precision default)."),
        click.option("--min-top1", type=float, default=None, help="Lowest teacher-forced top-1 agreement allowed."),
        click.option("--min-greedy", type=float, default=None, help="Lowest greedy-token match allowed."),
        click.option("--max-perplexity-increase", type=float, default=None,
                     help="Largest relative perplexity rise over held-out prose (0.1: +10%)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _report(candidate: Path, reference: Path | None, vision_tower: Path | None, images: Path | None,
            prompts: Path | None, samples: int, bounds: dict[str, float | None], as_json: bool,
            kv_storage: str = "native", text_only: bool = False) -> None:
    """Validate, print the table (or JSON), exit 1 on failure."""
    from saisa_edge.evaluation.validate import run_validation, table
    from saisa_edge.progress import track

    report = run_validation(candidate, reference, vision_tower, images, prompts, samples, bounds, progress=track,
                            kv_storage=kv_storage, text_only=text_only)
    text = getattr(report, "table", None)  # a text-only report prints itself
    click.echo(json.dumps(report.as_json(), indent=2) if as_json else text() if text else table(report))
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Calibrated artifact folder to write.")
@click.option("--precision", type=click.Choice(recipes.PRECISIONS), required=True)
@click.option("--target", default="cpu", show_default=True,
              help="orin-agx, orin-nx, orin-nano, a100, l4, h100 or cpu (ONNX Runtime): what the graphs must run on.")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Folder of calibration images (default: bundled).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="Prompt file, one per line (default: bundled).")
@click.option("--samples", type=int, default=16, show_default=True, help="Image+prompt pairs to calibrate on.")
@click.option("--method", default=None, help="max, percentile, entropy or mse (default: percentile for int8, max for fp8).")
@click.option("--percentile", type=float, default=recipes.DEFAULT_PERCENTILE, show_default=True)
@click.option("--keep", default=",".join(recipes.DEFAULT_KEEP), show_default=True,
              help="Comma list left in float: lm_head, vision ('' quantizes both).")
@click.option("--smoothquant", type=float, default=recipes.DEFAULT_SMOOTHQUANT, show_default=True,
              help="SmoothQuant alpha for int8 (0 turns smoothing off).")
@click.option("--max-noise", type=float, default=recipes.DEFAULT_MAX_NOISE, show_default=True,
              help="INT8: a linear layer whose input int8 would blur more (noise/signal RMS) stays in float.")
@click.option("--decode-steps", type=click.IntRange(min=0), default=4, show_default=True,
              help="Greedy decode steps calibrated after each prefill.")
@click.option("--group-size", type=int, default=recipes.DEFAULT_GROUP_SIZE, show_default=True,
              help="int4_awq/int4_rtn: rows of K sharing a scale (a power of two, at least 16).")
@click.option("--nbits-accuracy", type=click.Choice(["0", "4"]), default=str(recipes.DEFAULT_NBITS_ACCURACY),
              show_default=True, help="Weight-only on --target cpu: MatMulNBits computing in float (0) or with "
                                      "int8 activations (4: ONNX Runtime's fast x86 kernels).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="fp32 checkpoint for the accuracy report (default: the one the artifact came from).")
@click.option("--report-samples", type=click.IntRange(min=0), default=6, show_default=True,
              help="Held-out pairs in the accuracy report (0: no report).")
@_thresholds
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def calibrate(artifact: Path, output: Path, precision: str, target: str, images: Path | None, prompts: Path | None,
              samples: int, method: str | None, percentile: float, keep: str, smoothquant: float, max_noise: float,
              decode_steps: int, group_size: int, nbits_accuracy: str,
              reference: Path | None, report_samples: int, min_cosine: float | None, min_top1: float | None,
              min_greedy: float | None, max_perplexity_increase: float | None, force: bool) -> None:
    """Quantize ARTIFACT (INT8/FP8 Q/DQ, or weight-only INT4/INT8), calibrated on image+prompt pairs; then
    report its accuracy on held-out pairs against the fp32 reference (exit 1 if it fails)."""
    from saisa_edge.calibration.calibrate import calibrate as run_calibration, open_source, summary
    from saisa_edge.calibration.data import pairs
    from saisa_edge.calibration.recipe import make_recipe
    from saisa_edge.progress import say

    recipe = make_recipe(precision, target, method, tuple(k.strip() for k in keep.split(",") if k.strip()),
                         smoothquant or None, percentile, max_noise, group_size, int(nbits_accuracy))
    cfg = open_source(artifact).config
    data = pairs(cfg.vision, samples, images, prompts, pad=cfg.mm.pads_images)
    details = run_calibration(artifact, output, recipe, data, decode_steps, force)
    say(f"wrote {output}: {json.dumps(summary(details))}")
    if report_samples:
        _report(output, reference, None, None, None, report_samples,
                {"min_cosine": min_cosine, "min_top1": min_top1, "min_greedy": min_greedy,
                 "max_perplexity_increase": max_perplexity_increase}, as_json=False, text_only=True)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="fp32 SAISA checkpoint (default: the one SOURCE was exported from).")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="The reference's vision tower.")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Folder of images (default: bundled held-out set).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="Prompt file (default: bundled held-out set).")
@click.option("--samples", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--kv-storage", type=click.Choice(STORAGES), default="native", show_default=True,
              help="Measure with the visual K/V stored as the cache's --cache-storage would.")
@click.option("--text-only", is_flag=True, help="The prompts without images (the decoder on its own weights' ground).")
@_thresholds
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def validate(source: Path, reference: Path | None, vision_tower: Path | None, images: Path | None,
             prompts: Path | None, samples: int, kv_storage: str, text_only: bool, min_cosine: float | None,
             min_top1: float | None, min_greedy: float | None, max_perplexity_increase: float | None,
             as_json: bool) -> None:
    """Compare SOURCE (an artifact or engine folder) with the fp32 PyTorch reference; exit 1 on failure."""
    _report(source, reference, vision_tower, images, prompts, samples,
            {"min_cosine": min_cosine, "min_top1": min_top1, "min_greedy": min_greedy,
             "max_perplexity_increase": max_perplexity_increase}, as_json, kv_storage, text_only)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Engine folder to write.")
@click.option("--target", default="auto", show_default=True,
              help="orin-agx, orin-nx, orin-nano, a100, l4, h100, or auto (this machine's GPU).")
@click.option("--attention", default="auto", show_default=True,
              help="plugin (the NAAViT plugin), native (ONNX Attention, TensorRT 10.14+), decomposed (the "
                   "function body, any TensorRT), or auto (by TensorRT version and the artifact).")
@click.option("--max-batch", type=int, default=1, show_default=True)
@click.option("--max-context", type=int, default=None, help="Longest sequence (default: the artifact's).")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
def build(artifact: Path, output: Path, target: str, attention: str, max_batch: int, max_context: int | None,
          force: bool) -> None:
    """Build TensorRT engines for ARTIFACT (strongly typed; profiles for prefill and decode)."""
    from saisa_edge.export.artifact import read_artifact
    from saisa_edge.plugins import build as plan
    from saisa_edge.targets import by_compute_capability, target as named_target

    art = read_artifact(artifact)
    trt, capability = _gpu_and_tensorrt()
    chosen = by_compute_capability(*capability) if target == "auto" else named_target(target)
    if chosen.compute_capability is None:
        raise SaisaError("--target cpu: engines are for GPUs; run the artifact with ONNX Runtime instead")
    if chosen.compute_capability != capability:
        raise SaisaError(f"--target {chosen.name} is compute capability {chosen.sm}, this GPU is sm_"
                         f"{capability[0]}{capability[1]}; build on the target device (engines are not portable)")
    plan.check_precision_for(art, chosen)
    options = plan.BuildOptions(chosen, attention, max_batch, max_context)
    context = max_context or int(art.details["max_context"])
    mode = plan.resolve_attention(attention, art.details["attention"], trt.__version__)
    weights = sum(g["weights_bytes"] for g in art.details["graphs"].values())
    plan.check_fits(art, options, weights, context)
    from saisa_edge.plugins.trt_build import build_engines

    build_engines(art, output, options, mode, context, capability, force)
    click.echo(f"wrote {output} ({chosen.name}, attention {mode})", err=True)


def _gpu_and_tensorrt() -> tuple[Any, tuple[int, int]]:
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


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--config", "name", default=None, help="A built-in configuration: vicuna-7b or llama3-8b.")
@click.option("--text-tokens", type=int, default=32, show_default=True, help="Prompt tokens beside the image.")
@click.option("--json", "as_json", is_flag=True)
def flops(checkpoint: Path | None, name: str | None, text_tokens: int, as_json: bool) -> None:
    """Analytic inference FLOPs per stage, SAISA against the LLaVA-1.5 layout."""
    from saisa_edge.evaluation.flops import CONFIGS, Shapes, report, table

    if (checkpoint is None) == (name is None):
        raise SaisaError("flops: give a CHECKPOINT folder or --config NAME (one of them)")
    if name is not None:
        if name not in CONFIGS:
            raise SaisaError(f"--config {name!r}: choose one of {', '.join(CONFIGS)}")
        shapes, label = CONFIGS[name], name
    else:
        from saisa_edge.checkpoint.loader import open_checkpoint

        assert checkpoint is not None
        shapes, label = Shapes.of(open_checkpoint(checkpoint).config), str(checkpoint)
    r = report(shapes, text_tokens, label)
    click.echo(json.dumps(r, indent=2) if as_json else table(r))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="Compute dtype of a checkpoint.")
@click.option("--prompt-lengths", default="16,128", show_default=True, help="Comma list of prompt token counts.")
@click.option("--batches", default="1,2", show_default=True, help="Comma list of batch sizes.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Best of this many.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="PNG of the stage breakdown.")
def bench(source: Path, backend: str, vision_tower: Path | None, dtype: str | None, prompt_lengths: str,
          batches: str, decode_tokens: int, repeats: int, as_json: bool, plot: Path | None) -> None:
    """Time SOURCE (SAISA) against the LLaVA-1.5 layout on the same backbone and backend."""
    from saisa_edge.backends import open_model
    from saisa_edge.evaluation.bench import bench as run_bench, plot as draw
    from saisa_edge.inputs.conversation import get_template
    from saisa_edge.inputs.image import DEMO_IMAGE, load_image, preprocess
    from saisa_edge.progress import say

    def ints(flag: str, text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise SaisaError(f"{flag} {text!r}: give positive integers separated by commas")
        return values

    lengths, sizes = ints("--prompt-lengths", prompt_lengths), ints("--batches", batches)
    model, tokenizer = open_model(source, backend, vision_tower, dtype)
    cfg = model.config
    if max(lengths) + cfg.num_visual_tokens + decode_tokens >= model.max_context:
        raise SaisaError(f"--prompt-lengths {max(lengths)}: with {cfg.num_visual_tokens} visual tokens and "
                         f"{decode_tokens} decoded it exceeds the context of {model.max_context}")
    pixels = preprocess(load_image(DEMO_IMAGE), cfg.vision, cfg.mm.pads_images)
    report = run_bench(model, tokenizer, get_template(tokenizer.default_conv_mode()), pixels, lengths, sizes,
                       decode_tokens, repeats, progress=say)
    if plot is not None:
        draw(report, str(plot))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'layout':<10} {'prompt':>6} {'batch':>5} {'ttft cold':>10} {'cached':>8} {'vision':>8} "
               f"{'vis kv':>7} {'prefill/s':>10} {'decode/s':>9}")
    for p in report["points"]:
        cached = f"{p['ttft_cached_ms']:8.1f}" if p["ttft_cached_ms"] is not None else f"{'-':>8}"
        click.echo(f"{p['layout']:<10} {p['prompt_tokens']:6d} {p['batch']:5d} {p['ttft_cold_ms']:10.1f} {cached} "
                   f"{p['vision_ms']:8.1f} {p['visual_kv_ms']:7.1f} {p['prefill_tokens_per_s']:10.1f} "
                   f"{p['decode_tokens_per_s']:9.1f}")
    click.echo(f"visual cache {report['visual_cache_bytes_per_image'] / 2**20:.1f} MiB per image; "
               f"peak RSS {report['peak_rss_mib']:.0f} MiB; median decode speed-up over LLaVA-1.5 "
               f"{report['median_decode_speedup']}x")
