"""`validate --text-only`: the candidate against the fp32 reference on prompts without images.

Where the image path is untrained (the `smol` preset), image prompts push the decoder into
states its real weights never see; text prompts measure what a quantized decoder keeps of
the real model. Per prompt: logit cosine and top-1 over the reference's teacher-forced
greedy answer, and the greedy match, as `validate` does for image+prompt pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from saisa_edge.backends import Backend
from saisa_edge.evaluation.validate import (
    STEPS, Report, TextSample, Thresholds, _cosine, _greedy_match, perplexity_line,
)
from saisa_edge.inputs.conversation import Template
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.runtime.kv import TextCache
from saisa_edge.runtime.sampling import SamplingParams
from saisa_edge.runtime.session import Request, Session, user_message


@dataclass
class TextReport(Report):
    samples: list[TextSample]  # type: ignore[assignment]

    def as_json(self) -> dict[str, Any]:
        low = min(self.samples, key=lambda s: s.cosine_min)
        return {"precision": self.precision, "text_only": True, "passed": self.passed, "failures": self.failures,
                "thresholds": asdict(self.thresholds),
                "summary": {"logit_cosine_min": self.cosine, "top1": self.top1, "greedy_match": self.greedy,
                            "perplexity": self.perplexity, "reference_perplexity": self.reference_perplexity,
                            "prose_top1": self.prose_top1},
                "worst_sample": {"prompt": low.prompt, "cosine_min": low.cosine_min},
                "samples": [asdict(s) for s in self.samples]}

    def table(self) -> str:
        rows = [f"{'prompt (no image)':<40} {'cos min':>9} {'top-1':>6} {'greedy':>6}"]
        rows += [f"{s.prompt[:40]:<40} {s.cosine_min:9.6f} {s.top1:6.3f} {s.greedy:6.3f}" for s in self.samples]
        t = self.thresholds
        rows += [f"{self.precision} (text only): logit cosine min {self.cosine:.6f} (>= {t.min_cosine}), "
                 f"top-1 {self.top1:.3f} (>= {t.min_top1}), greedy {self.greedy:.3f} (>= {t.min_greedy})",
                 *perplexity_line(self),
                 "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)]
        return "\n".join(rows)


def _greedy(backend: Backend, tokenizer: PromptTokenizer, template: Template, prompt: str) -> list[int]:
    request = Request(prompt, None, SamplingParams(temperature=0.0), max_new_tokens=STEPS)
    return Session(backend, tokenizer, template).generate(request).tokens


def compare_text(reference: Backend, candidate: Backend, tokenizer: PromptTokenizer, template: Template,
                 prompt: str) -> TextSample:
    ids = tokenizer.encode(template.prompt([(user_message(prompt, False), None)]))
    ref_tokens = _greedy(reference, tokenizer, template, prompt)
    forced = ids + ref_tokens[:-1]
    steps = slice(len(ids) - 1, len(forced))

    def logits(backend: Backend) -> np.ndarray:
        out, _ = backend.forward(np.asarray([forced], dtype=np.int64), np.arange(len(forced), dtype=np.int64)[None],
                                 TextCache.empty(backend.config.text, 1, backend.dtype), None)
        return out[0, steps].astype(np.float32)

    ref, got = logits(reference), logits(candidate)
    cosines = [_cosine(a, b) for a, b in zip(ref, got)]
    cand_tokens = _greedy(candidate, tokenizer, template, prompt)
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return TextSample(prompt, min(cosines), float(np.mean(cosines)), top1, _greedy_match(ref_tokens, cand_tokens),
                      ref_tokens, cand_tokens)


def validate_text(reference: Backend, candidate: Backend, tokenizer: PromptTokenizer, template: Template,
                  prompts: list[str], precision: str, thresholds: Thresholds, progress: Any = None,
                  perplexity: float | None = None, reference_perplexity: float | None = None,
                  prose_top1: float | None = None) -> TextReport:
    items = progress(prompts, "validating (text only)", total=len(prompts)) if progress else prompts
    samples = [compare_text(reference, candidate, tokenizer, template, p) for p in items]
    return TextReport(precision, thresholds, samples, perplexity, reference_perplexity, prose_top1)
