"""Prompt tokenisation as the original code does it (LLaVA's `tokenizer_image_token`).

The prompt is split at `<image>`, each chunk tokenised on its own, the BOS kept on
the first chunk only, and the image marked by IMAGE_TOKEN_INDEX between chunks.
Checkpoints with a sentencepiece `tokenizer.model` (Vicuna) load with
`use_fast=False` as the original does; quirks such as the lone prefix-space token
before "\\n" are part of the model's input and are kept.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from saisa_edge import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from saisa_edge.errors import SaisaError

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class PromptTokenizer:
    hf: Any  # a transformers tokenizer

    @classmethod
    def load(cls, folder: Path) -> "PromptTokenizer":
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not any((folder / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
            raise SaisaError(f"{folder}: no tokenizer (expected tokenizer.model or tokenizer.json)")
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' notes on a config it does not model
                hf = AutoTokenizer.from_pretrained(str(folder), use_fast=not (folder / "tokenizer.model").exists())
        except Exception as e:  # transformers raises many kinds for a bad tokenizer folder
            raise SaisaError(f"{folder}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
        return cls(hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    def default_conv_mode(self) -> str:
        """The template the tokenizer was made for, judged by its special tokens."""
        vocab = self.hf.get_vocab()
        if "<|im_start|>" in vocab:
            return "chatml_direct"
        if "<|begin_of_text|>" in vocab or "<|eot_id|>" in vocab:
            return "llama_3"
        return "vicuna_v1"

    def encode(self, prompt: str) -> list[int]:
        """Prompt text with at most one `<image>` -> ids, the image as IMAGE_TOKEN_INDEX."""
        chunks = [self.hf(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
        if len(chunks) > 2:
            raise SaisaError(f"--prompt holds {len(chunks) - 1} {IMAGE_PLACEHOLDER} markers; one image per prompt")
        skip = 1 if chunks[0] and chunks[0][0] == self.bos_id else 0
        ids = list(chunks[0])
        for chunk in chunks[1:]:
            ids += [IMAGE_TOKEN_INDEX] + chunk[skip:]
        return ids

    @cached_property
    def byte_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte-fallback pieces (`<0x0A>` ...)."""
        return frozenset(i for t, i in self.hf.get_vocab().items() if _BYTE_PIECE.fullmatch(t))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
