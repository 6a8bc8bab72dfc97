"""The PyTorch reference: `split` equals the public code's `original` formulation,
the text path equals transformers' LLaMA and the vision path transformers' CLIP."""

from __future__ import annotations

import pytest
import torch

from saisa_edge import IMAGE_TOKEN_INDEX
from saisa_edge.config import RopeScaling, SaisaConfig
from saisa_edge.inputs.conversation import TEMPLATES
from saisa_edge.inputs.image import load_image, preprocess
from saisa_edge.model import original, split
from saisa_edge.model.llama import SaisaLM
from tests.conftest import DEMO_IMAGE

TOL = dict(atol=2e-5, rtol=1e-5)


def features_of(ckpt, seed: int = 0) -> torch.Tensor:
    """Selected CLIP features of the demo image, or of random pixels for another seed."""
    if seed == 0:
        pixels = preprocess(load_image(DEMO_IMAGE), ckpt.config.vision)
    else:
        pixels = torch.randn(3, ckpt.config.vision.crop_size, ckpt.config.vision.crop_size,
                             generator=torch.Generator().manual_seed(seed))
    return ckpt.vision(pixels[None])


def split_prefill(lm, ids, feats, cache=None, visual=None, next_pos=0):
    """Prefill `ids` (may hold the image marker) on top of `cache`; returns logits, cache, visual, positions."""
    n_visual = feats.shape[1] if feats is not None else 0
    text, positions, start = split.text_layout(ids, n_visual)
    positions = [p + next_pos for p in positions]
    if feats is not None and visual is None:
        visual = split.visual_kv(lm, feats, start + next_pos)
    cache = cache if cache is not None else split.TextCache.empty(lm, 1)
    logits, cache = split.forward_text(lm, torch.tensor([text]), torch.tensor([positions]), cache, visual)
    return logits[0], cache, visual, positions


def prompt_ids(ckpt, system: str, question: str) -> list[int]:
    t = TEMPLATES["vicuna_v1"]
    t = type(t)(t.name, system, t.roles, t.style, t.sep, t.sep2)
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
    ids = prompt_ids(ckpt, system, question)
    feats = features_of(ckpt)
    want = original.forward(ckpt.lm, ids, feats[0])
    got, *_ = split_prefill(ckpt.lm, ids, feats)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)


def test_split_equals_original_without_image(ckpt):
    ids = prompt_ids(ckpt, "Short.", "What is shown?")
    want = original.forward(ckpt.lm, ids, None)
    got, *_ = split_prefill(ckpt.lm, ids, None)
    torch.testing.assert_close(got, want, **TOL)


def test_text_before_image_never_sees_it(tiny_ckpt):
    ids = prompt_ids(tiny_ckpt, TEMPLATES["vicuna_v1"].system, "<image>\nWhat is it?")
    cut = ids.index(IMAGE_TOKEN_INDEX)
    with_a = original.forward(tiny_ckpt.lm, ids, features_of(tiny_ckpt, 0)[0])
    with_b = original.forward(tiny_ckpt.lm, ids, features_of(tiny_ckpt, 7)[0])
    torch.testing.assert_close(with_a[:cut], with_b[:cut], atol=0, rtol=0)
    assert not torch.allclose(with_a[cut:], with_b[cut:])  # the image does reach text after it


def test_multi_turn_split_equals_original(ckpt):
    """Three turns: the text cache and the visual K/V carry over; original recomputes it all."""
    tok = ckpt.tokenizer
    t = TEMPLATES["vicuna_v1"]
    feats = features_of(ckpt)
    turns: list[tuple[str, str | None]] = []
    cache = visual = None
    consumed: list[int] = []  # prompt ids already in the split cache
    next_pos = 0
    for question, answer in [("<image>\nWhat is shown?", "A red house."), ("And the sky?", "Blue."), ("Sun?", None)]:
        turns.append((question, None))
        ids = tok.encode(t.prompt(turns))
        assert ids[: len(consumed)] == consumed, "a later turn's prompt extends the earlier one"
        new = ids[len(consumed):]
        logits, cache, visual, positions = split_prefill(
            ckpt.lm, new, feats if IMAGE_TOKEN_INDEX in new else None, cache, visual, next_pos
        )
        want = original.forward(ckpt.lm, ids, feats[0])
        torch.testing.assert_close(logits, want[-len(logits):], **TOL)
        next_pos = positions[-1] + 1
        consumed = ids
        if answer is not None:
            turns[-1] = (question, answer)
    assert visual is not None and cache.length == next_pos - visual.length


