"""Calibrate an artifact: run image+prompt pairs through it, pick ranges, write Q/DQ graphs.

Pass 1 runs the float artifact with every linear layer's input tapped: images through
vision.onnx, their features through visual_kv.onnx, prompts attending the real visual
K/V through decoder.onnx (prefill, then greedy decode steps), then passages of prose
through decoder.onnx alone (`data.text_chunks`). SmoothQuant (INT8) then
rescales the RMSNorm-fed inputs, each by its own alpha chosen on sampled rows
(`smoothquant`) or by one fixed alpha, and pass 2 re-measures just those. Ranges come from
the recipe's method. Which INT8 linears stay in float: the fewest decoder linears that
meet the text-only marks (`sensitivity`, when a gate is given), elsewhere a noise rule.
The new artifact keeps the float graphs' interface, so every backend runs it unchanged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from saisa_edge.artifacts import ARTIFACT_KIND, MANIFEST_NAME, Artifact, atomic_folder, open_artifact, write_manifest
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.backends.ort import OrtBackend
from saisa_edge.calibration import awq, qdq, sensitivity, smoothquant, weight_only
from saisa_edge.calibration.data import TEXT_TOPICS, Pair, digest
from saisa_edge.calibration.recipe import Recipe
from saisa_edge.calibration.stats import TensorStats, noise_ratio, pick_amax
from saisa_edge.errors import SaisaError
from saisa_edge.evaluation.perplexity import Chunks
from saisa_edge.export.graph import EMBED_LIMIT
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.progress import say, track
from saisa_edge.runtime.kv import TextCache
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

    def run(self, data: list[Pair], decode_steps: int, label: str, text: Chunks | None = None) -> Stats:
        """Each pair as a greedy request; then each prose passage teacher-forced through the
        decoder alone."""
        tokenizer = PromptTokenizer.load(self.art.path)
        session = Session(self.backend, tokenizer, TEMPLATES[self.art.details["conv_mode"]])
        params = SamplingParams(temperature=0.0)
        for pair in track(data, label, total=len(data)):
            session.generate(Request(pair.prompt, pair.pixels, params, max_new_tokens=decode_steps + 1))
        passages = [] if text is None else text.ids
        for ids in track(passages, f"{label}: prose", total=len(passages)):
            self.backend.forward(np.asarray([ids], np.int64), np.arange(len(ids), dtype=np.int64)[None],
                                 TextCache.empty(self.art.config.text, 1, self.backend.dtype), None)
        return self.stats


def _save(model: onnx.ModelProto, path: Path) -> None:
    external = sum(t.ByteSize() for t in model.graph.initializer) > EMBED_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def calibrate(source: Path | Artifact, out: Path, recipe: Recipe, data: list[Pair], decode_steps: int = 4,
              force: bool = False, gate: sensitivity.Gate | None = None, text: Chunks | None = None
              ) -> dict[str, Any]:
    """Write the calibrated artifact `out`; returns its manifest details. `text`: prose
    passages calibrated on after the pairs. `gate` (int8 only): keep in float the fewest
    decoder linears that meet its marks (sensitivity search), instead of the noise rule."""
    art = open_source(source)
    t0 = time.perf_counter()
    models = {name: onnx.load(str(art.graph(name))) for name in GRAPHS}
    sites = select_sites(models, recipe)
    taps = {name: sorted({s.activation for s in group}) for name, group in sites.items()}
    features: dict[str, np.ndarray] = {}
    int8 = recipe.precision == "int8"
    passes = 2 if recipe.smoothquant is not None else 1
    collector = awq.RowSample if recipe.awq else smoothquant.RowsAndRanges if int8 else None
    choices: dict[str, smoothquant.Choice] = {}
    rows: dict[str, np.ndarray] = {}  # int8: sampled rows of each tensor a linear reads (smoothed where it is)
    with tempfile.TemporaryDirectory(prefix="saisa-calibrate-") as tmp:
        channels = {t for names in taps.values() for t in names} if recipe.smoothquant is not None else set()
        work = Path(tmp)
        (work / "1").mkdir()
        stats = _Run(art, models, taps, channels, work / "1", features, collector).run(
            data, decode_steps, f"calibrating (pass 1/{passes})", text) if recipe.awq or not recipe.weight_only else {}
        smoothed: dict[str, list[str]] = {}
        for name, group in sites.items() if int8 else ():
            found = smoothquant.choose_graph(models[name], group, stats[name], recipe) \
                if recipe.smoothquant is not None else {}
            choices.update(found)
            scales = {act: c.scale for act, c in found.items() if c.alpha}
            sites[name], smoothed[name] = qdq.smooth(models[name], group, scales)
            for old, site in zip(group, sites[name]):
                st = stats[name][old.activation]
                if isinstance(st, smoothquant.RowsAndRanges) and st.sample is not None:
                    rows[site.activation] = st.sample_rows / scales.get(old.activation, 1.0)
        if any(smoothed.values()):
            (work / "2").mkdir()
            again = _Run(art, models, smoothed, set(), work / "2", features).run(
                data, decode_steps, "calibrating (pass 2/2, smoothed inputs)", text)
            for name, found_stats in again.items():
                stats[name].update(found_stats)
    if choices:
        say("SmoothQuant alpha per input: " + ", ".join(
            f"{a:g} x{n}" for a, n in sorted(Counter(c.alpha for c in choices.values()).items())))
    quants: dict[str, weight_only.WeightQuant] = {}
    alphas: dict[str, float] = {}
    if recipe.weight_only:  # weights alone (AWQ: scales and clipping searched on the tapped rows), no ranges
        for name in GRAPHS:
            sites[name], smoothed[name], found_q, chosen = awq.quantize_graph(models[name], sites[name],
                                                                              stats.get(name, {}), recipe)
            quants.update(found_q)
            alphas.update(chosen)
    measured = {t: s for group in stats.values() for t, s in group.items()}
    amax = {site.activation: pick_amax(measured[site.activation], recipe.method, int(recipe.activation_levels),
                                       recipe.percentile) for group in sites.values() for site in group
            if not recipe.weight_only}
    # int8's uniform grid loses small values when a few large ones set the range; fp8's
    # relative precision does not (its noise is about 3% at any magnitude), so no fallback
    noise = {t: noise_ratio(measured[t], a, recipe.activation_levels) if int8 else 0.0 for t, a in amax.items()}
    fallback = {name: [s.node for s in group if noise.get(s.activation, 0.0) > recipe.max_noise]
                for name, group in sites.items()}
    searched: dict[str, Any] = {}
    if gate is not None:
        if not int8:
            raise SaisaError(f"--search-budget: the sensitivity search is for int8_sq, not {recipe.precision}")
        fallback["decoder"], searched = _search(art, models["decoder"], sites["decoder"], rows, amax, recipe, gate,
                                                data)
    sites = {name: [s for s in group if s.node not in fallback[name]] for name, group in sites.items()}
    if any(fallback.values()):
        say("kept in float: " + ", ".join(f"{name}: {len(nodes)}" for name, nodes in fallback.items() if nodes)
            + (" (decoder: sensitivity search; others: " if searched else " (")
            + f"input noise over {recipe.max_noise:g})")
    calibration_s = time.perf_counter() - t0
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
            "text": {"source": "pydoc_data.topics", "topics": list(TEXT_TOPICS), "passages": len(text.ids),
                     "tokens": sum(map(len, text.ids)), "sha256": text.sha256} if stats and text else None,
            "images": sorted({str(p.image) for p in data}),
            "seconds": round(calibration_s, 1),
            "ranges": {t: {"amax": round(v, 6), "noise": round(noise[t], 4)} for t, v in sorted(amax.items())},
            **({"smoothquant_alpha": {t: c.alpha for t, c in sorted(choices.items())},
                "smoothquant_mse": {t: {f"{a:g}": float(f"{e:.4g}") for a, e in c.errors.items()}
                                    for t, c in sorted(choices.items()) if c.errors}} if choices else {}),
            **({"sensitivity": searched} if searched else {}),
            **({"awq_alpha": dict(sorted(alphas.items())),
                "runs_on": weight_only.ACCEPTED_BY[recipe.form][
                    "uint4" if recipe.asymmetric else f"int{recipe.weight_bits}"]
                + (f"; LM head: {weight_only.ACCEPTED_BY[recipe.form][f'int{recipe.lm_head_own_bits}']}"
                   if recipe.lm_head_own_bits else "")}
               if recipe.weight_only else {}),
            "source": {"artifact": str(art.path), "manifest_sha256": art.manifest_sha256},
        }
        write_manifest(tmp_out, ARTIFACT_KIND, details)
    return details


def _search(art: Artifact, decoder: onnx.ModelProto, sites: list[qdq.Site], rows: dict[str, np.ndarray],
            amax: dict[str, float], recipe: Recipe, gate: sensitivity.Gate, data: list[Pair]
            ) -> tuple[list[str], dict[str, Any]]:
    """The decoder linears to keep in float (the `sensitivity` search, each candidate a real
    Q/DQ decoder on ONNX Runtime), and the search's record for the manifest."""
    t0 = time.perf_counter()
    errors = smoothquant.relative_errors(decoder, sites, rows, amax, recipe)
    ranking = sorted(errors, key=lambda node: -errors[node])
    prompts = list(dict.fromkeys(p.prompt for p in data))[:gate.prompts]
    tokenizer = PromptTokenizer.load(art.path)
    judge = sensitivity.TextJudge(gate, art.path, art.details, recipe.precision, tokenizer,
                                  TEMPLATES[art.details["conv_mode"]], prompts)
    say(f"sensitivity search over {len(ranking)} decoder linears (most sensitive: "
        + ", ".join(f"{n} {errors[n]:.3f}" for n in ranking[:3]) + f"), at most {gate.budget} candidates")
    with tempfile.TemporaryDirectory(prefix="saisa-sensitivity-") as tmp:
        def measure(k: int) -> sensitivity.Trial:
            model = onnx.ModelProto()
            model.CopyFrom(decoder)
            kept = set(ranking[:k])
            qdq.insert_qdq(model, [s for s in sites if s.node not in kept], amax, recipe)
            path = Path(tmp) / f"decoder-{k}.onnx"
            _save(model, path)
            del model
            trial = judge(k, OrtBackend(art, {"decoder": path}))
            for f in Path(tmp).iterdir():
                f.unlink()
            return trial

        outcome = sensitivity.search(measure, len(ranking), gate.budget)
    k = outcome.k if outcome.k is not None else max((t.k for t in outcome.trials), default=0)
    if outcome.k is None:
        say(f"sensitivity search: no candidate met the marks in {len(outcome.trials)} tries; keeping the "
            f"{k} most sensitive linears in float (the closest measured)")
    elif not outcome.fewest:
        say(f"sensitivity search: {k} linears in float meet the marks; the budget ran out before fewer were ruled out")
    record = {"ranking": [{"node": n, "relative_error": round(errors[n], 5)} for n in ranking],
              "kept": ranking[:k], **outcome.as_json(), "budget": gate.budget, "prompts": prompts,
              "thresholds": asdict(judge.thresholds), "reference_perplexity": judge.reference_perplexity,
              "seconds": round(time.perf_counter() - t0, 1)}
    return ranking[:k], record


def summary(details: dict[str, Any]) -> dict[str, Any]:
    q = details["quantization"]
    per_graph = {name: {"quantized_linears": g["quantized_linears"], "smoothed_inputs": g["smoothed_inputs"],
                        "float_fallback": len(g["float_fallback"]), "weights_mib": round(g["weights_bytes"] / 2**20, 1)}
                 for name, g in details["graphs"].items()}
    searched = q.get("sensitivity")
    return {"recipe": q["recipe"], "samples": q["samples"], "seconds": q["seconds"], "graphs": per_graph,
            **({"smoothquant_alpha": dict(sorted(Counter(q["smoothquant_alpha"].values()).items()))}
               if "smoothquant_alpha" in q else {}),
            **({"sensitivity": {"kept_in_float": len(searched["kept"]), "fewest_proven": searched["fewest_proven"],
                                "candidates": len(searched["trials"])}} if searched else {})}
