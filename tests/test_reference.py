"""The PyTorch reference: `split` equals the public code's `original` formulation,
the text path equals transformers' LLaMA and the vision path transformers' CLIP."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.checkpoint.loader import load_weights, open_checkpoint
from saisa_edge.config import RopeScaling
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.model import original, split
from saisa_edge.model.clip import ClipVisionTower
from saisa_edge.model.equivalence import (
    greedy, split_prefill, split_vs_original, text_as_image_vs_transformers, text_vs_transformers,
    vision_vs_transformers,
)
from saisa_edge.model.llama import SaisaLM
from tests.conftest import DEMO_IMAGE

TOL = dict(atol=2e-5, rtol=1e-5)
FP32_BOUND = 2e-5  # logits are O(1); fp32 reassociation noise is ~1e-6


def features_of(ckpt, seed: int = 0) -> torch.Tensor:
    """Selected CLIP features [1, N_v, mm] of the demo image, or of random pixels for another seed."""
    if seed == 0:
        pixels = torch.from_numpy(preprocess(load_image(DEMO_IMAGE), ckpt.config.vision))
    else:
        pixels = torch.randn(3, ckpt.config.vision.crop_size, ckpt.config.vision.crop_size,
                             generator=torch.Generator().manual_seed(seed))
    return ckpt.vision(pixels[None])


def prompt_ids(ckpt, system: str, question: str) -> list[int]:
    t = dataclasses.replace(TEMPLATES["vicuna_v1"], system=system)
    return ckpt.tokenizer.encode(t.prompt([(question, None)]))


@pytest.mark.parametrize(
    "system, question",
    [
        (TEMPLATES["vicuna_v1"].system, "<image>\nWhat is shown in this image?"),
        ("", "<image>\nWhat is shown?"),  # image right after BOS + role
        ("A much longer system prompt that pushes the image further to the right. " * 3, "<image>\nDescribe it."),
        ("Short.", "What colour is the car in <image> and is it day or night?"),  # text on both sides
        ("Short.", "Describe the picture in detail.<image>"),  # image last: nothing after sees it
    ],
)
def test_split_equals_original_prefill(ckpt, system, question):
    assert split_vs_original(ckpt.lm, prompt_ids(ckpt, system, question), features_of(ckpt)) < FP32_BOUND


def test_split_equals_original_without_image(ckpt):
    assert split_vs_original(ckpt.lm, prompt_ids(ckpt, "Short.", "What is shown?"), None) < FP32_BOUND


def test_text_before_image_never_sees_it(tiny_ckpt):
    ids = prompt_ids(tiny_ckpt, TEMPLATES["vicuna_v1"].system, "<image>\nWhat is it?")
    cut = ids.index(IMAGE_TOKEN_INDEX)
    with_a = original.forward(tiny_ckpt.lm, ids, features_of(tiny_ckpt, 0)[0])
    with_b = original.forward(tiny_ckpt.lm, ids, features_of(tiny_ckpt, 7)[0])
    torch.testing.assert_close(with_a[:cut], with_b[:cut], atol=0, rtol=0)
    assert not torch.allclose(with_a[cut:], with_b[cut:])  # the image does reach text after it


def test_multi_turn_split_equals_original(ckpt):
    """Three turns: the text cache and the visual K/V carry over; original recomputes it all."""
    t = TEMPLATES["vicuna_v1"]
    feats = features_of(ckpt)
    turns: list[tuple[str, str | None]] = []
    cache = visual = None
    consumed: list[int] = []  # prompt ids already in the split cache
    offset = 0
    for question, answer in [("<image>\nWhat is shown?", "A red house."), ("And the sky?", "Blue."), ("Sun?", None)]:
        turns.append((question, None))
        ids = ckpt.tokenizer.encode(t.prompt(turns))
        assert ids[: len(consumed)] == consumed, "a later turn's prompt extends the earlier one"
        new = ids[len(consumed):]
        logits, cache, visual, positions = split_prefill(
            ckpt.lm, new, feats if IMAGE_TOKEN_INDEX in new else None, cache, visual, offset
        )
        want = original.forward(ckpt.lm, ids, feats[0])
        torch.testing.assert_close(logits, want[-len(logits):], **TOL)
        offset = positions[-1] + 1
        consumed = ids
        if answer is not None:
            turns[-1] = (question, answer)
    assert visual is not None and cache.length == offset - visual.length


def test_greedy_32_tokens_identical(ckpt):
    ids = prompt_ids(ckpt, TEMPLATES["vicuna_v1"].system, "<image>\nWhat is shown in this image?")
    ours, theirs = greedy(ckpt.lm, ids, features_of(ckpt), 32)
    assert ours == theirs
    assert len(set(ours)) > 3  # a degenerate model would make this test vacuous


def test_batch_shares_one_image(tiny_ckpt):
    """Two requests about one image: one visual K/V broadcast, same logits as alone."""
    lm = tiny_ckpt.lm
    feats = features_of(tiny_ckpt)
    a = prompt_ids(tiny_ckpt, "Short.", "<image>\nWhat is shown?")
    b = prompt_ids(tiny_ckpt, "Short.", "<image>\nIs it day or night?")
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    assert a != b
    text_a, pos, start = split.text_layout(a, feats.shape[1])
    text_b, _, _ = split.text_layout(b, feats.shape[1])
    visual = split.visual_kv(lm, feats, start)
    assert visual.keys[0].shape[0] == 1
    both, _ = split.forward_text(
        lm, torch.tensor([text_a, text_b]), torch.tensor([pos, pos]), split.TextCache.empty(lm.config.text, 2, torch.float32), visual
    )
    alone, *_ = split_prefill(lm, b, feats)
    torch.testing.assert_close(both[1], alone, **TOL)


# --- against transformers -------------------------------------------------------------


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 2.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)])
def test_text_path_equals_transformers_llama(ckpt, scaling):
    cfg = dataclasses.replace(ckpt.config, text=dataclasses.replace(ckpt.config.text, rope_scaling=scaling))
    lm = SaisaLM(cfg)
    lm.load_state_dict(ckpt.lm.state_dict())
    ids = prompt_ids(ckpt, TEMPLATES["vicuna_v1"].system, "What is shown in this picture? " * 12)
    assert len(ids) > 64  # past llama3's original context, so its scaling bands all matter
    assert text_vs_transformers(lm, ids) < 5e-5


@pytest.mark.parametrize("select_layer, feature", [(-2, "patch"), (-1, "cls_patch"), (1, "patch")])
def test_vision_path_equals_transformers_clip(tiny_ckpt, select_layer, feature):
    mm = dataclasses.replace(tiny_ckpt.config.mm, select_layer=select_layer, select_feature=feature)
    cfg = dataclasses.replace(tiny_ckpt.config, mm=mm)
    with torch.device("meta"):
        tower = ClipVisionTower(cfg)
    load_weights(tower, open_checkpoint(tiny_ckpt.path), torch.float32)
    pixels = torch.from_numpy(preprocess(load_image(DEMO_IMAGE), cfg.vision))[None]
    assert tower(pixels).shape == (1, cfg.num_visual_tokens, cfg.vision.hidden_size)
    assert vision_vs_transformers(tower, tiny_ckpt.vision_tower_path, cfg, pixels) < 1e-5


def test_text_as_image_equals_transformers_llama(ckpt):
    before, after = TEMPLATES["vicuna_v1"].prompt([("<image>\nWhat does the passage say?", None)]).split("<image>")
    tok = ckpt.tokenizer.tokenize
    passage = tok("The quick brown fox jumps over the lazy dog.")[1:]
    errors = text_as_image_vs_transformers(ckpt.lm, tok(before), passage, tok(after)[1:])
    assert max(errors.values()) < 5e-5, errors
