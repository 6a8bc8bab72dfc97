"""`saisa-edge`: the command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from saisa_edge import __version__
from saisa_edge.artifacts import Artifact
from saisa_edge.backends import BACKENDS
from saisa_edge.calibration import recipe as recipes
from saisa_edge.config import DTYPE_NAMES
from saisa_edge.errors import SaisaError
from saisa_edge.extras import require_export
from saisa_edge.runtime.kv_storage import STORAGES
from saisa_edge.runtime.visual_cache import DEFAULT_DISK_MB


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
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None, help="On-disk dtype (preset default).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "bin"]), default="safetensors", show_default=True)
@click.option("--shard-mb", type=click.FloatRange(min=0), default=0, help="Shard the weights at this size (0: one file).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--force", is_flag=True, help="Replace an earlier make-checkpoint output.")
def make_checkpoint(preset: str, output: Path, dtype: str | None, fmt: str, shard_mb: float, seed: int, force: bool) -> None:
    """Write a SAISA checkpoint in the original LLaVA layout, vision tower included."""
    require_export("make-checkpoint")
    from saisa_edge.artifacts import CHECKPOINT_KIND
    from saisa_edge.artifacts.folders import check_output
    from saisa_edge.checkpoint.presets import PRESETS, write_checkpoint
    from saisa_edge.checkpoint.smollm2 import gguf_path
    from saisa_edge.progress import say

    check_output(output, force, kind=CHECKPOINT_KIND, inputs=(gguf_path(),) if preset == "smol" else ())
    t0 = time.perf_counter()
    chosen = PRESETS[preset]
    spec = chosen.build(seed=seed)
    write_checkpoint(spec, output, dtype=dtype or chosen.dtype, fmt=fmt, shard_mb=shard_mb, force=force, preset=preset)
    say(f"wrote {preset} checkpoint to {output} in {time.perf_counter() - t0:.1f} s")


def _model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the commands that open a model (run, chat, serve)."""
    options = [
        click.argument("source", type=click.Path(path_type=Path)),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="auto: ONNX Runtime for an artifact folder, PyTorch for a checkpoint."),
        click.option("--vision-tower", type=click.Path(path_type=Path), default=None,
                     help="Local CLIP vision tower folder (checkpoints)."),
        click.option("--conv-mode", default=None, help="vicuna_v1, llama_3 or chatml_direct (default: from the tokenizer)."),
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
                     help="Compute dtype of a checkpoint (default fp32); an artifact has its own."),
        click.option("--cache-mb", type=float, default=1024, show_default=True,
                     help="Memory budget of the visual K/V cache."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Keep visual K/V on disk here, for later runs and other processes."),
        click.option("--cache-disk-mb", type=float, default=DEFAULT_DISK_MB, show_default=True,
                     help="Disk budget of --cache-dir (least recently used entries removed)."),
        click.option("--cache-storage", type=click.Choice(STORAGES), default="native",
                     show_default=True, help="Store cached visual K/V quantized (half of fp16's memory)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the commands that answer from the command line: the model's, then generation's."""
    options = [
        _model_options,
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, help="0 (default): greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample from the k most likely (0: all)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0),
        click.option("--seed", default=None, help="Seed for sampling (an integer, 0 to 2**64-1)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _session(source: Path, backend: str, vision_tower: Path | None, conv_mode: str | None, dtype: str | None,
             cache_mb: float, cache_dir: Path | None, cache_storage: str, cache_disk_mb: float) -> tuple[Any, float]:
    from saisa_edge.backends import open_model
    from saisa_edge.inputs.conversation import get_template
    from saisa_edge.runtime.session import Session
    from saisa_edge.runtime.visual_cache import VisualCache, budget_bytes

    memory, disk = budget_bytes(cache_mb, "--cache-mb"), budget_bytes(cache_disk_mb, "--cache-disk-mb")
    t0 = time.perf_counter()
    _require_torch(source, backend)
    model, tokenizer = open_model(source, backend, vision_tower, dtype)
    template = get_template(conv_mode or tokenizer.default_conv_mode())
    cache = VisualCache(model.config.text, model.identity, model.dtype, memory, cache_dir, cache_storage, disk)
    return Session(model, tokenizer, template, cache), (time.perf_counter() - t0) * 1000


def _require_torch(source: Path, backend: str) -> None:
    """The PyTorch backend (a checkpoint, or --backend torch) is part of the export extra."""
    if backend == "torch" or (backend == "auto" and (source / "config.json").is_file()):
        require_export(f"{source} on the PyTorch backend")


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
        cache_mb: float, cache_dir: Path | None, cache_disk_mb: float, cache_storage: str, max_new_tokens: int,
        temperature: float, top_k: int, top_p: float, seed: str | None, image: Path | None, prompt: str,
        as_json: bool) -> None:
    """Answer one question about an image with SOURCE: an artifact folder or a checkpoint."""
    from saisa_edge.inputs.image import load_image
    from saisa_edge.runtime.sampling import SamplingParams, parse_seed
    from saisa_edge.runtime.session import Request

    params = SamplingParams(temperature, top_k, top_p, parse_seed(seed))  # bad flags fail before the model loads
    img = load_image(image) if image is not None else None  # a broken image fails before the model loads
    session, load_ms = _session(source, backend, vision_tower, conv_mode, dtype, cache_mb, cache_dir, cache_storage,
                                cache_disk_mb)
    pixels = _pixels(session, img) if img is not None else None
    request = Request(prompt, pixels, params, max_new_tokens)
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
         cache_mb: float, cache_dir: Path | None, cache_disk_mb: float, cache_storage: str, max_new_tokens: int,
         temperature: float, top_k: int, top_p: float, seed: str | None, image: Path | None) -> None:
    """A conversation in the terminal. /image PATH switches image, /reset starts over, /stats, /quit."""
    from saisa_edge.runtime.sampling import SamplingParams, parse_seed

    params = SamplingParams(temperature, top_k, top_p, parse_seed(seed))
    session, _ = _session(source, backend, vision_tower, conv_mode, dtype, cache_mb, cache_dir, cache_storage,
                          cache_disk_mb)
    conversation = session.chat(_pixels(session, image) if image is not None else None)
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
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (in-flight batching).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting beyond the batch; more get 429 with Retry-After.")
@click.option("--max-prefill-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens run between two decode steps (an image computed counts its visual tokens).")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens generated when a request does not say.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True,
              help="Seconds a request may take, queue included (then 503).")
