"""int8_sq: SmoothQuant's alpha chosen per input by measured error, and the sensitivity search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from saisa_edge.artifacts import MANIFEST_NAME, open_artifact
from saisa_edge.calibration import qdq, sensitivity, smoothquant
from saisa_edge.calibration.calibrate import calibrate
from saisa_edge.calibration.data import pairs
from saisa_edge.calibration.recipe import AUTO, make_recipe
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.export.artifact import ExportOptions, export_artifact

RECIPE = make_recipe("int8", "cpu")


def _rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((256, 32)).astype(np.float32), rng.standard_normal((32, 24)).astype(np.float32)


def _w8a8_error(x: np.ndarray, w: np.ndarray, s: np.ndarray) -> float:
    """The error the Q/DQ graph would make after smoothing by s, computed here from scratch."""
    xs, ws = x / s, w * s[:, None]
    a_step = np.abs(xs).max() / 127
    w_step = np.abs(ws).max(axis=0) / RECIPE.weight_levels
    xq = np.clip(np.round(xs / a_step), -127, 127) * a_step
    wq = np.clip(np.round(ws / w_step), -RECIPE.weight_levels, RECIPE.weight_levels) * w_step
    return float(np.mean((xq @ wq - x @ w) ** 2))


def test_auto_is_the_default_and_flags_parse():
    assert RECIPE.smoothquant == AUTO and RECIPE.as_json()["smoothquant_alpha"] == "auto"
    assert make_recipe("int8", "cpu", smoothquant="0.5").smoothquant == 0.5
    assert make_recipe("int8", "cpu", smoothquant="0").smoothquant is None  # 0: no smoothing
    assert make_recipe("fp8", "h100").smoothquant is None
    for bad in ("abc", "1.5", "-0.2"):
        with pytest.raises(SaisaError, match="--smoothquant"):
            make_recipe("int8", "cpu", smoothquant=bad)


def test_alpha_choice_beats_or_ties_a_fixed_alpha():
    x, w = _rows()
    x[:, 5] *= 60  # a channel large on every row: what SmoothQuant is for
    c = smoothquant.choose(x, np.abs(x).max(axis=0), [w], RECIPE)
    assert c.alpha > 0 and set(c.errors) == set(smoothquant.ALPHAS)
    assert c.errors[c.alpha] == min(c.errors.values()) <= c.errors[0.5] < c.errors[0.0]
    fixed = qdq.smoothquant_scale(np.abs(x).max(axis=0), [w], 0.5)
    assert _w8a8_error(x, w, c.scale) <= _w8a8_error(x, w, fixed) * (1 + 1e-6)  # the graph's error, not a proxy
    assert _w8a8_error(x, w, c.scale) < _w8a8_error(x, w, np.ones(32, np.float32))


def test_alpha_zero_where_smoothing_hurts():
    x, w = _rows(1)
    amax = np.abs(x).max(axis=0)
    amax[3] = 2000.0  # one spike in the data sets channel 3's amax; the rows hold ordinary values
    c = smoothquant.choose(x, amax, [w], RECIPE)
    assert c.alpha == 0.0 and np.array_equal(c.scale, np.ones(32, np.float32))
    assert c.errors[0.0] < c.errors[0.5] / 10  # 0.5 would scale weight row 3 up ~40x, blurring every column


def test_rows_and_ranges_keep_both_statistics():
    s = smoothquant.RowsAndRanges()
    x, _ = _rows()
    s.update(x[:100])
    s.update(x[100:])
    assert s.amax == pytest.approx(np.abs(x).max()) and s.hist.sum() == x.size == s.count
    assert np.allclose(s.channel_amax, np.abs(x).max(axis=0)) and s.sample is not None and len(s.sample) == 256


def test_rows_keep_the_massive_activations():
    """A uniform sample of 64 rows out of 4000 would miss the 3 rows that set the range."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    massive = [17, 1999, 3500]
    x[massive, 4] = 3000.0
    s = smoothquant.RowsAndRanges(peaks=4)
    s.rows, s.rng = 64, np.random.default_rng(0)
    for chunk in np.split(x, 40):
        s.update(chunk)
    assert (np.abs(s.sample).max(axis=1) == 3000).sum() < 3  # the uniform part alone
    assert (s.sample_rows[:, 4] == 3000).sum() >= 3 and len(s.sample_rows) == 64 + 4


def _monotone(first: int, calls: list[int]):
    def measure(k: int) -> sensitivity.Trial:
        calls.append(k)
        return sensitivity.Trial(k, k >= first)
    return measure


@pytest.mark.parametrize("first", [0, 1, 2, 3, 13, 64, 100])
def test_search_finds_the_smallest_passing_k(first):
    calls: list[int] = []
    out = sensitivity.search(_monotone(first, calls), 100, budget=20)
    assert out.k == first and out.fewest
    assert len(calls) == len(set(calls)) == len(out.trials) <= 2 * np.log2(first + 1) + 3
    assert [t.k for t in out.trials] == calls


