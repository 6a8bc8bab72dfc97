"""Prompt tokenisation as the original code does it (LLaVA's `tokenizer_image_token`), from the
tokenizer files alone: no transformers, no torch, never the model's config.json.

The prompt is split at `<image>`, each chunk tokenised on its own, the BOS kept on the
first chunk only, and the image marked by IMAGE_TOKEN_INDEX between chunks. A sentencepiece
`tokenizer.model` (Vicuna) is tokenised as transformers' slow `LlamaTokenizer` does it
(the original loads it with `use_fast=False`), `legacy` quirks included (such as the lone
prefix-space token before "\\n"); a `tokenizer.json` (LLaMA-3, SmolLM2) as
`PreTrainedTokenizerFast` does it, through the `tokenizers` library.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from saisa_edge import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from saisa_edge.errors import SaisaError

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPIECE = "▁"
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before the vocabulary is (`<s>`, `<|eot_id|>` ...)."""

    content: str
    id: int | None  # None: the vocabulary's own id (a special token named only by its role)
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """What `tokenizer_config.json` and `special_tokens_map.json` say, the latter winning as in transformers."""

    tokenizer_class: str | None = None
    roles: dict[str, str | None] = field(default_factory=dict)  # bos_token/... -> text; None: set to null
    additional: tuple[str, ...] = ()  # additional_special_tokens
    added: tuple[AddedToken, ...] = ()
    add_bos: bool = True  # LlamaTokenizer's defaults
    add_eos: bool = False
    legacy: bool = True  # transformers' LlamaTokenizer when the file does not say


def _content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_config(folder: Path) -> TokenizerConfig:
    files = {name: folder / name for name in ("tokenizer_config.json", "special_tokens_map.json")}
    data: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        try:
            data[name] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as e:
            raise SaisaError(f"{path}: cannot be read as JSON ({e})") from None
    config, specials_map = data["tokenizer_config.json"], data["special_tokens_map.json"]
    roles = {role: _content(specials_map.get(role, config.get(role))) for role in _ROLES
             if role in specials_map or role in config}
    additional = [_content(t) for t in specials_map.get("additional_special_tokens",
                                                        config.get("additional_special_tokens")) or []]
    added = {int(i): AddedToken(t["content"], int(i), t.get("special", False), t.get("lstrip", False),
                                t.get("rstrip", False)) for i, t in config.get("added_tokens_decoder", {}).items()}
    if any(t.get("single_word") for t in config.get("added_tokens_decoder", {}).values()):
        raise SaisaError(f"{files['tokenizer_config.json']}: single_word added tokens are not supported")
    return TokenizerConfig(
        config.get("tokenizer_class"), roles, tuple(t for t in additional if t), tuple(added.values()),
        config.get("add_bos_token", True), config.get("add_eos_token", False), config.get("legacy", True) is not False,
    )