@click.option("--api-key", envvar="SAISA_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1 (or set SAISA_API_KEY).")
@click.option("--allow-local-images", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Accept file:// image URLs under this folder (refused otherwise).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=32, show_default=True,
              help="Largest request body (images are base64 inside it).")
@click.option("--model-name", default=None, help="The model id clients send (default: SOURCE's folder name).")
@click.option("--ray", "on_ray", is_flag=True, help="Run on Ray Serve (the [ray] extra): --replicas copies, each "
              "request routed by its image's digest to the replica holding its visual K/V.")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True, help="Replicas with --ray.")
def serve(source: Path, backend: str, vision_tower: Path | None, conv_mode: str | None, dtype: str | None,
          cache_mb: float, cache_dir: Path | None, cache_disk_mb: float, cache_storage: str, host: str, port: int,
          max_batch: int, max_queue: int, max_prefill_tokens: int, default_max_tokens: int, timeout_s: float,
          api_key: str | None, allow_local_images: Path | None, max_body_mb: float, model_name: str | None,
          on_ray: bool, replicas: int) -> None:
    """Serve SOURCE over HTTP with OpenAI's chat-completions protocol (needs the [serve] extra)."""
    try:
        import uvicorn

        from saisa_edge.serve import ServeOptions, create_app
    except ImportError as e:
        raise SaisaError(f"serve: needs {e.name}, which this install lacks; pip install 'saisa-edge[serve]'") from None
    if allow_local_images is not None and not allow_local_images.is_dir():
        raise SaisaError(f"--allow-local-images {allow_local_images}: not a folder")
    opener = functools.partial(open_session, source, backend, vision_tower, conv_mode, dtype, cache_mb, cache_dir,
                               cache_storage, cache_disk_mb)
    max_batch = _engine_batch(source, max_batch)
    options = ServeOptions(model_name or source.resolve().name, max_batch, max_queue, max_prefill_tokens, timeout_s,
                           api_key, allow_local_images, int(max_body_mb * 2**20), default_max_tokens=default_max_tokens)
    if on_ray:
        _serve_on_ray(opener, options, replicas, host, port)
    else:
        uvicorn.run(create_app(opener(), options), host=host, port=port, log_level="warning")


def _engine_batch(source: Path, max_batch: int) -> int:
    """Engines take at most the batch they were built for (TensorRT refuses a larger shape)."""
    from saisa_edge.artifacts import ENGINE_KIND, kind_of, open_engines
    from saisa_edge.progress import warn

    if kind_of(source) != ENGINE_KIND:
        return max_batch
    built = open_engines(source, verify=False).manifest.max_batch
    if max_batch > built:
        warn(f"--max-batch {max_batch}: {source} was built with --max-batch {built}; serving {built} at a time")
    return min(max_batch, built)


