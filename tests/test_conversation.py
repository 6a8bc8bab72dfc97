"""Every conversation template against prompts written out by hand from the original's rules.

Source: `llava/conversation.py` of icip-cas/SAISA (53a3670; LLaVA's file, haotian-liu/LLaVA
c121f04, plus `llama_3`). The strings below are typed from its `get_prompt` and its system
texts, not produced by the code under test.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from saisa_edge.errors import SaisaError
from saisa_edge.inputs.conversation import STYLES, TEMPLATES, get_template

IMAGE_TURNS = [("<image>\nWhat is it?", "A cat."), ("And the colour?", None)]  # image in turn 1, turn 2 awaited

USER_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions.")
HUMAN_SYS = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
MMTAG_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant is able to "
             "understand the visual content that the user provides, and assist the user with a variety of tasks "
             "using natural language.The visual content will be provided with the following format: "
             "<Image>visual content</Image>.")
LLAMA_2_SYS = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
               "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
               "or illegal content. Please ensure that your responses are socially unbiased and positive in nature."
               "\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of "
               "answering something not correct. If you don't know the answer to a question, please don't share "
               "false information.")
LLAVA_LLAMA_2_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                     "that the user provides, and assist the user with a variety of tasks using natural language.")
V0_EXAMPLE = (
    "###Human: What are the key differences between renewable and non-renewable energy sources?"
    "###Assistant: Renewable energy sources are those that can be replenished naturally in a relatively short amount "
    "of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, "
    "are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
    "between renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are "
    "finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
    "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
    "operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than "
    "non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations and "
    "needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable sources "
    "are not, and their depletion can lead to economic and social instability.\n"
)
CHATML_SYS = "<|im_start|>system\nAnswer the questions."
MPT_SYS = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
           "helpful and honest answers.")

V0 = HUMAN_SYS + V0_EXAMPLE + "###Human: <image>\nWhat is it?###Assistant: A cat.###Human: And the colour?###Assistant:"
V1 = USER_SYS + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And the colour? ASSISTANT:"
CHATML = (CHATML_SYS + "<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\nA cat."
          "<|im_end|><|im_start|>user\nAnd the colour?<|im_end|><|im_start|>assistant\n")
PLAIN = "<image>\nWhat is it?\n"

TWO_TURNS = {
    "default": V0,
    "v0": V0,
    "v1": V1,
    "vicuna_v1": V1,
    "llama_2": "[INST] <<SYS>>\n" + LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s><s>[INST] "
               "And the colour? [/INST]",
    "llama_3": USER_SYS + " USER: <image>\nWhat is it? ASSISTANT: A cat.<|end_of_text|>USER: And the colour? ASSISTANT:",
    "mistral_instruct": "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] And the colour? [/INST]",
    "chatml_direct": CHATML,
    "mistral_direct": CHATML,
    "llava_v0": HUMAN_SYS + "###Human: <image>\nWhat is it?###Assistant: A cat.###Human: And the colour?###Assistant:",
    "v0_mmtag": MMTAG_SYS + "###Human: <Image><image></Image>###Assistant: Received.###Human: What is it?"
                "###Assistant: A cat.###Human: And the colour?###Assistant:",
    "llava_v1": HUMAN_SYS + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And the colour? ASSISTANT:",
    "v1_mmtag": MMTAG_SYS + " USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is it? ASSISTANT: "
                "A cat.</s>USER: And the colour? ASSISTANT:",
    "llava_llama_2": "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. "
                     "</s><s>[INST] And the colour? [/INST]",
    "mpt": MPT_SYS + "<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\nA cat."
           "<|im_end|><|im_start|>user\nAnd the colour?<|im_end|><|im_start|>assistant\n",
}

ONE_TURN_TEXT = {  # [("Hi", None)]: no image
    "vicuna_v1": USER_SYS + " USER: Hi ASSISTANT:",
    "llava_v1": HUMAN_SYS + " USER: Hi ASSISTANT:",
    "v1_mmtag": MMTAG_SYS + " USER: Hi ASSISTANT:",
    "v0_mmtag": MMTAG_SYS + "###Human: Hi###Assistant:",
    "llava_v0": HUMAN_SYS + "###Human: Hi###Assistant:",
    "v0": HUMAN_SYS + V0_EXAMPLE + "###Human: Hi###Assistant:",
    "llama_3": USER_SYS + " USER: Hi ASSISTANT:",
    "llama_2": "[INST] <<SYS>>\n" + LLAMA_2_SYS + "\n<</SYS>>\n\nHi [/INST]",
    "mistral_instruct": "[INST] Hi [/INST]",
    "chatml_direct": CHATML_SYS + "<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n",
    "plain": "Hi\n",
}

STOPS = {"default": "###", "v0": "###", "llava_v0": "###", "v0_mmtag": "###", "v1": "</s>", "vicuna_v1": "</s>",
         "llava_v1": "</s>", "v1_mmtag": "</s>", "llama_3": "<|end_of_text|>", "llama_2": "</s>",
         "llava_llama_2": "</s>", "mistral_instruct": "</s>", "chatml_direct": "<|im_end|>",
         "mistral_direct": "<|im_end|>", "mpt": "<|im_end|>", "plain": "", "v0_plain": ""}


def test_every_original_name_is_there():
    assert set(TEMPLATES) == set(TWO_TURNS) | {"plain", "v0_plain"} == set(STOPS)
    assert {t.style for t in TEMPLATES.values()} == set(STYLES)


@pytest.mark.parametrize("name", sorted(TWO_TURNS))
def test_two_turns_with_an_image(name):
    assert TEMPLATES[name].prompt(IMAGE_TURNS) == TWO_TURNS[name]


@pytest.mark.parametrize("name", ["plain", "v0_plain"])
def test_plain_one_image_question(name):
    assert TEMPLATES[name].prompt([IMAGE_TURNS[0][:1] + (None,)]) == PLAIN


@pytest.mark.parametrize("name", sorted(ONE_TURN_TEXT))
def test_one_turn_without_image(name):
    assert TEMPLATES[name].prompt([("Hi", None)]) == ONE_TURN_TEXT[name]


def test_one_turn_with_image():
    assert TEMPLATES["vicuna_v1"].prompt([("<image>\nWhat is it?", None)]) == (
        USER_SYS + " USER: <image>\nWhat is it? ASSISTANT:")
    assert TEMPLATES["v1_mmtag"].prompt([("<image>\nWhat is it?", None)]) == (
        MMTAG_SYS + " USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What is it? ASSISTANT:")
    assert TEMPLATES["llava_llama_2"].prompt([("<image>\nWhat is it?", None)]) == (
        "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is it? [/INST]")


def test_three_turns_keep_alternating_separators():
    turns = [("<image>\nQ1", "A1"), ("Q2", "A2"), ("Q3", None)]
    assert TEMPLATES["llama_3"].prompt(turns) == (
        USER_SYS + " USER: <image>\nQ1 ASSISTANT: A1<|end_of_text|>USER: Q2 ASSISTANT: A2<|end_of_text|>USER: Q3 "
        "ASSISTANT:")
    assert TEMPLATES["llama_2"].prompt(turns).endswith(
        "<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s><s>[INST] Q3 [/INST]")


def test_user_placed_image_is_kept_where_it_is_outside_mmtag():
    """LLaVA's CLI and run_llava keep a question's own `<image>`; only mmtag moves it to its own message."""
    assert TEMPLATES["vicuna_v1"].prompt([("Is <image> a cat?", None)]) == USER_SYS + " USER: Is <image> a cat? ASSISTANT:"
    assert TEMPLATES["v0_mmtag"].prompt([("Is it a cat? <image>", None)]) == (
        MMTAG_SYS + "###Human: <Image><image></Image>###Assistant: Received.###Human: Is it a cat?###Assistant:")


@pytest.mark.parametrize("name", sorted(STOPS))
def test_stop_string(name):
    assert TEMPLATES[name].stop == STOPS[name]


def test_plain_refuses_a_reply():
    with pytest.raises(SaisaError, match="--conv-mode plain: .*one question"):
        TEMPLATES["plain"].prompt([("<image>\nQ", "A"), ("Q2", None)])


def test_llama_2_needs_a_question_first():
    with pytest.raises(SaisaError, match="--conv-mode llama_2: the first message"):
        TEMPLATES["llama_2"].prompt([("", None)])


def test_templates_serialise_for_the_manifest():
    for name, t in TEMPLATES.items():
        data = json.loads(json.dumps(dataclasses.asdict(t)))
        assert data["name"] == name and data["system"] == t.system and data["sep"] == t.sep
        with pytest.raises(dataclasses.FrozenInstanceError):
            t.system = "x"  # type: ignore[misc]


def test_unknown_template():
    with pytest.raises(SaisaError, match="--conv-mode 'alpaca' is unknown"):
        get_template("alpaca")
