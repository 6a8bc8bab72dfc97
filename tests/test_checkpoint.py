"""Checkpoint folders: every on-disk form loads to the same model, every broken one is refused
with a message naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saisa_edge.artifacts import MANIFEST_NAME, atomic_folder, sha256_file
from saisa_edge.checkpoint.loader import load_checkpoint
from saisa_edge.checkpoint.presets import TOWER_DIR, tiny, write_checkpoint
from saisa_edge.model.dtypes import TORCH_DTYPES as DTYPES
from saisa_edge.errors import SaisaError


@pytest.fixture(scope="module")
def spec():
    return tiny()


@pytest.mark.parametrize(
    "dtype, fmt, shard_mb",
    [("fp32", "safetensors", 0.2), ("fp16", "safetensors", 0), ("bf16", "bin", 0), ("fp16", "bin", 0.2)],
)
def test_every_form_loads_the_same_weights(tmp_path, spec, dtype, fmt, shard_mb):
    out = write_checkpoint(spec, tmp_path / "c", dtype=dtype, fmt=fmt, shard_mb=shard_mb)
    index = list(out.glob("*.index.json"))
    assert bool(index) == (shard_mb > 0)
    if index:
        assert len(set(json.loads(index[0].read_text())["weight_map"].values())) > 1
    ckpt = load_checkpoint(out)
    torch_dtype = DTYPES[dtype]
    for name, want in spec.tensors.items():
        got = ckpt.lm.state_dict()[name]
        assert got.dtype == torch.float32  # computed in fp32 whatever the disk holds
        torch.testing.assert_close(got, want.to(torch_dtype).float(), atol=0, rtol=0)


def test_each_weight_file_is_opened_at_most_twice(tmp_path, spec, monkeypatch):
    """Once to list its names, once for all its tensors' shapes and data: not once per tensor."""
    from saisa_edge.checkpoint import tensors

    out = write_checkpoint(spec, tmp_path / "c", dtype="fp32", fmt="safetensors", shard_mb=0.2)
    opened: list[str] = []
    real = tensors.safe_open
    monkeypatch.setattr(tensors, "safe_open", lambda path, **k: opened.append(path) or real(path, **k))
    load_checkpoint(out)
    files = set(opened)
    assert len(files) > 1 and all(opened.count(f) <= 2 for f in files), opened


def test_compute_dtype(tiny_dir):
    ckpt = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    assert ckpt.dtype == torch.bfloat16 and ckpt.vision.vision_model.pre_layrnorm.weight.dtype == torch.bfloat16


def test_tied_embeddings(tmp_path):
    out = write_checkpoint(tiny(tie_word_embeddings=True), tmp_path / "t", dtype="fp32")
    ckpt = load_checkpoint(out)
    assert ckpt.lm.lm_head.weight.data_ptr() == ckpt.lm.model.embed_tokens.weight.data_ptr()


