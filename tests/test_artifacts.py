"""The artifact-format layer: manifests checked once per open, paths kept inside their folder,
--force limited to a command's own earlier outputs, killed replacements recovered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from saisa_edge import artifacts
from saisa_edge.artifacts import (
    ARTIFACT_KIND, ENGINE_KIND, MANIFEST_NAME, EngineManifest, atomic_folder, open_artifact, open_engines,
    open_folder, write_manifest,
)
from saisa_edge.artifacts import manifest as manifest_module
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.cli import main
from saisa_edge.errors import SaisaError
from saisa_edge.export.artifact import ExportOptions, copy_tokenizer, export_artifact

RUN = ["--prompt", "What is shown?", "--max-new-tokens", "3", "--json"]


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("art") / "art"
    export_artifact(open_checkpoint(tiny_dir), out, ExportOptions())
    return out


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit(folder: Path, change) -> None:
    m = json.loads((folder / MANIFEST_NAME).read_text())
    change(m)
    (folder / MANIFEST_NAME).write_text(json.dumps(m))


def one_line_error(args: list[str], *expected: str) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.output
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_engines(art_path: Path, out: Path, **changes) -> Path:
    """An engine folder as `build` writes it, with placeholder engine files (TensorRT is not here)."""
    a = open_artifact(art_path)
    out.mkdir()
    for name in artifacts.names.GRAPHS:
        (out / f"{name}.engine").write_bytes(name.encode())
    copy_tokenizer(art_path, out)
    m = EngineManifest("10.16.0", (8, 7), "orin-agx", a.precision, "plugin", "1", 1, a.max_context,
                       {"vision": ["vision"]},
                       {"path": str(a.path), "manifest_sha256": a.manifest_sha256,
                        **{k: a.details[k] for k in ("config", "dtype", "conv_mode", "source", "max_context")},
                        "quantization": None})
    details = {**m.as_json(), **changes}
    write_manifest(out, ENGINE_KIND, details)
    return out


# --- item 1: every path stays inside the folder and is checksummed ----------------------------------


def test_a_graph_file_outside_the_folder_is_refused(art, tmp_path):
    other = copy(art, tmp_path / "other")
    for name, where in [("../../other/visual_kv.onnx", "not among the manifest's checksummed files"),
                        (str(other / "visual_kv.onnx"), "not among the manifest's checksummed files")]:
        c = copy(art, tmp_path / "c" / "art")
        edit(c, lambda m: m["details"]["graphs"]["visual_kv"].update(file=name))
        with pytest.raises(SaisaError, match=where):
            open_artifact(c)
        one_line_error(["run", str(c)] + RUN, "visual_kv")
        # listing the outside file in the checksums too does not help
        entry = json.loads((c / MANIFEST_NAME).read_text())["files"]["visual_kv.onnx"]
        edit(c, lambda m: m["files"].update({name: entry}))
        with pytest.raises(SaisaError, match="leaves the folder"):
            open_artifact(c)
        shutil.rmtree(tmp_path / "c")


def test_a_symlink_out_of_the_folder_is_refused(art, tmp_path):
    outside = copy(art, tmp_path / "outside")
    c = copy(art, tmp_path / "c")
    (c / "visual_kv.onnx").unlink()
    (c / "visual_kv.onnx").symlink_to(outside / "visual_kv.onnx")  # same bytes, same checksum
    with pytest.raises(SaisaError, match="is a link to .* outside the folder"):
        open_artifact(c)
    one_line_error(["run", str(c)] + RUN, "outside the folder")


def test_a_file_not_covered_by_the_checksums_is_refused(art, tmp_path):
    c = copy(art, tmp_path / "c")
    shutil.copy(c / "visual_kv.onnx", c / "visual_kv2.onnx")
    edit(c, lambda m: m["details"]["graphs"]["visual_kv"].update(file="visual_kv2.onnx"))
    with pytest.raises(SaisaError, match="visual_kv2.onnx: not covered by saisa-edge-manifest.json's checksums"):
        open_artifact(c)
    c = copy(art, tmp_path / "d")
    (c / "tokenizer.json").write_text("{}")  # the tokenizer loader would read it
    with pytest.raises(SaisaError, match="tokenizer.json: not covered by"):
        open_artifact(c)
    c = copy(art, tmp_path / "e")
    edit(c, lambda m: m["details"]["graphs"]["decoder"].update(external_data="vision.onnx.data"))
    with pytest.raises(SaisaError, match="external_data: 'vision.onnx.data' is not among"):
        open_artifact(c)


# --- item 2: --force replaces only the command's own earlier output, never its input ----------------


def test_force_never_deletes_a_commands_input(art, tiny_dir, tmp_path):
    ckpt = copy(tiny_dir, tmp_path / "dir" / "ckpt")
    (tmp_path / "dir" / "notes.txt").write_text("unrelated")
    before, beside = listing(ckpt), listing(tmp_path / "dir")
    one_line_error(["export", str(ckpt), "-o", str(ckpt), "--force"], "is the input")
    one_line_error(["export", str(ckpt), "-o", str(tmp_path / "dir"), "--force"], "contains the input")
    one_line_error(["export", str(ckpt), "-o", str(ckpt / "art")], "is inside the input")
    assert listing(ckpt) == before and listing(tmp_path / "dir") == beside
    a = copy(art, tmp_path / "art")
    before = listing(a)
    for command in (["calibrate", str(a), "--precision", "int8"], ["build", str(a)]):
        one_line_error(command + ["-o", str(a), "--force"], "is the input")
        one_line_error(command + ["-o", str(tmp_path), "--force"], "contains the input")
    one_line_error(["make-checkpoint", "--preset", "tiny", "-o", str(a), "--force"],
                   "holds a 'onnx-artifact' folder, not an earlier output of `saisa-edge make-checkpoint`")
    one_line_error(["export", str(ckpt), "-o", str(tmp_path / "dir"), "--force"], "contains the input")
    assert listing(a) == before and (tmp_path / "dir" / "notes.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"precious")
    one_line_error(["export", str(ckpt), "-o", str(other), "--force"], "has no saisa-edge-manifest.json")
    one_line_error(["export", str(ckpt), "-o", str(a / "tokenizer.model")], "is not a folder")
    assert (other / "data.bin").read_bytes() == b"precious"


def test_force_replaces_an_earlier_output_of_the_same_kind_only(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, False, kind=ENGINE_KIND) as tmp:
        write_manifest(tmp, ARTIFACT_KIND, {})
    with pytest.raises(SaisaError, match="holds a 'onnx-artifact' folder, not an earlier output of `saisa-edge build`"):
        with atomic_folder(out, True, kind=ENGINE_KIND):
            pass
    with atomic_folder(out, True, kind=ARTIFACT_KIND) as tmp:
        (tmp / "new").write_text("x")
    assert (out / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- item 5 (folders): a replacement killed between its renames is recovered ------------------------

_KILLED = """
import os, sys
from pathlib import Path
from saisa_edge.artifacts import atomic_folder, write_manifest

