"""`saisa-edge`: the command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from saisa_edge import __version__
from saisa_edge.config import DTYPES
from saisa_edge.errors import SaisaError

_ASSETS = Path(__file__).parent / "assets"


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


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Image file (JPEG, PNG, WebP, BMP, GIF).")
@click.option("--prompt", required=True, help="The question.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None, help="Local CLIP vision tower folder.")
@click.option("--conv-mode", default=None, help="vicuna_v1, llama_3 or chatml_direct (default: from the tokenizer).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Compute dtype of a checkpoint (default fp32); an artifact has its own.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, help="0 (default): greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample from the k most likely (0: all).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(
    source: Path, image: Path | None, prompt: str, vision_tower: Path | None, conv_mode: str | None,
    dtype: str | None, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
    as_json: bool,
) -> None:
    """Answer one question about an image with SOURCE: a checkpoint (PyTorch) or an artifact (ONNX Runtime)."""
    from saisa_edge.backends import open_model
    from saisa_edge.inputs.conversation import get_template
    from saisa_edge.inputs.image import load_image, preprocess
    from saisa_edge.runtime.generate import generate
    from saisa_edge.runtime.sampling import SamplingParams

    img = load_image(image) if image is not None else None
    t0 = time.perf_counter()
    backend, tokenizer = open_model(source, vision_tower, dtype)
    load_ms = (time.perf_counter() - t0) * 1000
    template = get_template(conv_mode or tokenizer.default_conv_mode())
    cfg = backend.config
    pixels = preprocess(img, cfg.vision, cfg.mm.image_aspect_ratio == "pad") if img else None
    params = SamplingParams(temperature, top_k, top_p, seed)

    def echo(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    result = generate(backend, tokenizer, template, prompt, pixels, params, max_new_tokens, None if as_json else echo)
    result.timings_ms = {"load": load_ms, **result.timings_ms}
    if as_json:
        click.echo(json.dumps({**result.as_json(), "conv_mode": template.name}))
    else:
        click.echo()


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
