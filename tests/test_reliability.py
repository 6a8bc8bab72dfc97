"""Issue 12: every bad config value, weight file and JSON file is refused in one line naming it,
before anything is allocated from it; nothing silently wrong runs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saisa_edge.artifacts import MANIFEST_NAME
from saisa_edge.checkpoint.loader import load_checkpoint, open_checkpoint
from saisa_edge.checkpoint.presets import TOWER_DIR, tiny, write_checkpoint
from saisa_edge.config import parse_config, parse_vision_config
from saisa_edge.errors import SaisaError
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.strict import MAX_JSON_BYTES, read_json


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# --- config.json: strict types and ranges (items 7 and 10) -------------------------------------

_CONFIG_CASES = [
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ({"attention_bias": 1}, "'attention_bias' must be true or false"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number > 0"),
    ({"rms_norm_eps": 0}, "'rms_norm_eps' must be a finite number > 0"),
    ({"rms_norm_eps": 10**400}, "'rms_norm_eps' must be a finite number > 0"),
    ({"rope_theta": 0}, "'rope_theta' must be a finite number > 0"),
    ({"rope_theta": -10000.0}, "'rope_theta' must be a finite number > 0"),
    ({"rope_theta": float("inf")}, "'rope_theta' must be a finite number > 0"),
    ({"hidden_size": 64.5}, "'hidden_size' must be an integer"),
    ({"hidden_size": 64.0}, "'hidden_size' must be an integer"),
    ({"hidden_size": True}, "'hidden_size' must be an integer"),
    ({"num_hidden_layers": 1_000_000}, r"'num_hidden_layers' must be an integer in \[1, 1024\]"),
    ({"vocab_size": 10**30}, "'vocab_size' must be an integer"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be an integer in \\[1,"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be an integer in \\[1, 4\\]"),
    ({"num_key_value_heads": 8}, "'num_key_value_heads' must be an integer in \\[1, 4\\]"),
    ({"head_dim": -16}, "'head_dim' must be an integer"),
    ({"head_dim": 15}, "head dimension 15 is odd"),
    ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4"),
    ({"eos_token_id": "2"}, "'eos_token_id' must be an integer"),
    ({"eos_token_id": [2, 2.5]}, "'eos_token_id' must be an integer"),
    ({"rope_scaling": "linear"}, "'rope_scaling' must be a JSON object"),
    ({"rope_scaling": {"type": "linear"}}, r"rope_scaling \(linear\) lacks factor"),
    ({"rope_scaling": {"type": "linear", "factor": -2.0}}, "'rope_scaling' factor must be a finite number > 0"),
    ({"rope_scaling": {"type": "linear", "factor": "2"}}, "'rope_scaling' factor must be a finite number > 0"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}},
     "high_freq_factor must be greater than low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192.5}},
     "original_max_position_embeddings must be an integer"),
    ({"rope_scaling": {"type": 3, "factor": 2.0}}, "'rope_scaling' type must be a non-empty string"),
    ({"mm_vision_tower": None}, "no mm_vision_tower"),
    ({"mm_vision_tower": 5}, "'mm_vision_tower' must be a non-empty string"),
    ({"mm_hidden_size": 0}, "'mm_hidden_size' must be an integer"),
    ({"mm_vision_select_layer": "-2"}, "'mm_vision_select_layer' must be an integer"),
    ({"mm_use_im_start_end": "no"}, "'mm_use_im_start_end' must be true or false"),
    ({"mm_projector_type": "mlp100000x_gelu"}, "mm_projector_type 'mlp100000x_gelu' is not supported"),
    ({"image_aspect_ratio": ["pad"]}, "'image_aspect_ratio' must be a non-empty string"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' must be an integer"),
]


@pytest.mark.parametrize("change, message", _CONFIG_CASES, ids=[str(c) for c, _ in _CONFIG_CASES])
def test_config_fields_are_strict(change, message):
    raw = dict(tiny().config, **change)
    with pytest.raises(SaisaError, match=message) as e:
        parse_config(raw, "ckpt/config.json")
    assert _one_line(e).startswith("ckpt/config.json: ")


def test_valid_edge_values_still_parse():
    raw = dict(tiny().config, eos_token_id=None, rope_scaling={"rope_type": "default"}, tie_word_embeddings=None)
    cfg = parse_config(raw, "config.json")
    assert cfg.text.eos_token_ids == () and cfg.text.rope_scaling is None and cfg.text.tie_word_embeddings is False
    cfg = parse_config(dict(tiny().config, rope_theta=500000, rms_norm_eps=1e-5), "config.json")
    assert cfg.text.rope_theta == 500000.0 and isinstance(cfg.text.rope_theta, float)


def _clip() -> tuple[dict, dict]:
    folder_cfg = {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 96,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
    pre = {"crop_size": {"height": 56, "width": 56}, "size": {"shortest_edge": 56},
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    return folder_cfg, pre


_VISION_CASES = [
    ({"patch_size": 0}, {}, "'patch_size' must be an integer in \\[1, 56\\]"),
    ({"patch_size": 15}, {}, "image_size=56 must be a multiple of patch_size=15"),
    ({"image_size": "56"}, {}, "'image_size' must be an integer"),
    ({"image_size": 1_000_000}, {}, "'image_size' must be an integer in \\[1, 4096\\]"),
    ({"num_hidden_layers": 10**6}, {}, "'num_hidden_layers' must be an integer in \\[1, 1024\\]"),
    ({"num_attention_heads": 5}, {}, "hidden_size=48 is not a multiple of num_attention_heads=5"),
    ({"num_channels": 4}, {}, "'num_channels' must be an integer in \\[1, 3\\]"),
    ({"layer_norm_eps": -1}, {}, "'layer_norm_eps' must be a finite number > 0"),
    ({"hidden_act": None, "vision_config": 3}, {}, "'vision_config' must be a JSON object"),
    ({}, {"image_mean": [0.5, 0.5]}, "'image_mean' must be a list of 3 numbers"),
    ({}, {"image_mean": [0.5, 0.5, 300]}, "'image_mean' must be a finite number >= 0 and <= 1"),
    ({}, {"image_std": [0.25, 0, 0.25]}, "'image_std' must be a finite number > 0"),
    ({}, {"image_std": "0.25"}, "'image_std' must be a list of 3 numbers"),
    ({}, {"crop_size": 64}, "crop_size 64 but the tower's image_size is 56"),
    ({}, {"crop_size": {"height": 56, "width": 64}}, "'crop_size' is not square"),
    ({}, {"crop_size": {"width": 56}}, "'crop_size' has no 'height'"),
    ({}, {"size": {"height": 56}}, "'size' has no 'shortest_edge'"),
    ({}, {"size": 40}, "'size'\\) 40 is smaller than crop_size 56"),
    ({}, {"size": 0}, "'size' must be an integer in \\[1, 4096\\]"),
]


@pytest.mark.parametrize("change, pre_change, message", _VISION_CASES, ids=[m for *_, m in _VISION_CASES])
def test_vision_config_fields_are_strict(change, pre_change, message):
    cfg, pre = _clip()
    cfg.update(change)
    pre.update(pre_change)
    with pytest.raises(SaisaError, match=message) as e:
        parse_vision_config(cfg, pre, "tower/config.json", "tower/preprocessor_config.json")
    assert _one_line(e).startswith("tower/")


def test_a_million_layers_is_refused_at_once(tmp_path, tiny_dir):
    """Before the bound, the model was built on the meta device a layer at a time: minutes."""
    ck = _user_copy(tiny_dir, tmp_path / "c")
    _edit(ck / "config.json", num_hidden_layers=1_000_000)
    t0 = time.perf_counter()
    with pytest.raises(SaisaError, match="num_hidden_layers"):
        open_checkpoint(ck)
    assert time.perf_counter() - t0 < 30  # a hang detector, not a timing target


def test_layer_count_comes_from_the_weights_before_building(tmp_path, tiny_dir):
    ck = _user_copy(tiny_dir, tmp_path / "c")
    _edit(ck / "config.json", num_hidden_layers=1000)
    with pytest.raises(SaisaError, match="num_hidden_layers is 1000, but the weights hold 2 decoder layers"):
        open_checkpoint(ck)


# --- every JSON file: one bounded reader (item 10) ---------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": ' + b"9" * 5000 + b"}", "not readable JSON \\(Exceeds the limit"),
        (b"[" * 100_000 + b"]" * 100_000, "not readable JSON \\(nested too deeply\\)"),
        (b'{"a": "\xff"}', "not UTF-8 text"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (b'"config"', "expected a JSON object, found str"),
        (b"{", "not readable JSON"),
    ],
)
def test_json_reader_refuses_in_one_line(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(SaisaError, match=message) as e:
        read_json(path)
    assert _one_line(e).startswith(str(path))


def test_json_reader_bounds_the_size_before_reading(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(SaisaError, match="larger than 16 MiB"):
        read_json(path)


@pytest.mark.parametrize("where", ["config.json", f"{TOWER_DIR}/config.json", f"{TOWER_DIR}/preprocessor_config.json"])
def test_deep_or_huge_json_in_a_checkpoint_is_one_line(tmp_path, tiny_dir, where):
    ck = _user_copy(tiny_dir, tmp_path / "c")
    (ck / where).write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SaisaError, match=f"{where}: not readable JSON") as e:
        open_checkpoint(ck)
    _one_line(e)


# --- weights: values, formats, headers (items 7 and 10) ----------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "holds 1 NaN or infinite value"),
        (float("inf"), "holds 1 NaN or infinite value"),
        (torch.int64, "is stored as int64"),
        (torch.bool, "is stored as bool"),
    ],
)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_finite_or_non_float_weights_are_refused(tmp_path, value, message, fmt):
    spec = tiny()
    name = "model.layers.1.mlp.down_proj.weight"
    if isinstance(value, float):
        spec.tensors[name] = spec.tensors[name].clone()
        spec.tensors[name][3, 5] = value
    ck = write_checkpoint(spec, tmp_path / "c", dtype="fp32", fmt=fmt)
    if isinstance(value, torch.dtype):  # written after the fact: the writer casts to the dtype
        (ck / MANIFEST_NAME).unlink()
        weights = ck / f"model.{fmt}" if fmt == "safetensors" else ck / "pytorch_model.bin"
        tensors = {k: v.to(value) if k == name else v for k, v in spec.tensors.items()}
        save_file(tensors, str(weights)) if fmt == "safetensors" else torch.save(tensors, weights)
    with pytest.raises(SaisaError, match=f"{ck}/(model.safetensors|pytorch_model.bin): tensor '{name}' {message}") as e:
        load_checkpoint(ck)
    _one_line(e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 17, 100_003])
def test_weight_check_finds_one_bad_value_anywhere(dtype, size):
    from saisa_edge.checkpoint.tensors import check_weight

    check_weight(torch.zeros(size, dtype=dtype), "t", Path("f"))
    for at in {0, size // 2, size - 1}:
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.randn(size).to(dtype)
            t[at] = bad
            with pytest.raises(SaisaError, match="f: tensor 't' holds 1 NaN or infinite value"):
                check_weight(t, "t", Path("f"))


def test_export_refuses_non_finite_weights(tmp_path):
    spec = tiny()
    spec.vision_tensors["vision_model.pre_layrnorm.weight"] = torch.full_like(
        spec.vision_tensors["vision_model.pre_layrnorm.weight"], float("nan"))
    ck = write_checkpoint(spec, tmp_path / "c", dtype="fp16")
    with pytest.raises(SaisaError, match="pre_layrnorm.weight' holds 48 NaN"):
        export_artifact(open_checkpoint(ck), tmp_path / "out", ExportOptions())
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_is_refused_in_one_line(tmp_path, tiny_dir):
    ck = _user_copy(tiny_dir, tmp_path / "c")
    (ck / "model.safetensors").unlink()
    torch.save({"model.norm.weight": _Evil()}, ck / "pytorch_model.bin")
    with pytest.raises(SaisaError, match="pytorch_model.bin: not a safe weights file \\(its pickle asks for "
                                         "posix.system\\).*convert it to safetensors") as e:
        open_checkpoint(ck)
    assert "weights_only" not in _one_line(e) and not (tmp_path / "pwned.txt").exists()


def test_legacy_bin_format_loads_safely(tmp_path):
    spec = tiny()
    ck = write_checkpoint(spec, tmp_path / "c", dtype="fp32", fmt="bin")
    (ck / MANIFEST_NAME).unlink()
    torch.save(spec.tensors, ck / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    legacy = load_checkpoint(ck)
    for name, want in spec.tensors.items():
        torch.testing.assert_close(legacy.lm.state_dict()[name], want, atol=0, rtol=0)


def test_a_pickle_that_is_not_a_state_dict(tmp_path, tiny_dir):
    ck = _user_copy(tiny_dir, tmp_path / "c")
    (ck / "model.safetensors").unlink()
    torch.save({"model.norm.weight": [1.0, 2.0]}, ck / "pytorch_model.bin")
    with pytest.raises(SaisaError, match="pytorch_model.bin: not a state dict") as e:
        open_checkpoint(ck)
    _one_line(e)
    with open(ck / "pytorch_model.bin", "wb") as f:  # a bare pickle, not torch's format
        pickle.dump({"model.norm.weight": [1.0, 2.0]}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the pickle protocol is not shown either
        with pytest.raises(SaisaError, match="pytorch_model.bin: not a safe weights file") as e:
            open_checkpoint(ck)
    _one_line(e)


def test_shape_is_checked_from_the_header_before_reading(tmp_path, monkeypatch):
    from saisa_edge.checkpoint import tensors

    ck = write_checkpoint(tiny(), tmp_path / "c", dtype="fp32")
    source = open_checkpoint(ck)
    monkeypatch.setattr(tensors, "check_weight", lambda *a: pytest.fail("tensor data was read"))
    with pytest.raises(SaisaError, match=r"has shape \(64,\), but config.json implies \(65,\)"):
        source.tensor("model.norm.weight", (65,))


@pytest.mark.parametrize(
    "header",
    [struct.pack("<Q", 1 << 40), struct.pack("<Q", 60) + b"[" * 60,
     struct.pack("<Q", 80) + b'{"t": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 4]}}  ']
)
def test_safetensors_header_is_bounded_by_the_file(tmp_path, tiny_dir, header):
    """A header claiming a terabyte, nesting deeply, or a tensor larger than its bytes: one line."""
    ck = _user_copy(tiny_dir, tmp_path / "c")
    (ck / "model.safetensors").write_bytes(header)
    with pytest.raises(SaisaError, match="model.safetensors: truncated or corrupt weight file") as e:
        open_checkpoint(ck)
    _one_line(e)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd.safetensors", "model.py", 5])
def test_weight_index_names_files_in_the_folder_only(tmp_path, tiny_dir, shard):
    ck = _user_copy(tiny_dir, tmp_path / "c")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(SaisaError, match="not a valid weight index"):
        open_checkpoint(ck)


# --- the checkpoint manifest: checked once per load (item 7) -----------------------------------


def test_manifest_checksums_are_enforced(tmp_path, tiny_dir):
    ck = tmp_path / "c"
    shutil.copytree(tiny_dir, ck)
    ckpt = load_checkpoint(ck)
    assert ckpt.content_digest and len(ckpt.content_digest) == 64
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # same size, same header: only the checksum can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(SaisaError, match="model.safetensors: does not match its checksum .*delete "
                                         "saisa-edge-manifest.json to run the folder as your own") as e:
        load_checkpoint(ck)
    _one_line(e)
    (ck / MANIFEST_NAME).unlink()
    assert load_checkpoint(ck).content_digest is None  # user-brought: accepted


def test_manifest_covers_every_file(tmp_path, tiny_dir):
    ck = tmp_path / "c"
    shutil.copytree(tiny_dir, ck)
    (ck / TOWER_DIR / "extra.safetensors").write_bytes(b"")
    with pytest.raises(SaisaError, match="extra.safetensors: not covered by saisa-edge-manifest.json's checksums"):
        open_checkpoint(ck)


@pytest.mark.parametrize("entry", [{"sha256": "0" * 64, "bytes": "1"}, {"sha256": "x", "bytes": 1}, "abc"])
def test_malformed_manifest_entries(tmp_path, tiny_dir, entry):
    ck = tmp_path / "c"
    shutil.copytree(tiny_dir, ck)
    manifest = json.loads((ck / MANIFEST_NAME).read_text())
    manifest["files"]["config.json"] = entry
    (ck / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SaisaError, match=r"files\['config.json'\] is not \{sha256: 64 hex digits, bytes: a size\}"):
        open_checkpoint(ck)


def test_manifest_paths_stay_inside(tmp_path, tiny_dir):
    ck = tmp_path / "c"
    shutil.copytree(tiny_dir, ck)
    manifest = json.loads((ck / MANIFEST_NAME).read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 0}
    (tmp_path / "outside.txt").write_text("")
    (ck / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SaisaError, match="'../outside.txt' leaves the folder .*every path must stay inside it"):
        open_checkpoint(ck)


def test_manifest_is_hashed_once_per_load(tmp_path, tiny_dir, monkeypatch):
    from saisa_edge.artifacts import manifest

    seen: list[Path] = []

    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda p: seen.append(p) or real(p))
    load_checkpoint(tiny_dir)
    assert len(seen) == len(set(seen)) == len(json.loads((tiny_dir / MANIFEST_NAME).read_text())["files"])


# --- helpers -------------------------------------------------------------------------------------


def _user_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / MANIFEST_NAME).unlink()
    return dst


def _edit(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
