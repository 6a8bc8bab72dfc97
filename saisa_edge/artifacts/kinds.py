"""The folder kinds a runtime opens: an ONNX artifact (`export`, `calibrate`) and TensorRT
engines (`build`). Each is opened once, checked completely, and passed along as the object.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saisa_edge.artifacts.manifest import (
    ARTIFACT_KIND, ENGINE_KIND, MANIFEST_NAME, FileEntry, Opened, named, open_folder,
)
from saisa_edge.artifacts import names as io
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.artifacts.schema import build, config_from_json
from saisa_edge.config import DTYPE_NAMES, SaisaConfig
from saisa_edge.errors import SaisaError
from saisa_edge.targets import WEIGHT_ONLY

PRECISIONS = (*DTYPE_NAMES, "int8", "fp8", *WEIGHT_ONLY)  # what linear layers compute in: a dtype, or a calibration's


def _field(details: dict[str, Any], key: str, typ: type, where: str) -> Any:
    value = details.get(key)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SaisaError(f"{where}: details.{key} is {value!r}, not a {typ.__name__}")
    return value


def _model(details: dict[str, Any], where: str) -> tuple[SaisaConfig, str, int]:
    """Config, dtype and max_context, the last checked against the model's own limit."""
    cfg = config_from_json(details.get("config"), f"{where}: details.config")
    dtype = _field(details, "dtype", str, where)
    if dtype not in DTYPE_NAMES:
        raise SaisaError(f"{where}: details.dtype {dtype!r} is unknown; this saisa-edge knows {', '.join(DTYPE_NAMES)}")
    context = _field(details, "max_context", int, where)
    limit = cfg.text.max_position_embeddings
    if not cfg.num_visual_tokens < context <= limit:
        raise SaisaError(f"{where}: details.max_context {context} must exceed the {cfg.num_visual_tokens} visual "
                         f"tokens and be at most the model's max_position_embeddings {limit}")
    return cfg, dtype, context


def interface(cfg: SaisaConfig, form: str = "standard",
              context: int | None = None) -> dict[str, dict[str, tuple[int | None, ...]]]:
    """Each graph's inputs and outputs as `cfg` (and for the contrib decoder form, its K/V
    buffer of `context` slots) implies them: name -> dims (None: a dynamic one)."""
    t, v, n = cfg.text, cfg.vision, cfg.num_visual_tokens
    kv, d, layers = t.num_key_value_heads, t.head_dim, range(t.num_hidden_layers)
    _ = None
    per_layer = {io.visual(k, i): (_, kv, _, d) for i in layers for k in ("key", "value")}
    if form == "contrib":
        decoder = {io.INPUT_IDS: (_, _), io.SEQLENS_K: (_,), io.TOTAL_LENGTH: (), io.LOGITS: (_, _, t.vocab_size)}
        cache: tuple[int | None, ...] = (_, kv, context, d)
    else:
        decoder = {io.INPUT_IDS: (_, _), io.POSITION_IDS: (_, _), io.PAST_POSITIONS: (_, _), io.VISUAL_END: (_,),
                   io.LOGITS: (_, _, t.vocab_size), io.PRESENT_POSITIONS: (_, _), **per_layer}
        cache = (_, kv, _, d)
    for i in layers:
        for k in ("key", "value"):
            decoder[io.past(k, i)] = decoder[io.present(k, i)] = cache
    return {
        "vision": {io.PIXEL_VALUES: (_, v.num_channels, v.crop_size, v.crop_size), io.FEATURES: (_, n, v.hidden_size)},
        "visual_kv": {io.FEATURES: (_, _, cfg.mm.mm_hidden_size), io.VISUAL_START: (_,), **per_layer},
        "decoder": decoder,
    }