def test_greedy_32_tokens_identical(ckpt):
    ids = prompt_ids(ckpt, TEMPLATES["vicuna_v1"].system, "<image>\nWhat is shown in this image?")
    feats = features_of(ckpt)
    logits, cache, visual, positions = split_prefill(ckpt.lm, ids, feats)
    split_tokens, pos = [], positions[-1] + 1
    for _ in range(32):
        tok = int(logits[-1].argmax())
        split_tokens.append(tok)
        out, cache = split.forward_text(ckpt.lm, torch.tensor([[tok]]), torch.tensor([[pos]]), cache, visual)
        logits, pos = out[0], pos + 1
    orig_tokens, seq = [], list(ids)
    for _ in range(32):
        tok = int(original.forward(ckpt.lm, seq, feats[0])[-1].argmax())
        orig_tokens.append(tok)
        seq.append(tok)
    assert split_tokens == orig_tokens
    assert len(set(split_tokens)) > 3  # a degenerate model would make this test vacuous


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
    assert visual.keys.shape[1] == 1
    both, _ = split.forward_text(
        lm, torch.tensor([text_a, text_b]), torch.tensor([pos, pos]), split.TextCache.empty(lm, 2), visual
    )
    alone, *_ = split_prefill(lm, b, feats)
    torch.testing.assert_close(both[1], alone, **TOL)


# --- against transformers -------------------------------------------------------------


def hf_llama(lm: SaisaLM):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = lm.config.text
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    cfg = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps, rope_parameters=rope, tie_word_embeddings=t.tie_word_embeddings,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in lm.state_dict().items() if "mm_projector" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 2.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)])
def test_text_path_equals_transformers_llama(ckpt, scaling):
    cfg = SaisaConfig(
        text=type(ckpt.config.text)(**{**ckpt.config.text.__dict__, "rope_scaling": scaling}),
        mm=ckpt.config.mm, vision=ckpt.config.vision,
    )
    lm = SaisaLM(cfg)
    lm.load_state_dict(ckpt.lm.state_dict())
    ids = prompt_ids(ckpt, TEMPLATES["vicuna_v1"].system, "What is shown in this picture? " * 12)
    assert len(ids) > 64  # past llama3's original context, so its scaling bands all matter
    with torch.no_grad():
        want = hf_llama(lm)(torch.tensor([ids])).logits[0]
    got, *_ = split_prefill(lm, ids, None)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("select_layer, feature", [(-2, "patch"), (-1, "cls_patch"), (1, "patch")])
def test_vision_path_equals_transformers_clip(tiny_ckpt, select_layer, feature):
    from transformers import CLIPVisionModel

    from saisa_edge.checkpoint.loader import _fill
    from saisa_edge.checkpoint.tensors import TensorFiles
    from saisa_edge.model.clip import ClipVisionTower

    hf = CLIPVisionModel.from_pretrained(str(tiny_ckpt.vision_tower_path), attn_implementation="eager").eval()
    mm = type(tiny_ckpt.config.mm)(**{**tiny_ckpt.config.mm.__dict__, "select_layer": select_layer,
                                       "select_feature": feature})
    cfg = SaisaConfig(tiny_ckpt.config.text, mm, tiny_ckpt.config.vision)
    with torch.device("meta"):
        tower = ClipVisionTower(cfg)
    _fill(tower, TensorFiles.open(tiny_ckpt.vision_tower_path), "", torch.float32, {})
    pixels = preprocess(load_image(DEMO_IMAGE), cfg.vision)[None]
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
        got = tower(pixels)
    want = hidden if feature == "cls_patch" else hidden[:, 1:]
    assert got.shape == (1, cfg.num_visual_tokens, cfg.vision.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _Fixed(torch.nn.Module):
    """A projector that ignores the image and returns given hidden states."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.hidden[0].expand(*features.shape[:-1], -1)


def check_text_as_image(lm: SaisaLM, before: list[int], passage: list[int], after: list[int], atol: float):
    """Feed each layer, as its "image", the hidden states LLaMA computes for an inline passage.

    The visual K/V are then exactly LLaMA's K/V for that passage, so SAISA's logits at
    the text positions must equal LLaMA's on the sequence with the passage inline: an
    end-to-end check of positions, RoPE offsets and masking against transformers.
    """
    import copy

    hf = hf_llama(lm)
    seq = torch.tensor([before + passage + after])
    with torch.no_grad():
        out = hf(seq, output_hidden_states=True)
    span = slice(len(before), len(before) + len(passage))
    lm = copy.deepcopy(lm)
    for layer, hidden in zip(lm.model.layers, out.hidden_states):
        layer.mm_projector = _Fixed(hidden[:, span])
    ids = before + [IMAGE_TOKEN_INDEX] + after
    feats = torch.zeros(1, len(passage), lm.config.mm.mm_hidden_size)
    got, *_ = split_prefill(lm, ids, feats)
    text_rows = [i for i in range(seq.shape[1]) if not span.start <= i < span.stop]
    torch.testing.assert_close(got, out.logits[0, text_rows], atol=atol, rtol=1e-4)
    orig = original.forward(lm, ids, feats[0])
    torch.testing.assert_close(orig, out.logits[0, text_rows], atol=atol, rtol=1e-4)


def test_text_as_image_equals_transformers_llama(ckpt):
    t = TEMPLATES["vicuna_v1"]
    before, after = t.prompt([("<image>\nWhat does the passage say?", None)]).split("<image>")
    tok = ckpt.tokenizer.hf
    passage = tok("The quick brown fox jumps over the lazy dog.").input_ids[1:]
    check_text_as_image(ckpt.lm, tok(before).input_ids, passage, tok(after).input_ids[1:], atol=5e-5)
