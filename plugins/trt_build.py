"""TensorRT engine builds: the thin layer that calls TensorRT (logic lives in `build`).

Strongly typed networks (the graph's types decide precision: fp16/bf16 from export,
INT8/FP8 from calibration's Q/DQ), the profiles of `build.profiles`, a timing cache
reused across builds, engines written atomically with a manifest.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import tensorrt as trt

from saisa_edge.artifacts import ENGINE_KIND, Artifact, EngineManifest, atomic_folder, write_manifest
from saisa_edge.artifacts.names import GRAPHS
from saisa_edge.errors import SaisaError
from saisa_edge.export import naavit
from saisa_edge.export.artifact import copy_tokenizer
from saisa_edge.plugins import build
from saisa_edge.progress import say

_LOGGER = trt.Logger(trt.Logger.WARNING)


def _onnx_for(art: Artifact, name: str, attention: str, work: Path) -> Path:
    """The graph to parse: as exported, or (plugin) without the function body so the node
    binds to the plugin, written to `work` beside a link to its external data."""
    path = art.graph(name)
    if name != "decoder" or attention != "plugin" or art.details["attention"] != "custom":
        return path
    model = onnx.load(str(path), load_external_data=False)
    del model.functions[:]
    data = art.details["graphs"][name].get("external_data")
    if data:
        (work / data).symlink_to((art.path / data).resolve())
    out = work / path.name
    onnx.save_model(model, str(out))
    return out


def _network(builder: trt.Builder, onnx_path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SaisaError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    return network, parser


def build_engines(art: Artifact, out: Path, options: build.BuildOptions, attention: str, max_context: int,
                  capability: tuple[int, int], force: bool = False) -> dict[str, Any]:
    if attention == "plugin":
        from saisa_edge.plugins import trt_plugin

        trt_plugin.configure(capability[0] * 10 + capability[1])
    builder = trt.Builder(_LOGGER)
    cache_path = out.parent / f".saisa-timing-{options.target.name}-{trt.__version__}.cache"
    cache_blob = cache_path.read_bytes() if cache_path.exists() else b""
    built: dict[str, list[str]] = {}
    output = atomic_folder(out, force, kind=ENGINE_KIND, inputs=(art.path,))
    with output as tmp, tempfile.TemporaryDirectory(prefix="saisa-build-") as work:
        for name in GRAPHS:
            t0 = time.perf_counter()
            network, _parser = _network(builder, _onnx_for(art, name, attention, Path(work)))
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.target.workspace_gib * 2**30))
            timing = config.create_timing_cache(cache_blob)
            config.set_timing_cache(timing, ignore_mismatch=False)
            chosen = build.profiles(art, name, options.max_batch, max_context)
            for p in chosen:
                profile = builder.create_optimization_profile()
                for tensor, (lo, opt, hi) in p.shapes.items():
                    profile.set_shape(tensor, lo, opt, hi)
                config.add_optimization_profile(profile)
            engine = builder.build_serialized_network(network, config)
            if engine is None:
                raise SaisaError(f"TensorRT could not build {name}.onnx for {options.target.name}; see its log above")
            (tmp / f"{name}.engine").write_bytes(bytes(engine))
            cache_blob = bytes(timing.serialize())
            built[name] = [p.name for p in chosen]
            say(f"built {name}.engine in {time.perf_counter() - t0:.0f} s")
        tmp_cache = cache_path.with_name(cache_path.name + ".tmp")
        tmp_cache.write_bytes(cache_blob)
        tmp_cache.replace(cache_path)
        copy_tokenizer(art.path, tmp)
        manifest = EngineManifest(
            tensorrt_version=trt.__version__, compute_capability=capability, target=options.target.name,
            precision=art.precision, attention=attention,
            plugin_version=naavit.PLUGIN_VERSION if attention == "plugin" else None,
            max_batch=options.max_batch, max_context=max_context, profiles=built,
            artifact={"path": str(art.path), "manifest_sha256": art.manifest_sha256,
                      **{k: art.details[k] for k in ("config", "dtype", "conv_mode", "source", "max_context")},
                      "quantization": art.details.get("quantization")},
        )
        write_manifest(tmp, ENGINE_KIND, manifest.as_json())
    return manifest.as_json()