def test_manifest_checksums(tiny_dir):
    manifest = json.loads((tiny_dir / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "checkpoint" and manifest["details"]["preset"] == "tiny"
    assert "torch" in manifest["libraries"] and manifest["saisa_edge_version"]
    files = {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tiny_dir / name)


def test_only_used_vision_layers_are_loaded(tiny_ckpt):
    cfg = tiny_ckpt.config
    assert len(tiny_ckpt.vision.vision_model.encoder.layers) == cfg.vision.num_hidden_layers - 1


# --- vision tower resolution -------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    """A copy without the manifest: a checkpoint the user brought, free to be edited."""
    shutil.copytree(src, dst)
    (dst / MANIFEST_NAME).unlink(missing_ok=True)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_tower_from_flag_and_absolute_path(tmp_path, tiny_dir):
    ck = _copy(tiny_dir, tmp_path / "c")
    tower = ck / TOWER_DIR
    moved = tower.rename(tmp_path / "elsewhere")
    with pytest.raises(SaisaError, match="--vision-tower"):
        load_checkpoint(ck)
    assert load_checkpoint(ck, vision_tower=moved).vision_tower_path == moved
    _edit_config(ck, mm_vision_tower=str(moved))
    assert load_checkpoint(ck).vision_tower_path == moved


def test_hub_id_asks_for_vision_tower_flag(tmp_path, tiny_dir):
    ck = _copy(tiny_dir, tmp_path / "c")
    _edit_config(ck, mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(SaisaError, match=r"openai/clip-vit-large-patch14-336.*pass --vision-tower"):
        load_checkpoint(ck)


def test_vision_flag_must_be_a_clip_folder(tmp_path, tiny_dir):
    with pytest.raises(SaisaError, match="--vision-tower .*no config.json"):
        load_checkpoint(tiny_dir, vision_tower=tmp_path)


def test_tower_hidden_size_must_match_projectors(tmp_path, tiny_dir):
    ck = _copy(tiny_dir, tmp_path / "c")
    _edit_config(ck / TOWER_DIR, hidden_size=40)
    with pytest.raises(SaisaError, match="hidden size 40 does not match .*mm_hidden_size 48"):
        load_checkpoint(ck)


# --- broken weights ----------------------------------------------------------------------


def _sharded(tmp_path, spec) -> Path:
    return write_checkpoint(spec, tmp_path / "s", dtype="fp32", shard_mb=0.2)


def test_missing_shard(tmp_path, spec):
    ck = _sharded(tmp_path, spec)
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(SaisaError, match=f"lists shard {shard.name}, which is missing"):
        load_checkpoint(ck)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_weights(tmp_path, spec, fmt):
    ck = write_checkpoint(spec, tmp_path / "c", dtype="fp32", fmt=fmt)
    weights = next(ck.glob(f"*.{fmt}"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaisaError, match=f"{weights.name}: truncated or corrupt"):
        load_checkpoint(ck)


def test_no_weights(tmp_path, tiny_dir):
    ck = _copy(tiny_dir, tmp_path / "c")
    (ck / "model.safetensors").unlink()
    with pytest.raises(SaisaError, match="no weights found"):
        load_checkpoint(ck)


def test_wrong_shape(tmp_path, spec):
    bad = tiny()
    bad.tensors["model.layers.1.mm_projector.2.weight"] = torch.zeros(64, 63)
    ck = write_checkpoint(bad, tmp_path / "c", dtype="fp32")
    with pytest.raises(SaisaError, match=r"model.layers.1.mm_projector.2.weight' has shape \(64, 63\).*\(64, 64\)"):
        load_checkpoint(ck)


def test_missing_tensor(tmp_path):
    bad = tiny()
    del bad.tensors["model.layers.0.self_attn.k_proj.weight"]
    ck = write_checkpoint(bad, tmp_path / "c", dtype="fp32")
    with pytest.raises(SaisaError, match="k_proj.weight' is missing"):
        load_checkpoint(ck)


def test_unexpected_tensor_but_known_extras_pass(tmp_path):
    extra = tiny()
    extra.tensors["model.mm_projector.0.weight"] = torch.zeros(64, 48)  # the unused global projector
    extra.tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    load_checkpoint(write_checkpoint(extra, tmp_path / "ok", dtype="fp32"))
    extra.tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(160, 64)
    with pytest.raises(SaisaError, match="num_hidden_layers is 2, but the weights hold 3 decoder layers"):
        load_checkpoint(write_checkpoint(extra, tmp_path / "bad", dtype="fp32"))


def test_missing_tokenizer(tmp_path, tiny_dir):
    ck = _copy(tiny_dir, tmp_path / "c")
    (ck / "tokenizer.model").unlink()
    with pytest.raises(SaisaError, match="no tokenizer"):
        load_checkpoint(ck)


def test_not_a_folder(tmp_path):
    with pytest.raises(SaisaError, match="not a folder"):
        load_checkpoint(tmp_path / "nope")


# --- atomic writes -----------------------------------------------------------------------


def test_refuses_existing_folder_and_leaves_nothing_on_failure(tmp_path, spec):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SaisaError, match="already exists; pass --force"):
        write_checkpoint(spec, out, dtype="fp32")
    with pytest.raises(SaisaError, match="not an earlier output"):  # --force replaces only our own outputs
        write_checkpoint(spec, out, dtype="fp32", force=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    write_checkpoint(spec, out, dtype="fp32")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, force=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed midway")
    assert (out / "config.json").exists() and not (out / "half.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    write_checkpoint(spec, out, dtype="fp16", force=True)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_tower_as_full_clip_model_folder(tmp_path, tiny_dir, tiny_ckpt):
    """A whole `CLIPModel` folder (text tower too, vision fields nested) works as the vision tower."""
    from safetensors.torch import load_file, save_file

    tower = _copy(tiny_dir / TOWER_DIR, tmp_path / "clip")
    vision = json.loads((tower / "config.json").read_text())
    full = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 768,
            "text_config": {"hidden_size": 32}, "vision_config": vision}
    (tower / "config.json").write_text(json.dumps(full))
    weights = load_file(tower / "model.safetensors")
    weights.update({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 32),
                    "logit_scale": torch.zeros(()), "visual_projection.weight": torch.zeros(768, 48)})
    save_file(weights, tower / "model.safetensors")
    ckpt = load_checkpoint(tiny_dir, vision_tower=tower)
    assert ckpt.config.vision == tiny_ckpt.config.vision
    pixels = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(ckpt.vision(pixels), tiny_ckpt.vision(pixels), atol=0, rtol=0)


def test_missing_clip_fields_mean_transformers_defaults():
    from saisa_edge.config import parse_vision_config

    cfg = parse_vision_config({"model_type": "clip_vision_model", "hidden_size": 1024, "num_attention_heads": 16},
                              None, "config.json")
    assert (cfg.image_size, cfg.patch_size, cfg.num_hidden_layers, cfg.crop_size) == (224, 32, 12, 224)
