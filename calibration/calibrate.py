"""Calibrate an artifact: run image+prompt pairs through it, pick ranges, write Q/DQ graphs.

Pass 1 runs the float artifact with every linear layer's input tapped: images through
vision.onnx, their features through visual_kv.onnx, prompts attending the real visual
K/V through decoder.onnx (prefill, then greedy decode steps). SmoothQuant (INT8) then
rescales the RMSNorm-fed inputs, and pass 2 re-measures just those. Ranges come from
the recipe's method; the new artifact keeps the float graphs' interface, so every
backend runs it unchanged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from saisa_edge.artifacts import ARTIFACT_KIND, MANIFEST_NAME, Artifact, atomic_folder, open_artifact, write_manifest
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.calibration import awq, qdq, weight_only
from saisa_edge.calibration.data import Pair, digest
from saisa_edge.calibration.recipe import Recipe
from saisa_edge.calibration.stats import TensorStats, noise_ratio, pick_amax
from saisa_edge.errors import SaisaError
from saisa_edge.export.graph import EMBED_LIMIT
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.progress import say, track
from saisa_edge.runtime.sampling import SamplingParams
from saisa_edge.runtime.session import Request, Session

Stats = dict[str, dict[str, TensorStats]]  # graph -> tapped tensor -> statistics


def open_source(path: Path | Artifact) -> Artifact:
    art = path if isinstance(path, Artifact) else open_artifact(path)
    if "quantization" in art.details:
        q = art.details["quantization"]
        raise SaisaError(f"{path}: already quantized ({q['recipe']['precision']}); calibrate the float artifact "
                         f"it came from ({q['source']['artifact']})")
    if art.details["dtype"] not in ("fp32", "fp16"):
        raise SaisaError(f"{path}: a {art.details['dtype']} artifact; calibration runs it on ONNX Runtime's CPU, "
                         "so export with --dtype fp32 or fp16")
    return art


def select_sites(models: dict[str, onnx.ModelProto], recipe: Recipe) -> dict[str, list[qdq.Site]]:
    chosen = {}
    for name, model in models.items():
        sites = qdq.find_sites(model) if not (name == "vision" and "vision" in recipe.keep) else []
        chosen[name] = [s for s in sites if not (s.role == qdq.LM_HEAD and "lm_head" in recipe.keep)]
    return chosen


class _Run:
    """One calibration pass: tapped graphs on ONNX Runtime, a greedy request per pair."""

    def __init__(self, art: Artifact, models: dict[str, onnx.ModelProto], taps: dict[str, list[str]],
                 channels: set[str], workdir: Path, features: dict[str, np.ndarray],
                 collector: Callable[[], TensorStats] | None = None):
        self.stats: Stats = {g: {t: collector() if collector else TensorStats(channels=t in channels) for t in names}
                             for g, names in taps.items()}
        paths = {}
        for name, names in taps.items():
            if names:
                paths[name] = workdir / f"{name}.onnx"
                _save(qdq.with_taps(models[name], names), paths[name])
        self.art = art
        # every graph output observed; an image goes through vision.onnx once per calibration (`features`)
        self.backend = OrtBackend(art, paths, self._observe, features)

    def _observe(self, graph: str, outputs: dict[str, np.ndarray]) -> None:
        for name, s in self.stats.get(graph, {}).items():
            try:
                s.update(outputs[name])
            except FloatingPointError:
                raise SaisaError(f"calibration: {graph}.onnx produced inf/NaN at {name}; the float artifact "
                                 "overflows on this data (fp16?): calibrate an fp32 export") from None

    def run(self, data: list[Pair], decode_steps: int, label: str) -> Stats:
        tokenizer = PromptTokenizer.load(self.art.path)
        session = Session(self.backend, tokenizer, TEMPLATES[self.art.details["conv_mode"]])
        params = SamplingParams(temperature=0.0)
        for pair in track(data, label, total=len(data)):
            session.generate(Request(pair.prompt, pair.pixels, params, max_new_tokens=decode_steps + 1))
        return self.stats


def _save(model: onnx.ModelProto, path: Path) -> None:
    external = sum(t.ByteSize() for t in model.graph.initializer) > EMBED_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def calibrate(source: Path | Artifact, out: Path, recipe: Recipe, data: list[Pair], decode_steps: int = 4,
              force: bool = False) -> dict[str, Any]:
    """Write the calibrated artifact `out`; returns its manifest details."""
    art = open_source(source)
    t0 = time.perf_counter()
    models = {name: onnx.load(str(art.graph(name))) for name in GRAPHS}
    sites = select_sites(models, recipe)
    taps = {name: sorted({s.activation for s in group}) for name, group in sites.items()}
    features: dict[str, np.ndarray] = {}
    passes = 2 if recipe.smoothquant is not None else 1
    with tempfile.TemporaryDirectory(prefix="saisa-calibrate-") as tmp:
        channels = {t for names in taps.values() for t in names} if recipe.smoothquant is not None else set()
        work = Path(tmp)
        (work / "1").mkdir()
        stats = _Run(art, models, taps, channels, work / "1", features, awq.RowSample if recipe.awq else None).run(
            data, decode_steps, f"calibrating (pass 1/{passes})") if recipe.awq or not recipe.weight_only else {}
        smoothed: dict[str, list[str]] = {}
        if recipe.smoothquant is not None:
            for name, group in sites.items():
                amax = {t: s.channel_amax for t, s in stats[name].items() if s.channel_amax is not None}
                sites[name], smoothed[name] = qdq.smooth(models[name], group, amax, recipe.smoothquant)
            if any(smoothed.values()):
                (work / "2").mkdir()
                again = _Run(art, models, smoothed, set(), work / "2", features).run(
                    data, decode_steps, "calibrating (pass 2/2, smoothed inputs)")
                for name, found in again.items():
                    stats[name].update(found)
    quants: dict[str, weight_only.WeightQuant] = {}
    alphas: dict[str, float] = {}
    if recipe.weight_only:  # weights alone (AWQ: scales and clipping searched on the tapped rows), no ranges
        for name in GRAPHS:
            sites[name], smoothed[name], found, chosen = awq.quantize_graph(models[name], sites[name],
                                                                            stats.get(name, {}), recipe)
            quants.update(found)
            alphas.update(chosen)
    calibration_s = time.perf_counter() - t0
    measured = {t: s for group in stats.values() for t, s in group.items()}
    amax = {site.activation: pick_amax(measured[site.activation], recipe.method, int(recipe.activation_levels),
                                       recipe.percentile) for group in sites.values() for site in group
            if not recipe.weight_only}
    # int8's uniform grid loses small values when a few large ones set the range; fp8's
    # relative precision does not (its noise is about 3% at any magnitude), so no fallback
    noise = {t: noise_ratio(measured[t], a, recipe.activation_levels) if recipe.precision == "int8" else 0.0
             for t, a in amax.items()}
    fallback = {name: [s.node for s in group if noise.get(s.activation, 0.0) > recipe.max_noise]
                for name, group in sites.items()}
    sites = {name: [s for s in group if s.node not in fallback[name]] for name, group in sites.items()}
    if any(fallback.values()):
        say(f"kept in float (input noise over {recipe.max_noise:g}): "
            + ", ".join(f"{name}: {len(nodes)}" for name, nodes in fallback.items() if nodes))
    details = json.loads(json.dumps(art.details))
    with atomic_folder(out, force, kind=ARTIFACT_KIND, inputs=(art.path,)) as tmp_out:
        for name in GRAPHS:
            saved = weight_only.rewrite(models[name], sites[name], quants, recipe.form, recipe.nbits_accuracy) \
                if recipe.weight_only \
                else qdq.insert_qdq(models[name], sites[name], amax, recipe)
            weights_bytes = sum(len(t.raw_data) for t in models[name].graph.initializer)
            path = tmp_out / f"{name}.onnx"
            _save(models[name], path)
            onnx.checker.check_model(str(path), full_check=True)
            entry = details["graphs"][name]
            entry.update(file=path.name, nodes=len(models[name].graph.node),
                         weights_bytes=weights_bytes,
                         external_data=f"{path.name}.data" if (tmp_out / f"{path.name}.data").exists() else None,
                         quantized_linears=len(sites[name]), smoothed_inputs=len(smoothed.get(name, [])),
                         float_fallback=fallback[name])
            say(f"wrote {name}.onnx: {len(sites[name])} linear layers in {recipe.precision}, "
                f"{saved / 2**20:.1f} MiB smaller")
        for f in art.path.iterdir():
            if f.is_file() and f.name != MANIFEST_NAME and f.name.split(".onnx")[0] not in GRAPHS:
                shutil.copy2(f, tmp_out / f.name)
        details["quantization"] = {
            "recipe": recipe.as_json(),
            "samples": len(data) if stats else 0, "decode_steps": decode_steps, "data_sha256": digest(data),
            "images": sorted({str(p.image) for p in data}),
            "seconds": round(calibration_s, 1),
            "ranges": {t: {"amax": round(v, 6), "noise": round(noise[t], 4)} for t, v in sorted(amax.items())},
            **({"awq_alpha": dict(sorted(alphas.items())),
                "runs_on": weight_only.ACCEPTED_BY[recipe.form][
                    "uint4" if recipe.asymmetric else f"int{recipe.weight_bits}"]}
               if recipe.weight_only else {}),
            "source": {"artifact": str(art.path), "manifest_sha256": art.manifest_sha256},
        }
        write_manifest(tmp_out, ARTIFACT_KIND, details)
    return details


def summary(details: dict[str, Any]) -> dict[str, Any]:
    q = details["quantization"]
    per_graph = {name: {"quantized_linears": g["quantized_linears"], "smoothed_inputs": g["smoothed_inputs"],
                        "float_fallback": len(g["float_fallback"]), "weights_mib": round(g["weights_bytes"] / 2**20, 1)}
                 for name, g in details["graphs"].items()}
    return {"recipe": q["recipe"], "samples": q["samples"], "seconds": q["seconds"], "graphs": per_graph}
