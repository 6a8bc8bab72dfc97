"""The fewest decoder linears kept in float that let an int8_sq artifact meet its text-only marks.

A noise rule guesses which layers int8 hurts; the marks are what matters. The decoder's
quantized linears are ranked by measured sensitivity (each one's relative W8A8 output
error on the calibration rows, `smoothquant.relative_errors`), and candidates keeping the
top k in float are measured with `validate --text-only`'s own functions (teacher-forced
top-1, logit cosine and greedy match on prompts, perplexity over held-out prose, against
the fp32 reference). More layers in float is assumed never worse (monotone), so the
search gallops k = 0, 1, 2, 4, ... until one passes, then bisects between the last
failure and that pass: about 2 log2(k) + 2 measurements, never more than `budget`.
Only the decoder is searched: vision and visual K/V graphs do not touch text prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saisa_edge.backends import Backend, open_model
from saisa_edge.errors import SaisaError
from saisa_edge.evaluation.perplexity import Chunks, perplexity
from saisa_edge.evaluation.text_only import validate_text
from saisa_edge.evaluation.validate import Thresholds, reference_checkpoint, thresholds_for
from saisa_edge.inputs.conversation import Template
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.progress import say

DEFAULT_BUDGET = 8  # measured candidates; each is a text-only validation of the decoder


@dataclass(frozen=True)
class Trial:
    """One candidate's measured numbers: `k` most sensitive linears in float."""

    k: int
    passed: bool
    top1: float = 0.0
    perplexity: float = 0.0
    perplexity_rise: float = 0.0
    cosine_min: float = 0.0
    greedy: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    k: int | None  # the fewest passing k found; None: no candidate passed
    fewest: bool  # k - 1 was measured failing (or k is 0): no smaller k passes, if the search is monotone
    trials: list[Trial]

    def as_json(self) -> dict[str, Any]:
        return {"k": self.k, "fewest_proven": self.fewest, "trials": [asdict(t) for t in self.trials]}


def search(measure: Callable[[int], Trial], n: int, budget: int) -> Outcome:
    """The smallest k in 0..n with `measure(k).passed`, on at most `budget` measurements:
    gallop (0, 1, 2, 4, ..., n) to a first pass, then bisect below it."""
    trials: list[Trial] = []
    failed, passed = -1, None  # largest k measured failing, smallest measured passing
    while len(trials) < budget:
        if passed is None:
            if failed >= n:
                break
            k = 0 if failed < 0 else min(n, max(1, 2 * failed))
        elif passed - failed <= 1:
            break
        else:
            k = (failed + passed) // 2
        trial = measure(k)
        trials.append(trial)
        if trial.passed:
            passed = k if passed is None else min(passed, k)
        else:
            failed = max(failed, k)
    return Outcome(passed, passed is not None and passed - failed <= 1, trials)


@dataclass(frozen=True)
class Gate:
    """The marks a candidate must meet and the data it is measured on."""

    reference: Path | None = None  # fp32 checkpoint (default: the one the artifact was exported from)
    prompts: int = 6  # calibration prompts, without images
    budget: int = DEFAULT_BUDGET
    overrides: dict[str, float | None] = field(default_factory=dict)  # --min-top1 etc.

    def thresholds(self, precision: str) -> Thresholds:
        return thresholds_for(precision, self.overrides)


class TextJudge:
    """`validate --text-only` against the fp32 reference, its perplexity measured once."""

    def __init__(self, gate: Gate, artifact: Path, details: dict[str, Any], precision: str,
                 tokenizer: PromptTokenizer, template: Template, prompts: list[str]):
        self.reference, _ = open_model(reference_checkpoint(details, gate.reference, artifact), "torch", None, "fp32")
        self.tokenizer, self.template, self.prompts = tokenizer, template, prompts
        self.precision, self.thresholds = precision, gate.thresholds(precision)
        self.chunks = Chunks.of(tokenizer)
        self.reference_perplexity = perplexity(self.reference, self.chunks)

    def __call__(self, k: int, candidate: Backend) -> Trial:
        report = validate_text(self.reference, candidate, self.tokenizer, self.template, self.prompts,
                               self.precision, self.thresholds, None, perplexity(candidate, self.chunks),
                               self.reference_perplexity)
        assert report.perplexity is not None
        trial = Trial(k, report.passed, report.top1, report.perplexity,
                      report.perplexity / self.reference_perplexity - 1, report.cosine, report.greedy,
                      report.failures)
        say(f"sensitivity search: {k} linears in float: top-1 {trial.top1:.3f}, perplexity {trial.perplexity:.3f} "
            f"({100 * trial.perplexity_rise:+.2f}%), cosine min {trial.cosine_min:.4f}, greedy {trial.greedy:.3f}: "
            + ("meets the marks" if trial.passed else "; ".join(trial.failures)))
        return trial


def gate_for(precision: str, budget: int | None, reference: Path | None,
             overrides: dict[str, float | None]) -> Gate | None:
    """calibrate's --search-budget: int8 searches by default (DEFAULT_BUDGET); 0 turns it off."""
    if budget is not None and budget < 0:
        raise SaisaError(f"--search-budget {budget}: give 0 (no search: the noise rule) or a number of candidates")
    if precision != "int8":
        if budget:
            raise SaisaError(f"--search-budget: the sensitivity search is for int8_sq; {precision} has none "
                             "(drop the flag)")
        return None
    budget = DEFAULT_BUDGET if budget is None else budget
    return Gate(reference, budget=budget, overrides=overrides) if budget else None