out = Path(sys.argv[1])
rename = Path.rename

def rename_then_die(self, target):
    result = rename(self, target)
    if ".old-" in Path(target).name:
        os._exit(9)  # killed between moving the old folder aside and moving the new one in
    return result

Path.rename = rename_then_die
with atomic_folder(out, True, kind="onnx-artifact") as tmp:
    (tmp / "generation").write_text("2")
    write_manifest(tmp, "onnx-artifact", {})
"""


def _first(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    with atomic_folder(out, False, kind=ARTIFACT_KIND) as tmp:
        (tmp / "generation").write_text("1")
        write_manifest(tmp, ARTIFACT_KIND, {})
    return out


def _killed(out: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _KILLED, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert not out.exists()
    names = sorted(p.name.split("-")[0] for p in out.parent.iterdir())
    assert names == [".out.old", ".out.partial"]


def test_a_killed_replacement_is_restored_by_the_next_open(tmp_path):
    out = _first(tmp_path)
    _killed(out)
    theirs = [tmp_path / ".out.partial-zz", tmp_path / f".out.partial-{os.getpid()}-0123abcd",
              tmp_path / ".other.old-1-0123abcd"]  # not our pattern, a live writer, another folder's
    for p in theirs:
        p.mkdir()
    opened = open_folder(out)  # e.g. `saisa-edge run out` right after the crash
    assert (out / "generation").read_text() == "1" and opened.manifest.kind == ARTIFACT_KIND
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [p.name for p in theirs])


def test_a_killed_replacement_is_cleaned_by_the_next_write(tmp_path):
    out = _first(tmp_path)
    _killed(out)
    with atomic_folder(out, True, kind=ARTIFACT_KIND) as tmp:  # the restored folder is an earlier output
        (tmp / "generation").write_text("3")
        write_manifest(tmp, ARTIFACT_KIND, {})
    assert (out / "generation").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- item 11: max_context is checked against the model -----------------------------------------------


def test_a_tampered_max_context_is_refused(art, tiny_dir, tmp_path):
    c = copy(art, tmp_path / "c")
    edit(c, lambda m: m["details"].update(max_context=10**9))
    with pytest.raises(SaisaError, match="max_context 1000000000 must exceed .* max_position_embeddings 2048"):
        open_artifact(c)
    one_line_error(["run", str(c)] + RUN, "max_position_embeddings")
    e = fake_engines(art, tmp_path / "e", max_context=4096)
    with pytest.raises(SaisaError, match="max_context 4096 must exceed .* at most the artifact's 2048"):
        open_engines(e)


# --- engine folders through the same layer -----------------------------------------------------------


def test_engine_folders_open_and_check_their_runtime(art, tmp_path):
    e = open_engines(fake_engines(art, tmp_path / "e"))
    assert e.config == open_artifact(art).config and e.artifact["conv_mode"] == "vicuna_v1"
    e.check_runtime("10.16.0", (8, 7))
    with pytest.raises(SaisaError, match="built with TensorRT 10.16.0, this is TensorRT 10.3.0"):
        e.check_runtime("10.3.0", (8, 7))
    with pytest.raises(SaisaError, match="built for compute capability 8.7, this GPU is 9.0"):
        e.check_runtime("10.16.0", (9, 0))
    with pytest.raises(SaisaError, match="holds a 'onnx-artifact', not a 'tensorrt-engines' folder"):
        open_engines(art)
    with pytest.raises(SaisaError, match="no saisa-edge-manifest.json; not a 'tensorrt-engines' folder"):
        open_engines(tmp_path)
    f = fake_engines(art, tmp_path / "f", extra=1)
    with pytest.raises(SaisaError, match="unknown field extra"):
        open_engines(f)


def test_validate_reads_an_engine_folder_through_its_artifact(art, tmp_path):
    from saisa_edge.artifacts import artifact_details, open_runnable, precision_of

    e = fake_engines(art, tmp_path / "e")
    seen = artifact_details(open_runnable(e))
    details = open_artifact(art).details
    assert seen["source"] == details["source"] and seen["conv_mode"] == details["conv_mode"]
    assert precision_of(seen) == "fp32" and isinstance(open_runnable(art), artifacts.Artifact)


# --- manifests that used to end in a traceback --------------------------------------------------------


def _set(*path_value):
    *path, value = path_value

    def change(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    return change


def _delete(*path):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]
    return change


@pytest.mark.parametrize("write, message", [
    (lambda m: [m], "holds a JSON list, not a manifest object"),
    (lambda m: "manifest", "holds a JSON str, not a manifest object"),
    (lambda m: _delete("files")(m) or m, "missing files"),
    (lambda m: _delete("details")(m) or m, "missing details"),
    (lambda m: _set("manifest_version", "1")(m) or m, "manifest_version '1'; this saisa-edge reads version 1"),
    (lambda m: _set("details", "dtype", "fp64")(m) or m, "details.dtype 'fp64' is unknown"),
    (lambda m: _set("details", "config", "text", "flash", True)(m) or m, "unknown field flash"),
    (lambda m: _delete("details", "config", "vision", "patch_size")(m) or m, "missing patch_size"),
    (lambda m: _set("details", "config", "text", "num_key_value_heads", 0)(m) or m,
     "num_key_value_heads: 0 is not a positive integer"),
    (lambda m: _set("details", "config", "text", "rms_norm_eps", "1e-6")(m) or m, "rms_norm_eps: '1e-6' is not"),
    (lambda m: _set("details", "config", "text", "num_hidden_layers", 3)(m) or m,
     "recorded inputs and outputs disagree with details.config"),
    (lambda m: _set("details", "graphs", "decoder", 7)(m) or m, "details.graphs.decoder is not an object"),
    # bounded by the table config.json is read with, and related by the same checks (config.check_text)
    (lambda m: _set("details", "config", "text", "max_position_embeddings", 1 << 40)(m) or m,
     "max_position_embeddings: 1099511627776 is over the bound of 16777216"),
    (lambda m: _set("details", "config", "text", "num_key_value_heads", 3)(m) or m,
     "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (lambda m: _set("details", "config", "vision", "crop_size", 28)(m) or m,
     "crop_size 28 but the tower's image_size is 56; they must match"),
    (lambda m: _set("files", "vision.onnx", {"sha256": "x", "bytes": 1})(m) or m, "is not {sha256"),
    (lambda m: _set("kind", ["onnx-artifact"])(m) or m, "kind is a JSON list, not str"),
])
def test_bad_manifests_are_one_line_errors(art, tmp_path, write, message):
    c = copy(art, tmp_path / "c")
    m = write(json.loads((c / MANIFEST_NAME).read_text()))
    (c / MANIFEST_NAME).write_text(json.dumps(m))
    one_line_error(["run", str(c)] + RUN, message)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"manifest_version": ' + "9" * 5000 + "}", "not valid JSON"),
    ("{not json", "not valid JSON"),
])
def test_unparseable_manifests_are_one_line_errors(art, tmp_path, text, message):
    c = copy(art, tmp_path / "c")
    (c / MANIFEST_NAME).write_text(text)
    one_line_error(["run", str(c)] + RUN, message)
    one_line_error(["validate", str(c)], message)


# --- each file is read and hashed once per command -----------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """How often each file was hashed, and how often a manifest was read, during a command."""
    hashed: Counter[str] = Counter()
    reads: Counter[str] = Counter()
    real_hash, real_text, real_bytes = manifest_module.sha256_file, Path.read_text, Path.read_bytes

    def sha256_file(path, *a, **k):
        hashed[str(Path(path).resolve())] += 1
        return real_hash(path, *a, **k)

    def read_text(self, *a, **k):
        if self.name == MANIFEST_NAME:
            reads[str(self.resolve())] += 1
        return real_text(self, *a, **k)

    def read_bytes(self):
        if self.name == MANIFEST_NAME:
            reads[str(self.resolve())] += 1
        return real_bytes(self)

    monkeypatch.setattr(manifest_module, "sha256_file", sha256_file)
    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return hashed, reads


def test_validate_reads_the_manifest_and_hashes_each_file_once(art, counted):
    hashed, reads = counted
    r = CliRunner().invoke(main, ["validate", str(art), "--samples", "1", "--json"])
    assert r.exit_code == 0, r.output
    files = {str(p.resolve()) for p in art.iterdir() if p.name != MANIFEST_NAME}
    assert {k: v for k, v in hashed.items() if k in files} == dict.fromkeys(files, 1)
    assert reads[str((art / MANIFEST_NAME).resolve())] == 1


def test_calibrate_hashes_each_file_once(art, tmp_path, counted):
    hashed, reads = counted
    out = tmp_path / "int8"
    r = CliRunner().invoke(main, ["calibrate", str(art), "-o", str(out), "--precision", "int8", "--samples", "1",
                                  "--decode-steps", "0", "--report-samples", "1", "--min-cosine", "0",
                                  "--min-top1", "0", "--min-greedy", "0"])
    assert r.exit_code == 0, r.output
    source = {str(p.resolve()) for p in art.iterdir() if p.name != MANIFEST_NAME}
    assert {k: v for k, v in hashed.items() if k in source} == dict.fromkeys(source, 1)
    written = Counter(Path(k).name for k in hashed if f"/.{out.name}.partial-" in k or k.startswith(f"{out}/"))
    assert written == Counter(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)  # when written, not again
    assert reads[str((art / MANIFEST_NAME).resolve())] == 1
