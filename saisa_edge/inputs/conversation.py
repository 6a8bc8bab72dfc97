"""Conversation templates, formatted exactly as the original's `Conversation.get_prompt`.

The table and the five separator styles follow `llava/conversation.py` of icip-cas/SAISA
(LLaVA's file plus `llama_3`). A prompt is the template's preset messages (`v0`'s
worked example) followed by the (user, assistant) turns; an awaited reply is None.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from saisa_edge import IMAGE_PLACEHOLDER
from saisa_edge.errors import SaisaError

STYLES = ("single", "two", "mpt", "llama_2", "plain")  # LLaVA's SeparatorStyle, lower-cased

_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_MMTAG_SYSTEM = (  # no space between the last two sentences, as in the original
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2_SYSTEM = (  # two spaces after "safe.", as in the original
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
_V0_EXAMPLE = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    ("Assistant",
     "Renewable energy sources are those that can be replenished naturally in a relatively "
     "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
     "Non-renewable energy sources, on the other hand, are finite and will eventually be "
     "depleted, such as coal, oil, and natural gas. Here are some key differences between "
     "renewable and non-renewable energy sources:\n"
     "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
     "energy sources are finite and will eventually run out.\n"
     "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
     "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
     "and other negative effects.\n"
     "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
     "have lower operational costs than non-renewable sources.\n"
     "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
     "locations than non-renewable sources.\n"
     "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
     "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
     "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
     "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"),
)
_MMTAG_IMAGE = ("<Image><image></Image>", "Received.")

Message = tuple[str, str | None]  # (role, text); None or "" is a reply still awaited


@dataclass(frozen=True)
class Template:
    """One entry of the original's `conv_templates` (`sep2` None where the original has none)."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str | None = None
    version: str = "Unknown"
    messages: tuple[tuple[str, str], ...] = ()  # preset exchange every prompt starts with

    @property
    def stop(self) -> str:
        """Text that ends an assistant turn: the `stop` the original web server sends its model worker
        (`sep` for SINGLE and MPT, else `sep2`); "" where there is none (PLAIN)."""
        return self.sep if self.style in ("single", "mpt") else self.sep2 or ""

    def conversation(self, turns: list[tuple[str, str | None]]) -> list[Message]:
        """The (role, text) list `get_prompt` formats: preset messages, then the turns.

        mmtag versions give a first user message that carries the image as `get_prompt`
        gives an image message: `<image>` taken out of the question and sent alone as
        `<Image><image></Image>`, answered "Received.". Other versions keep the text as
        given (`<image>\\n` before the question, as LLaVA's CLI builds it).
        """
        users, assistants = self.roles
        out: list[Message] = list(self.messages)
        for i, (user, reply) in enumerate(turns):
            if i == 0 and not out and "mmtag" in self.version and IMAGE_PLACEHOLDER in user:
                out += [(users, _MMTAG_IMAGE[0]), (assistants, _MMTAG_IMAGE[1])]
                user = user.replace(IMAGE_PLACEHOLDER, "").strip()
            out += [(users, user), (assistants, reply)]
        return out

    def prompt(self, turns: list[tuple[str, str | None]]) -> str:
        """Format (user, assistant) turns; the last assistant reply is None while it is awaited."""
        messages = self.conversation(turns)
        if self.style == "single":
            return self.system + self.sep + "".join(
                f"{role}: {text}{self.sep}" if text else f"{role}:" for role, text in messages)
        if self.style == "two":
            seps = (self.sep, self.sep2)
            return self.system + self.sep + "".join(
                f"{role}: {text}{seps[i % 2]}" if text else f"{role}:" for i, (role, text) in enumerate(messages))
        if self.style == "mpt":
            return self.system + self.sep + "".join(
                f"{role}{text}{self.sep}" if text else role for role, text in messages)
        if self.style == "llama_2":
            return self._llama_2(messages)
        if self.sep2 is None and any(text for _, text in messages[1::2]):
            raise SaisaError(f"--conv-mode {self.name}: the original's PLAIN style formats one question, no replies")
        seps = (self.sep, self.sep2)
        return self.system + "".join(f"{text}{seps[i % 2]}" for i, (_, text) in enumerate(messages) if text)

    def _llama_2(self, messages: list[Message]) -> str:
        """`[INST] <<SYS>>...<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...`: the system prompt sits inside the
        first instruction; the result is left-stripped of the characters of `sep`, as the original does."""
        if not messages or not messages[0][1]:
            raise SaisaError(f"--conv-mode {self.name}: the first message must be the user's question")
        out = ""
        for i, (_, text) in enumerate(messages):
            if not text:
                continue
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            out += f"{self.sep}[INST] {text} [/INST]" if i % 2 == 0 else f" {text} {self.sep2}"
        return out.lstrip(self.sep)


_VICUNA_V0 = Template("v0", _HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###", messages=_V0_EXAMPLE)
_VICUNA_V1 = Template("vicuna_v1", _USER_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>", "v1")
_CHATML_DIRECT = Template("chatml_direct", "<|im_start|>system\nAnswer the questions.",
                          ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>", version="mpt")
_PLAIN = Template("plain", "", ("", ""), "plain", "\n")

TEMPLATES: dict[str, Template] = {
    "default": replace(_VICUNA_V0, name="default"),
    "v0": _VICUNA_V0,
    "v1": replace(_VICUNA_V1, name="v1"),
    "vicuna_v1": _VICUNA_V1,
    "llama_2": Template("llama_2", _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>", "llama_v2"),
    "llama_3": Template("llama_3", _USER_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "<|end_of_text|>", "llama_3"),
    "mistral_instruct": Template("mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "", "</s>", "llama_v2"),
    "chatml_direct": _CHATML_DIRECT,
    "mistral_direct": replace(_CHATML_DIRECT, name="mistral_direct"),
    "plain": _PLAIN,
    "v0_plain": replace(_PLAIN, name="v0_plain"),
    "llava_v0": Template("llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###"),
    "v0_mmtag": Template("v0_mmtag", _MMTAG_SYSTEM, ("Human", "Assistant"), "single", "###", version="v0_mmtag"),
    "llava_v1": Template("llava_v1", _HUMAN_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>", "v1"),
    "v1_mmtag": Template("v1_mmtag", _MMTAG_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>", "v1_mmtag"),
    "llava_llama_2": Template("llava_llama_2", _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>",
                              "llama_v2"),
    "mpt": Template("mpt", "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                    "The assistant gives helpful and honest answers.", ("<|im_start|>user\n", "<|im_start|>assistant\n"),
                    "mpt", "<|im_end|>", version="mpt"),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise SaisaError(f"--conv-mode {name!r} is unknown; choose one of {', '.join(TEMPLATES)}") from None