def open_session(source: Path, backend: str = "auto", vision_tower: Path | None = None, conv_mode: str | None = None,
                 dtype: str | None = None, cache_mb: float = 1024, cache_dir: Path | None = None,
                 cache_storage: str = "native", cache_disk_mb: float = DEFAULT_DISK_MB) -> Any:
    """`_session`'s Session alone, the CLI's defaults: what each Ray Serve replica opens in its process."""
    return _session(source, backend, vision_tower, conv_mode, dtype, cache_mb, cache_dir, cache_storage,
                    cache_disk_mb)[0]


def _serve_on_ray(opener: Callable[[], Any], options: Any, replicas: int, host: str, port: int) -> None:
    try:
        from ray import serve

        from saisa_edge.serve.ray_app import application, local_ray
    except ImportError as e:
        raise SaisaError(f"serve --ray: needs {e.name}, which this install lacks; pip install 'saisa-edge[ray]'") from None
    with local_ray(host, port):
        serve.run(application(opener, options, replicas), blocking=True)


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
@click.option("--decoder-form", default="standard", show_default=True,
              help="standard: the portable decoder with saisa::NAAViTAttention (TensorRT builds from it); "
                   "contrib: ONNX Runtime's fused ops, GroupQueryAttention over a K/V buffer updated in place "
                   "(fp32; calibrate it for int8_wo/int4 MatMulNBits).")
@click.option("--force", is_flag=True, help="Replace an earlier export output.")
def export(checkpoint: Path, output: Path, vision_tower: Path | None, dtype: str, opset: int | None, attention: str,
           max_context: int | None, decoder_form: str, force: bool) -> None:
    """Export CHECKPOINT to an artifact folder: vision, visual K/V and decoder ONNX graphs plus a manifest."""
    require_export("export")
    from saisa_edge.checkpoint.loader import open_checkpoint
    from saisa_edge.export.artifact import DEFAULT_OPSET, ExportOptions, export_artifact
    from saisa_edge.export.naavit import NATIVE_MIN_OPSET
    from saisa_edge.progress import say

    t0 = time.perf_counter()
    source = open_checkpoint(checkpoint, vision_tower)
    opset = opset or (NATIVE_MIN_OPSET if attention == "native" else DEFAULT_OPSET)
    export_artifact(source, output, ExportOptions(dtype, opset, attention, max_context, decoder_form), force)
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


def _report(candidate: Path | Artifact, reference: Path | None, vision_tower: Path | None, images: Path | None,
            prompts: Path | None, samples: int, bounds: dict[str, float | None], as_json: bool,
            kv_storage: str = "native", text_only: bool = False) -> None:
    """Validate CANDIDATE (a folder, or one already opened), print the table (or JSON), exit 1 on failure."""
    require_export("validate")
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
@click.option("--keep", default=None,
              help=f"Comma list left in float: lm_head, vision ('' quantizes both) [default: "
                   f"{','.join(recipes.DEFAULT_KEEP)}; int4 on --target cpu or with --lm-head-bits: none].")
@click.option("--smoothquant", default=recipes.DEFAULT_SMOOTHQUANT, show_default=True,
              help="int8: SmoothQuant alpha per input chosen by measured W8A8 error (auto), or one alpha for "
                   "every input (0 turns smoothing off).")
@click.option("--max-noise", type=float, default=recipes.DEFAULT_MAX_NOISE, show_default=True,
              help="INT8: a linear layer whose input int8 would blur more (noise/signal RMS) stays in float "
                   "(the decoder's: only with --search-budget 0).")
@click.option("--search-budget", type=int, default=None,
              help="int8: most candidates the sensitivity search measures (text-only validation each) to keep the "
                   "fewest decoder linears in float that meet the marks; 0: the noise rule instead "
                   "[default: 8 for int8].")
@click.option("--decode-steps", type=click.IntRange(min=0), default=4, show_default=True,
              help="Greedy decode steps calibrated after each prefill.")
@click.option("--text-chunks", type=click.IntRange(min=0), default=recipes.DEFAULT_TEXT_CHUNKS, show_default=True,
              help="Passages of 256 tokens of prose (Python's reference manual) the decoder is calibrated on "
                   "after the pairs; 0: the pairs alone.")
@click.option("--group-size", type=int, default=None,
              help="Weight-only: rows of K sharing a scale (a power of two, at least 16). Default: "
                   f"{recipes.DEFAULT_GROUP_SIZE} for int4; int8_wo {recipes.DEFAULT_INT8_GROUP_SIZE} on --target cpu, "
                   f"a scale per output channel on TensorRT targets ({recipes.PER_CHANNEL}: per channel on cpu too).")
@click.option("--nbits-accuracy", type=click.Choice([str(v) for v in recipes.NBITS_ACCURACY]), default=None,
              help="Weight-only on --target cpu: MatMulNBits computing in float (0-3) or with int8 activations "
                   "(4: ONNX Runtime's fast x86 kernels). Default per format, as measured on smol "
                   f"({', '.join(f'{k} {v}' for k, v in recipes.DEFAULT_NBITS_ACCURACY.items())}).")
