"""Conversation templates formatted exactly as the original LLaVA/SAISA code formats them."""

from __future__ import annotations

from dataclasses import dataclass

from saisa_edge.errors import SaisaError

_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Template:
    """`two`: LLaVA's SeparatorStyle.TWO (vicuna_v1, llama_3); `mpt`: SeparatorStyle.MPT (chatml)."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str = ""

    @property
    def stop(self) -> str:
        """Text that ends an assistant turn."""
        return self.sep2 if self.style == "two" else self.sep

    def prompt(self, turns: list[tuple[str, str | None]]) -> str:
        """Format (user, assistant) turns; the last assistant reply is None while it is awaited."""
        messages = [m for user, reply in turns for m in (user, reply)]
        if self.style == "two":
            seps = (self.sep, self.sep2)
            out = self.system + self.sep
            for i, msg in enumerate(messages):
                role = self.roles[i % 2]
                out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
            return out
        out = self.system + self.sep
        for i, msg in enumerate(messages):
            out += self.roles[i % 2] + (msg + self.sep if msg else "")
        return out


TEMPLATES = {
    t.name: t
    for t in (
        Template("vicuna_v1", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
        Template("llama_3", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "<|end_of_text|>"),
        Template(
            "chatml_direct",
            "<|im_start|>system\nAnswer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "mpt",
            "<|im_end|>",
        ),
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise SaisaError(f"--conv-mode {name!r} is unknown; choose one of {', '.join(TEMPLATES)}") from None
