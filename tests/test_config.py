"""config.json parsing: what changes the maths is read, what cannot be honoured is refused."""

from __future__ import annotations

import pytest

from saisa_edge.checkpoint.presets import tiny
from saisa_edge.config import parse_config
from saisa_edge.errors import SaisaError


@pytest.fixture
def raw():
    return dict(tiny().config)


def test_parses_tiny(raw):
    cfg = parse_config(raw, "config.json")
    assert cfg.text.num_hidden_layers == 2 and cfg.text.head_dim == 16
    assert cfg.mm.projector_depth == 2 and cfg.mm.select_layer == -2


def test_llama3_fields(raw):
    raw.update(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        eos_token_id=[128001, 128009], rope_theta=500000.0,
    )
    cfg = parse_config(raw, "config.json")
    assert cfg.text.rope_scaling.kind == "llama3" and cfg.text.eos_token_ids == (128001, 128009)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mm_projector_type": "qformer"}, "mm_projector_type 'qformer' is not supported"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "anyres.*not supported yet"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres' is not supported yet"),
        ({"model_type": "llama"}, "expected 'llava_llama'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature 'cls'"),
        ({"my_new_field": 1}, "unknown config field.*my_new_field"),
        ({"hidden_size": "wide"}, "field 'hidden_size' must be an integer in \\[1, 262144\\], got 'wide'"),
    ],
)
def test_refused(raw, change, message):
    raw.update(change)
    with pytest.raises(SaisaError, match=message):
        parse_config(raw, "config.json")


def test_missing_required(raw):
    del raw["hidden_size"]
    with pytest.raises(SaisaError, match="config.json: required field 'hidden_size' is missing"):
        parse_config(raw, "config.json")