def _check_interface(cfg: SaisaConfig, form: str, context: int, graphs: dict[str, Any], where: str) -> None:
    """The config must agree with the inputs and outputs recorded for each graph (one edit cannot pass)."""
    for graph, want in interface(cfg, form, context).items():
        entry = graphs[graph]
        values = entry.get("inputs"), entry.get("outputs")
        if not all(isinstance(vs, list) and all(isinstance(x, dict) for x in vs) for vs in values):
            raise SaisaError(f"{where}: details.graphs.{graph} does not list its inputs and outputs")
        got = {x.get("name"): x.get("dims") for vs in values for x in vs}
        wrong = sorted(str(name) for name in set(got) ^ set(want)) or sorted(
            name for name, dims in want.items() if not (isinstance(got[name], list) and len(got[name]) == len(dims)
                                                        and all(w is None or g == w for g, w in zip(got[name], dims))))
        if wrong:
            raise SaisaError(f"{where}: {graph}'s recorded inputs and outputs disagree with details.config at "
                             f"{', '.join(wrong[:3])}; export the artifact again")


def _digest(files: dict[str, FileEntry], names: tuple[str, ...]) -> str:
    """Checksums (from the manifest) of the files an image goes through: keys the visual cache."""
    h = hashlib.sha256()
    for name in sorted(files):
        if name.startswith(names):
            h.update(f"{name}|{files[name].sha256}\n".encode())
    return h.hexdigest()


def decoder_form(details: dict[str, Any], where: str) -> str:
    """Which decoder the folder holds (artifacts written before the contrib form hold the standard one)."""
    form = details.get("decoder_form", "standard")
    if form not in io.DECODER_FORMS:
        raise SaisaError(f"{where}: details.decoder_form {form!r} is unknown; this saisa-edge knows "
                         f"{', '.join(io.DECODER_FORMS)}")
    return str(form)


def precision_of(details: dict[str, Any]) -> str:
    """What an artifact's linear layers compute in: its calibration's precision, else its dtype."""
    quantization = details.get("quantization")
    return str(quantization["recipe"]["precision"] if quantization else details["dtype"])


def _precision(details: dict[str, Any], where: str) -> str:
    q = details.get("quantization")
    recipe = q.get("recipe") if isinstance(q, dict) else None
    if q is not None and not (isinstance(recipe, dict) and recipe.get("precision") in PRECISIONS):
        raise SaisaError(f"{where}: details.quantization has no recipe.precision among {', '.join(PRECISIONS)}")
    return precision_of(details)


@dataclass(frozen=True)
class Artifact:
    """A checked ONNX artifact folder."""

    path: Path
    config: SaisaConfig
    dtype: str  # a DTYPE_NAMES name
    max_context: int
    precision: str
    details: dict[str, Any]
    files: dict[str, FileEntry]
    manifest_sha256: str
    decoder_form: str = "standard"  # names.DECODER_FORMS

    def graph(self, name: str) -> Path:
        return self.path / self.details["graphs"][name]["file"]

    @property
    def image_path_digest(self) -> str:
        return _digest(self.files, ("vision.onnx", "visual_kv.onnx"))


def artifact_of(opened: Opened) -> Artifact:
    m, where = opened.manifest, str(opened.path / MANIFEST_NAME)
    d = m.details
    cfg, dtype, context = _model(d, where)
    for key, typ in (("attention", str), ("conv_mode", str), ("opset", int), ("graphs", dict)):
        _field(d, key, typ, where)
    if set(d["graphs"]) != set(GRAPHS):
        raise SaisaError(f"{where}: details.graphs names {sorted(d['graphs'])}, not {', '.join(GRAPHS)}")
    for name, entry in d["graphs"].items():
        if not isinstance(entry, dict):
            raise SaisaError(f"{where}: details.graphs.{name} is not an object")
        named(m, entry.get("file"), f"{where}: details.graphs.{name}.file")
        if entry.get("external_data") is not None:
            named(m, entry["external_data"], f"{where}: details.graphs.{name}.external_data")
        _field(entry, "weights_bytes", int, f"{where}: graphs.{name}")
    form = decoder_form(d, where)
    _check_interface(cfg, form, context, d["graphs"], where)
    source = d.get("source", {})
    if not (isinstance(source, dict) and all(isinstance(v, str) for v in source.values())):
        raise SaisaError(f"{where}: details.source is not an object of paths")
    return Artifact(opened.path, cfg, dtype, context, _precision(d, where), d, m.files, opened.manifest_sha256, form)


