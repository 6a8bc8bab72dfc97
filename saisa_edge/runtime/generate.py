"""One request from prompt text and image to generated text, on any backend.

Stages, each timed: vision (pixels -> features), visual_kv (features -> every layer's
visual K/V), prefill (all prompt text in one pass), decode (one token at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from saisa_edge import IMAGE_PLACEHOLDER
from saisa_edge.backends import Backend
from saisa_edge.errors import SaisaError
from saisa_edge.inputs.conversation import Template
from saisa_edge.inputs.tokenizer import PromptTokenizer
from saisa_edge.model import split
from saisa_edge.runtime.sampling import SamplingParams, make_generator, sample
from saisa_edge.runtime.stream import TextStream


@dataclass
class Result:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str
    visual_cache: str
    backend: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        decode_s = self.timings_ms.get("decode", 0.0) / 1000
        steps = max(len(self.tokens) - 1, 0)
        return {
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "backend": self.backend,
            "visual_cache": self.visual_cache,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "decode_tokens_per_s": round(steps / decode_s, 3) if decode_s > 0 else None,
        }


def user_message(question: str, has_image: bool) -> str:
    """The first user turn as LLaVA's CLI builds it: `<image>\\n` before the question."""
    if not has_image:
        if IMAGE_PLACEHOLDER in question:
            raise SaisaError(f"--prompt contains {IMAGE_PLACEHOLDER} but no --image was given")
        return question
    return question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"


def check_fits(n_text: int, n_visual: int, context: int) -> None:
    if n_text + n_visual >= context:
        raise SaisaError(
            f"--prompt is too long: {n_text} text tokens + {n_visual} visual positions leave no room "
            f"in the model's context of {context}; shorten the prompt"
        )


@torch.no_grad()
def generate(
    backend: Backend,
    tokenizer: PromptTokenizer,
    template: Template,
    question: str,
    pixels: torch.Tensor | None,
    params: SamplingParams,
    max_new_tokens: int,
    on_text: Callable[[str], None] | None = None,
) -> Result:
    """Answer `question` about the image whose preprocessed `pixels` [3, S, S] are given (or none)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = (now - since) * 1000
        return now

    prompt = template.prompt([(user_message(question, pixels is not None), None)])
    ids = tokenizer.encode(prompt)
    n_visual = backend.config.num_visual_tokens if pixels is not None else 0
    context = backend.max_context
    check_fits(len(ids) - (n_visual > 0), n_visual, context)
    text_ids, positions, start = split.text_layout(ids, n_visual)

    visual = None
    now = t0
    if pixels is not None:
        features = backend.vision(pixels[None])
        now = lap("vision", now)
        visual = backend.visual_kv(features, start)
        now = lap("visual_kv", now)

    cache = split.TextCache.empty(backend.config.text, 1, backend.dtype)
    logits, cache = backend.forward(torch.tensor([text_ids]), torch.tensor([positions]), cache, visual)
    now = lap("prefill", now)
    gen = make_generator(params)
    eos = {e for e in (*backend.config.text.eos_token_ids, tokenizer.eos_id) if e is not None}
    stream = TextStream(tokenizer.decode, (template.stop,), on_text, tokenizer.byte_ids)
    tokens: list[int] = []
    next_pos = positions[-1] + 1
    finish = "length"
    while True:
        token = sample(logits[0, -1], params, gen)
        if not tokens:
            timings["first_token"] = (time.perf_counter() - t0) * 1000
        if token in eos:
            finish = "stop"
            break
        tokens.append(token)
        if stream.push(token):
            finish = "stop"
            break
        if len(tokens) >= max_new_tokens or next_pos >= context:
            break
        logits, cache = backend.forward(torch.tensor([[token]]), torch.tensor([[next_pos]]), cache, visual)
        next_pos += 1
    lap("decode", now)
    timings["total"] = (time.perf_counter() - t0) * 1000
    return Result(
        prompt_tokens=ids,
        tokens=tokens,
        text=stream.finish().strip(),
        finish_reason=finish,
        visual_cache="miss" if pixels is not None else "none",
        backend=backend.name,
        timings_ms=timings,
    )