def test_search_stops_within_its_budget():
    calls: list[int] = []
    out = sensitivity.search(_monotone(37, calls), 100, budget=5)
    assert len(calls) == 5 and calls == [0, 1, 2, 4, 8] and out.k is None and not out.fewest
    calls.clear()
    out = sensitivity.search(_monotone(37, calls), 100, budget=8)  # a pass (64), not yet proven the fewest
    assert len(calls) == 8 and out.k is not None and 37 <= out.k <= 64 and not out.fewest
    calls.clear()
    out = sensitivity.search(_monotone(101, calls), 100, budget=50)  # even all in float fails: stop at n
    assert out.k is None and calls[-1] == 100 and len(calls) == 9


def test_gate_flags():
    assert sensitivity.gate_for("int8", None, None, {}).budget == sensitivity.DEFAULT_BUDGET
    assert sensitivity.gate_for("int8", 0, None, {}) is None and sensitivity.gate_for("fp8", None, None, {}) is None
    with pytest.raises(SaisaError, match="--search-budget -1"):
        sensitivity.gate_for("int8", -1, None, {})
    with pytest.raises(SaisaError, match="for int8_sq"):
        sensitivity.gate_for("fp8", 3, None, {})
    gate = sensitivity.Gate(overrides={"min_top1": 0.5, "min_cosine": None})
    assert gate.thresholds("int8").min_top1 == 0.5 and gate.thresholds("int8").min_cosine == 0.98


@pytest.fixture(scope="module")
def float_artifact(tmp_path_factory, tiny_gqa_dir):
    out = tmp_path_factory.mktemp("sq") / "fp32"
    export_artifact(open_checkpoint(tiny_gqa_dir), out, ExportOptions())
    return out


@pytest.mark.slow
def test_manifest_records_alphas_ranking_and_trials(tmp_path, float_artifact):
    cfg = open_artifact(float_artifact).config
    data = pairs(cfg.vision, 3)
    gate = sensitivity.Gate(prompts=2, budget=3, overrides={"min_top1": 1.01})  # no candidate can pass
    details = calibrate(float_artifact, tmp_path / "q", make_recipe("int8", "cpu", keep=()), data, 1, gate=gate)
    q = json.loads((tmp_path / "q" / MANIFEST_NAME).read_text())["details"]["quantization"]
    assert q["recipe"]["smoothquant_alpha"] == "auto"
    alphas = q["smoothquant_alpha"]
    assert alphas and set(alphas.values()) <= set(smoothquant.ALPHAS)
    for act, errors in q["smoothquant_mse"].items():  # the chosen alpha errs least of those tried
        assert errors[f"{alphas[act]:g}"] == min(errors.values())
    s = q["sensitivity"]
    decoder = details["graphs"]["decoder"]
    ranked = [r["relative_error"] for r in s["ranking"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == decoder["quantized_linears"] + 2
    assert [t["k"] for t in s["trials"]] == [0, 1, 2] and not any(t["passed"] for t in s["trials"])
    assert s["k"] is None and not s["fewest_proven"] and s["budget"] == 3 and len(s["prompts"]) == 2
    assert all(0 <= t["top1"] <= 1 and t["perplexity"] > 0 and t["failures"] for t in s["trials"])
    assert s["kept"] == [r["node"] for r in s["ranking"][:2]] == decoder["float_fallback"]  # closest measured
    assert s["thresholds"]["min_top1"] == 1.01 and s["reference_perplexity"] > 0


def test_search_stops_at_the_first_pass(tmp_path, float_artifact):
    cfg = open_artifact(float_artifact).config
    loose = {"min_cosine": -1.0, "min_top1": 0.0, "min_greedy": 0.0, "max_perplexity_increase": 100.0}
    gate = sensitivity.Gate(prompts=1, budget=4, overrides=loose)
    details = calibrate(float_artifact, tmp_path / "q", make_recipe("int8", "cpu", smoothquant=0.5),
                        pairs(cfg.vision, 2), 1, gate=gate)
    s = details["quantization"]["sensitivity"]
    assert [t["k"] for t in s["trials"]] == [0] and s["k"] == 0 and s["fewest_proven"] and s["kept"] == []
    assert details["graphs"]["decoder"]["float_fallback"] == []
    assert set(details["quantization"]["smoothquant_alpha"].values()) == {0.5}  # fixed: every input alike


@pytest.mark.parametrize("args, message", [
    (["--smoothquant", "abc"], "--smoothquant 'abc'"),
    (["--smoothquant", "1.5"], "--smoothquant 1.5"),
    (["--search-budget", "-1"], "--search-budget -1"),
    (["--precision", "fp8", "--target", "h100", "--search-budget", "2"], "for int8_sq"),
])
def test_cli_bad_flags_are_one_line(tmp_path, float_artifact, args, message):
    base = ["calibrate", str(float_artifact), "-o", str(tmp_path / "q")]
    result = CliRunner().invoke(main, base + (args if "--precision" in args else ["--precision", "int8_sq", *args]))
    assert result.exit_code == 2 and message in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