def open_artifact(path: Path, verify: bool = True) -> Artifact:
    """Open an artifact folder: manifest, every file present and (if `verify`) unchanged, details typed."""
    return artifact_of(open_folder(path, ARTIFACT_KIND, verify))


@dataclass(frozen=True)
class EngineManifest:
    """The details of an engine folder's manifest."""

    tensorrt_version: str
    compute_capability: tuple[int, int]
    target: str
    precision: str
    attention: str
    plugin_version: str | None
    max_batch: int
    max_context: int
    profiles: dict[str, list[str]]
    artifact: dict[str, Any]  # path, manifest checksum, details (config, dtype, quantization, ...)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Engines:
    """A checked engine folder; `artifact` holds the details of the artifact it was built from."""

    path: Path
    manifest: EngineManifest
    config: SaisaConfig
    dtype: str
    files: dict[str, FileEntry]
    manifest_sha256: str
    decoder_form: str = "standard"  # names.DECODER_FORMS

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    @property
    def artifact(self) -> dict[str, Any]:
        return self.manifest.artifact

    @property
    def precision(self) -> str:
        return self.manifest.precision

    def engine(self, name: str) -> Path:
        return self.path / f"{name}.engine"

    @property
    def image_path_digest(self) -> str:
        return _digest(self.files, ("vision.engine", "visual_kv.engine"))

    def check_runtime(self, trt_version: str, capability: tuple[int, int]) -> None:
        """An engine runs only on the TensorRT version and GPU generation that built it."""
        m = self.manifest
        if m.tensorrt_version != trt_version:
            raise SaisaError(f"{self.path}: built with TensorRT {m.tensorrt_version}, this is TensorRT {trt_version}; "
                             "rebuild with `saisa-edge build` here")
        if tuple(m.compute_capability) != tuple(capability):
            built = "{}.{}".format(*m.compute_capability)
            raise SaisaError(f"{self.path}: built for compute capability {built}, this GPU is "
                             f"{capability[0]}.{capability[1]}; rebuild with `saisa-edge build` on this GPU")


def engines_of(opened: Opened) -> Engines:
    where = str(opened.path / MANIFEST_NAME)
    m = build(EngineManifest, opened.manifest.details, f"{where}: details")
    cfg, dtype, context = _model(m.artifact, f"{where}: details.artifact")
    if not cfg.num_visual_tokens < m.max_context <= context:
        raise SaisaError(f"{where}: details.max_context {m.max_context} must exceed the {cfg.num_visual_tokens} "
                         f"visual tokens and be at most the artifact's {context}")
    if m.precision not in PRECISIONS:
        raise SaisaError(f"{where}: details.precision {m.precision!r} is unknown; one of {', '.join(PRECISIONS)}")
    for name in GRAPHS:
        named(opened.manifest, f"{name}.engine", where)
    return Engines(opened.path, m, cfg, dtype, opened.manifest.files, opened.manifest_sha256)


def open_engines(path: Path, verify: bool = True) -> Engines:
    return engines_of(open_folder(path, ENGINE_KIND, verify))


def open_runnable(path: Path) -> Artifact | Engines:
    """An artifact or engine folder, by the kind its manifest names (read once)."""
    opened = open_folder(path)
    if opened.manifest.kind == ENGINE_KIND:
        return engines_of(opened)
    if opened.manifest.kind == ARTIFACT_KIND:
        return artifact_of(opened)
    raise SaisaError(f"{path}: holds a {opened.manifest.kind!r}, not an ONNX artifact or TensorRT engines")


def artifact_details(folder: Artifact | Engines) -> dict[str, Any]:
    """An artifact's details; for engines, those of the artifact they were built from."""
    return folder.artifact if isinstance(folder, Engines) else folder.details