@click.option("--lm-head-bits", type=click.Choice([str(b) for b in recipes.LM_HEAD_BITS]), default=None,
              help="int4_awq/int4_rtn: the LM head's bits (8: as int8_wo takes it on the target; 4: as the "
                   f"body); it is read whole every decode step [default: {recipes.CPU_INT4_LM_HEAD_BITS} on --target "
                   "cpu, float on TensorRT targets].")
@click.option("--zero-point/--symmetric", "zero_point", default=None,
              help="int4: a zero point per block (uint4; default on --target cpu) or symmetric (TensorRT targets).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="fp32 checkpoint for the accuracy report (default: the one the artifact came from).")
@click.option("--report-samples", type=click.IntRange(min=0), default=6, show_default=True,
              help="Held-out pairs in the accuracy report (0: no report).")
@_thresholds
@click.option("--force", is_flag=True, help="Replace an earlier calibrate output.")
def calibrate(artifact: Path, output: Path, precision: str, target: str, images: Path | None, prompts: Path | None,
              samples: int, method: str | None, percentile: float, keep: str | None, smoothquant: str, max_noise: float,
              search_budget: int | None, decode_steps: int, text_chunks: int, group_size: int | None, nbits_accuracy: str | None, lm_head_bits: str | None, zero_point: bool | None,
              reference: Path | None, report_samples: int, min_cosine: float | None, min_top1: float | None,
              min_greedy: float | None, max_perplexity_increase: float | None, force: bool) -> None:
    """Quantize ARTIFACT (INT8/FP8 Q/DQ, or weight-only INT4/INT8), calibrated on image+prompt pairs; then
    report its accuracy on held-out pairs against the fp32 reference (exit 1 if it fails)."""
    require_export("calibrate")
    from saisa_edge.artifacts import ARTIFACT_KIND, open_artifact
    from saisa_edge.artifacts.folders import check_output
    from saisa_edge.calibration.calibrate import calibrate as run_calibration, open_source, summary
    from saisa_edge.calibration.data import pairs, text_chunks as prose
    from saisa_edge.inputs.tokenizer import PromptTokenizer
    from saisa_edge.calibration.recipe import make_recipe
    from saisa_edge.progress import say

    from saisa_edge.calibration.sensitivity import gate_for

    kept = None if keep is None else tuple(k.strip() for k in keep.split(",") if k.strip())
    recipe = make_recipe(precision, target, method, kept, smoothquant, percentile, max_noise, group_size,
                         None if nbits_accuracy is None else int(nbits_accuracy), zero_point,
                         None if lm_head_bits is None else int(lm_head_bits))
    bounds: dict[str, float | None] = {"min_cosine": min_cosine, "min_top1": min_top1, "min_greedy": min_greedy,
                                       "max_perplexity_increase": max_perplexity_increase}
    gate = gate_for(recipe.precision, search_budget, reference, bounds)
    check_output(output, force, kind=ARTIFACT_KIND, inputs=(artifact,))  # before the calibration passes
    source = open_source(artifact)
    cfg = source.config
    data = pairs(cfg.vision, samples, images, prompts, pad=cfg.mm.pads_images)
    text = prose(PromptTokenizer.load(source.path), text_chunks, source.max_context) if text_chunks else None
    details = run_calibration(source, output, recipe, data, decode_steps, force, gate, text)
    say(f"wrote {output}: {json.dumps(summary(details))}")
    if report_samples:  # its files were hashed as they were written, moments ago: sizes are checked, not hashes
        _report(open_artifact(output, verify=False), reference, None, None, None, report_samples, bounds,
                as_json=False, text_only=True)


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
@click.option("--force", is_flag=True, help="Replace an earlier build output.")
def build(artifact: Path, output: Path, target: str, attention: str, max_batch: int, max_context: int | None,
          force: bool) -> None:
    """Build TensorRT engines for ARTIFACT (strongly typed; profiles for prefill and decode)."""
    from saisa_edge.artifacts import open_artifact
    from saisa_edge.plugins.build import build_here

    built = build_here(open_artifact(artifact), output, target, attention, max_batch, max_context, force)
    click.echo(f"wrote {output} ({built})", err=True)


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
        require_export("flops CHECKPOINT")
        from saisa_edge.checkpoint.loader import open_checkpoint

        assert checkpoint is not None
        shapes, label = Shapes.of(open_checkpoint(checkpoint).config), str(checkpoint)
    r = report(shapes, text_tokens, label)
    click.echo(json.dumps(r, indent=2) if as_json else table(r))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None, help="Compute dtype of a checkpoint.")
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
    from saisa_edge.evaluation.bench import bench as run_bench, plot as draw, table
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
    _require_torch(source, backend)
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
    click.echo(table(report))
