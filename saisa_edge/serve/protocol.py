"""The OpenAI chat-completions protocol as this server speaks it: a request body in, typed and
bounded; responses, stream chunks and errors out, in the shapes the `openai` client reads.

Refused with 400 and a message naming the field: anything of the wrong type or range, `n`
other than 1, more than one image, an image outside the first user message (the model takes
one image per conversation, placed as LLaVA's CLI places it), roles out of order, and
options this server would otherwise silently ignore (penalties, logprobs, tools).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from saisa_edge import IMAGE_PLACEHOLDER
from saisa_edge.errors import SaisaError
from saisa_edge.runtime.sampling import MAX_SEED, SamplingParams
from saisa_edge.runtime.session import Result, user_message
from saisa_edge.strict import Fields, mapping, string

MAX_TEXT_CHARS = 1 << 20
"""A message's text; the context bounds the prompt anyway, this bounds the tokenizer's work."""
MAX_MESSAGES = 256
MAX_STOPS = 4  # as OpenAI's API
IGNORED_IF_DEFAULT = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False,
                      "parallel_tool_calls": None, "user": None, "store": False, "metadata": None}
"""Fields the `openai` client or web UIs send that change nothing at these values (others are refused)."""


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {message, type, param, code}}` with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": None, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


@dataclass(frozen=True)
class ImagePart:
    url: str  # data: or file:// (remote URLs are refused when parsed)


@dataclass(frozen=True)
class ChatRequest:
    """A parsed request: the conversation as (user, assistant) turns for the template."""

    model: str | None
    system: str | None
    turns: list[tuple[str, str | None]]
    image: ImagePart | None
    params: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def question(self) -> str:
        return self.turns[-1][0]


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """A chat-completions body -> ChatRequest, or SaisaError naming what is wrong (a 400)."""
    f = Fields(body, "request")
    model = f.string("model", None)
    messages = f.raw_value("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise SaisaError(f"request: field 'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    max_tokens = f.integer("max_completion_tokens", None, 1, 1 << 20)
    legacy = f.integer("max_tokens", None, 1, 1 << 20)
    max_tokens = max_tokens if max_tokens is not None else legacy
    params = SamplingParams(f.number("temperature", 1.0, 0, 2), f.integer("top_k", 0, 0, 1 << 20),
                            f.number("top_p", 1.0, 0, 1, open_lo=True), f.integer("seed", None, 0, MAX_SEED))
    stream = f.boolean("stream", False)
    options = mapping(f.raw_value("stream_options") or {}, "request: field 'stream_options'")
    include_usage = Fields(options, "stream_options").boolean("include_usage", False)
    stop = _stops(f.raw_value("stop"))
    for name, default in IGNORED_IF_DEFAULT.items():
        value = f.raw_value(name)
        if value is not None and value != default and default is not None:
            raise SaisaError(f"request: field {name!r} is only supported at {default!r}")
    if f.rest():
        raise SaisaError(f"request: unsupported field(s) {', '.join(sorted(f.rest()))}")
    system, turns, image = _conversation(messages)
    return ChatRequest(model, system, turns, image, params, max_tokens, stop, stream, include_usage)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise SaisaError(f"request: field 'stop' must be a string or a list of at most {MAX_STOPS} strings")
    return tuple(string(s, "request: field 'stop'", 256) for s in stops)


def _conversation(messages: list[Any]) -> tuple[str | None, list[tuple[str, str | None]], ImagePart | None]:
    """Messages -> (system text, turns with `<image>\\n` in the first user message, the image)."""
    system = None
    if isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        system, _ = _content(messages[0], 0, allow_image=False)
        messages = messages[1:]
    turns: list[tuple[str, str | None]] = []
    image = None
    for i, m in enumerate(messages):
        role = mapping(m, f"messages[{i}]").get("role")
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise SaisaError(f"messages[{i}]: expected a {want!r} message here (after an optional system message, "
                             f"user and assistant alternate and the last is the user's), got role {role!r}")
        text, part = _content(m, i, allow_image=(i == 0))
        if role == "user":
            if i == 0:
                image = part
                if IMAGE_PLACEHOLDER in text:
                    raise SaisaError(f"messages[{i}]: the text contains {IMAGE_PLACEHOLDER}; send the image as an "
                                     "image_url part")
                text = user_message(text, part is not None)
            turns.append((text, None))
        else:
            turns[-1] = (turns[-1][0], text)
    if turns[-1][1] is not None:
        raise SaisaError("messages: the last message must be the user's")
    return system, turns, image


def _content(message: dict[str, Any], i: int, allow_image: bool) -> tuple[str, ImagePart | None]:
    """A message's text (parts joined by newlines) and its image, if any."""
    where = f"messages[{i}]"
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, where), None
    if not isinstance(content, list) or not content:
        raise SaisaError(f"{where}: 'content' must be a string or a non-empty list of parts")
    texts, image = [], None
    for j, part in enumerate(content):
        p = mapping(part, f"{where}.content[{j}]")
        kind = p.get("type")
        if kind == "text":
            texts.append(_text(p.get("text"), f"{where}.content[{j}]"))
        elif kind == "image_url":
            if not allow_image:
                raise SaisaError(f"{where}.content[{j}]: an image can only be in the first user message "
                                 "(one image per conversation)")
            if image is not None:
                raise SaisaError(f"{where}.content[{j}]: one image per conversation; this is the second")
            image = _image_part(p.get("image_url"), f"{where}.content[{j}].image_url")
        else:
            raise SaisaError(f"{where}.content[{j}]: part type {kind!r} is not supported (text, image_url)")
    return "\n".join(texts), image


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
        raise SaisaError(f"{where}: text must be a string of at most {MAX_TEXT_CHARS} characters")
    return value


def _image_part(value: Any, where: str) -> ImagePart:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise SaisaError(f"{where}: give {{'url': 'data:image/png;base64,...'}}")
    if not (url.startswith("data:") or url.startswith("file://")):
        raise SaisaError(f"{where}: only data: URLs (and file:// under --allow-local-images) are accepted; "
                         "this server fetches nothing from the network")
    return ImagePart(url)


# --- responses ------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: Result, visual_tokens: int) -> dict[str, int]:
    """Prompt tokens count the image's visual positions (what the model attends to), as vLLM does."""
    prompt = len([t for t in result.prompt_tokens if t >= 0]) + visual_tokens
    return {"prompt_tokens": prompt, "completion_tokens": len(result.tokens),
            "total_tokens": prompt + len(result.tokens)}


def extension(result: Result, prefix_reused: int) -> dict[str, Any]:
    """The `saisa` field: what the visual cache did and where the time went (documented in README)."""
    return {"visual_cache": result.visual_cache, "prefix_reused_tokens": prefix_reused,
            "backend": result.backend, "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()}}


def completion(cid: str, model: str, result: Result, usage_: dict[str, int], saisa: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage_, "saisa": saisa}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish: str | None = None,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta` None makes the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **(extra or {})}