class Vocabulary(Protocol):
    """One tokenizer file, as transformers would run it."""

    roles: dict[str, str]  # bos_token/eos_token/unk_token/pad_token -> text, after the class's defaults

    def __call__(self, text: str) -> list[int]:
        """`tokenizer(text).input_ids`: special tokens in the text recognised, BOS/EOS added as configured."""

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=True)`."""

    def token_id(self, token: str) -> int | None: ...

    def byte_ids(self) -> frozenset[int]: ...


class SentencePieceLlama:
    """transformers' slow `LlamaTokenizer` (the version the original pins, 4.37) on `sentencepiece` alone.

    With `legacy: false` the model loses its dummy prefix; the text gets a leading "▁" instead, and a
    chunk that starts with a space is encoded behind the unknown token's text, which is then cut off.
    """

    def __init__(self, path: Path, config: TokenizerConfig):
        import sentencepiece as spm

        self.config = config
        self.sp = spm.SentencePieceProcessor()
        try:
            proto = path.read_bytes()
            if not config.legacy:
                from sentencepiece import sentencepiece_model_pb2

                model = sentencepiece_model_pb2.ModelProto.FromString(proto)  # type: ignore[attr-defined]
                model.normalizer_spec.add_dummy_prefix = False
                proto = model.SerializeToString()
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece and protobuf raise several kinds for a file that is not a model
            raise SaisaError(f"{path}: not a sentencepiece model ({type(e).__name__}: {e})") from None
        defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # LlamaTokenizer's
        self.roles = {k: v for k, v in {**defaults, **config.roles}.items() if v is not None}
        self.specials = frozenset([*self.roles.values(), *config.additional])  # `all_special_tokens`
        known = {t.content for t in config.added}
        tokens = [*config.added, *(AddedToken(t, None) for t in dict.fromkeys(self.specials) if t not in known)]
        self.added = {t.content: t.id if t.id is not None else self._vocab_id(t.content, path) for t in tokens}
        self.flags = {t.content: t for t in tokens}
        self.special_ids = frozenset(self.added[t] for t in self.specials)
        self.unk = self.roles["unk_token"]
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")

    def _vocab_id(self, piece: str, path: Path) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise SaisaError(f"{path}: special token {piece!r} is neither a piece nor in added_tokens_decoder")
        return i

    def _pieces(self, text: str) -> list[str]:
        """`_tokenize`: one stretch of text without added tokens."""
        if self.config.legacy or not text.startswith((_SPIECE, " ")):
            return self.sp.encode(text, out_type=str)
        pieces = self.sp.encode(self.unk + text, out_type=str)
        cut = len(self.sp.encode(self.unk, out_type=str))
        return pieces[cut:] if len(pieces) >= cut else pieces

    def tokens(self, text: str) -> list[str]:
        """`tokenize`: added tokens split out (with their lstrip/rstrip), the rest through sentencepiece."""
        if not self.config.legacy and text:
            text = _SPIECE + text.replace(_SPIECE, " ")
        parts = self.split.split(text) if self.added else [text]
        for i in range(1, len(parts), 2):  # odd positions hold the added tokens
            if self.flags[parts[i]].rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
            if self.flags[parts[i]].lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
        out = [t for i, part in enumerate(parts) if part for t in ([part] if i % 2 else self._pieces(part))]
        if not self.config.legacy and len(out) > 1 and out[0] == _SPIECE and out[1] in self.specials:
            out = out[1:]
        return out

    def __call__(self, text: str) -> list[int]:
        ids = [self.added[t] if t in self.added else self.sp.piece_to_id(t) for t in self.tokens(text)]
        bos, eos = (self.token_id(self.roles.get(r, "")) for r in ("bos_token", "eos_token"))
        head = [bos] if self.config.add_bos and bos is not None else []
        return head + ids + ([eos] if self.config.add_eos and eos is not None else [])

    def decode(self, ids: list[int]) -> str:
        """Special tokens dropped; pieces through sentencepiece, the first one's "▁" removed; non-special
        added tokens joined with spaces, as `_decode` does."""
        by_id = {i: t for t, i in self.added.items()}
        texts: list[str] = []
        run: list[str] = []
        for i in ids:
            if i in self.special_ids:
                continue
            if i in by_id:
                if run and (text := self._piece_text(run)):
                    texts.append(text)
                texts.append(by_id[i])
                run = []
            else:
                run.append(self.sp.id_to_piece(i))
        if run:
            texts.append(self._piece_text(run))
        return " ".join(texts)

    def _piece_text(self, pieces: list[str]) -> str:
        return self.sp.decode([pieces[0].removeprefix(_SPIECE), *pieces[1:]])

    def token_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return i if token and self.sp.id_to_piece(i) == token else None

    def byte_ids(self) -> frozenset[int]:
        return frozenset(i for i in range(self.sp.get_piece_size()) if self.sp.is_byte(i))


class TokenizersJson:
    """`PreTrainedTokenizerFast` on a `tokenizer.json`: its normaliser, pre-tokeniser, model and post-processor
    (which adds the BOS, to every call) as written; the configured special tokens skipped when decoding."""

    def __init__(self, path: Path, config: TokenizerConfig):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise SaisaError(f"{path}: not a tokenizers file ({type(e).__name__}: {e})") from None
        for t in config.added:
            if self.tok.token_to_id(t.content) is None or t.id not in (None, self.tok.token_to_id(t.content)):
                raise SaisaError(f"{path}: token {t.content!r} of tokenizer_config.json is not in it with id {t.id}")
        self.roles = {k: v for k, v in config.roles.items() if v is not None}
        marked = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        named = [*self.roles.values(), *config.additional, *(t.content for t in config.added if t.special)]
        self.special_ids = frozenset(marked | {self.tok.token_to_id(t) for t in named} - {None})

    def __call__(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def byte_ids(self) -> frozenset[int]:
        return frozenset(i for t, i in self.tok.get_vocab().items() if _BYTE_PIECE.fullmatch(t))


@dataclass
class PromptTokenizer:
    vocab: Vocabulary

    @classmethod
    def load(cls, folder: Path) -> "PromptTokenizer":
        """The files decide, as `AutoTokenizer(use_fast=False)` with LLaVA: a sentencepiece `tokenizer.model`
        unless tokenizer_config.json names a fast-only class, else `tokenizer.json`."""
        model, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        config = read_config(folder)
        fast_only = config.tokenizer_class not in (None, "LlamaTokenizer", "LlamaTokenizerFast")
        if model.is_file() and not (fast_only and json_file.is_file()):
            return cls(SentencePieceLlama(model, config))
        if json_file.is_file():
            return cls(TokenizersJson(json_file, config))
        raise SaisaError(f"{folder}: no tokenizer (expected tokenizer.model or tokenizer.json)")

    @property
    def bos_id(self) -> int | None:
        return self.vocab.token_id(self.vocab.roles.get("bos_token", ""))

    @property
    def eos_id(self) -> int | None:
        return self.vocab.token_id(self.vocab.roles.get("eos_token", ""))

    def default_conv_mode(self) -> str:
        """The template the tokenizer was made for, judged by its special tokens."""
        if self.vocab.token_id("<|im_start|>") is not None:
            return "chatml_direct"
        if any(self.vocab.token_id(t) is not None for t in ("<|begin_of_text|>", "<|eot_id|>")):
            return "llama_3"
        return "vicuna_v1"

    def tokenize(self, text: str) -> list[int]:
        """One chunk as `tokenizer(text).input_ids` gives it (BOS/EOS as the tokenizer adds them)."""
        return self.vocab(text)

    def encode(self, prompt: str) -> list[int]:
        """Prompt text with at most one `<image>` -> ids, the image as IMAGE_TOKEN_INDEX.

        As `tokenizer_image_token`: when the first chunk starts with the BOS, the first id of every
        later chunk is dropped, whatever it is (a BOS for LLaMA-3, which adds one to every chunk).
        """
        chunks = [self.vocab(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
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
        return self.vocab.byte_ids()

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids)
