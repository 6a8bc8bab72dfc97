"""The plugin through NVIDIA's own `tensorrt.plugin` (the bindings wheel's pure Python on a
stand-in for the native module, `tensorrt_stub`): registration and its validation, the
ONNX parser's binding rules on the exported graph, creation from the node's attributes as
the parser passes them, shape/type inference and `aot_impl` with concrete sizes, and the
kernel launched with what `aot_impl` returned, in TensorRT's argument order."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import onnx
import pytest
from onnx import AttributeProto, helper

import tensorrt_stub as ts
from saisa_edge.checkpoint.loader import open_checkpoint
from saisa_edge.export import naavit
from saisa_edge.export.artifact import ExportOptions, export_artifact
from saisa_edge.plugins.aot import compile_naavit
from saisa_edge.plugins.naavit_kernel import BLOCK_M, RUNTIME_ARGS, SHARED_LIMIT
from saisa_edge.plugins.selfcheck import CASES
from tests.test_plugins import selfcheck_interpreted

ROOT = Path(__file__).resolve().parents[1]
SM = 87
NUMERIC_ATTRIBUTES = tuple(a for a in naavit.ATTRIBUTES if a not in ("plugin_namespace", "plugin_version"))


@pytest.fixture(scope="module")
def trt():
    package = ts.plugin_package()
    if package is None:
        message = f"NVIDIA's tensorrt.plugin is not installed: pip install --no-deps {ts.WHEEL}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    with ts.loaded(package) as module:
        yield module


@pytest.fixture(scope="module")
def plugin(trt):
    """Importing registers the plugin; tensorrt.plugin validates the decorated functions then."""
    from saisa_edge.plugins import trt_plugin

    trt_plugin.configure(SM)
    return trt_plugin


@pytest.fixture(scope="module")
def plugin_nodes(tmp_path_factory, tiny_gqa_dir):
    """The NAAViT nodes of the tiny preset exported with --attention plugin."""
    out = tmp_path_factory.mktemp("qdp") / "art"
    export_artifact(open_checkpoint(tiny_gqa_dir), out, ExportOptions(attention="plugin"))
    model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == naavit.DOMAIN]
    assert nodes and not model.functions
    return nodes


def _node(heads: int, kv_heads: int, head_size: int) -> onnx.NodeProto:
    return helper.make_node(naavit.OP_TYPE, list(naavit.INPUTS), ["out"], domain=naavit.DOMAIN,
                            **naavit.attributes(heads, kv_heads, head_size))


def _shapes(b: int, h: int, kv: int, t: int, s: int, n: int, d: int, vb: int) -> list[tuple[int, ...]]:
    return [(b, h, t, d), (b, kv, s, d), (b, kv, s, d), (vb, kv, n, d), (vb, kv, n, d), (b, t), (b, s), (vb,)]


def _types(trt, dtype: str) -> list:
    float_type = {"fp32": trt.DataType.FLOAT, "fp16": trt.DataType.HALF, "bf16": trt.DataType.BF16}[dtype]
    return [float_type] * 5 + [trt.DataType.INT64] * 3


def test_attribute_annotations_are_classes_to_issubclass(plugin):
    """Fault 4 (a GPU machine, Python 3.12, numpy 2.5): `npt.NDArray[np.int32]` there is a
    subscripted `type` alias, and tensorrt.plugin's `issubclass(annotation, TensorDesc)`
    raised TypeError on import. Every annotation's origin must be a class: np.ndarray."""
    import inspect
    import typing

    for fn in (plugin.naavit_desc, plugin.naavit_aot):
        for name, param in inspect.signature(fn).parameters.items():
            origin = typing.get_origin(param.annotation) or param.annotation
            assert isinstance(origin, type), (fn.__name__, name, param.annotation)
            issubclass(param.annotation, object)  # what tensorrt.plugin does first, on any Python


def test_registration_passes_tensorrt_plugin_validation(trt, plugin):
    """Fault 1: with postponed annotations, tensorrt.plugin's issubclass checks raised
    TypeError on import. Its registry now holds the op with its schema."""
    definition = sys.modules["tensorrt.plugin._lib"].QDP_REGISTRY[plugin.PLUGIN_ID]
    assert definition.input_tensor_names == list(naavit.INPUTS)
    assert tuple(definition.input_attrs) == NUMERIC_ATTRIBUTES
    assert definition.num_outputs == 1
    assert definition.aot_impl_func is plugin.naavit_aot
    assert tuple(definition.aot_impl_attr_names) == NUMERIC_ATTRIBUTES  # the launcher passes every attribute
    creator = trt.get_plugin_registry().get_creator(naavit.OP_TYPE, naavit.PLUGIN_VERSION, naavit.DOMAIN)
    assert creator is not None and creator.plugin_version == naavit.PLUGIN_VERSION


def test_parser_binds_the_exported_node_to_the_plugin(trt, plugin, plugin_nodes):
    """The ONNX parser's plugin importer: op_type is the plugin's name (the ONNX domain is
    ignored), string attributes plugin_namespace/plugin_version select the creator, and
    each field the creator names is read from the attribute of that name, with its ONNX
    type deciding the field's type."""
    for node in plugin_nodes:
        assert node.op_type == naavit.OP_TYPE and len(node.input) == len(naavit.INPUTS) and len(node.output) == 1
        attrs = {a.name: a for a in node.attribute}
        for name, value in (("plugin_namespace", naavit.DOMAIN), ("plugin_version", naavit.PLUGIN_VERSION)):
            assert attrs[name].type == AttributeProto.STRING and attrs[name].s.decode() == value
        creator = ts.find_creator(trt, node)
        assert creator is not None, "the parser would find no plugin"
        field_types = {f.name: f.type for f in creator.field_names}
        assert tuple(field_types) == NUMERIC_ATTRIBUTES
        onnx_to_field = {AttributeProto.INT: trt.PluginFieldType.INT32, AttributeProto.FLOAT: trt.PluginFieldType.FLOAT32}
        assert {n: onnx_to_field[attrs[n].type] for n in field_types} == field_types


def test_layer_build_with_concrete_sizes(trt, plugin, plugin_nodes):
    """Fault 3: the parser passes INT/FLOAT attributes as one-element arrays, and
    tensorrt.plugin converted them with int()/float(): numpy >= 2.4 raises TypeError,
    numpy 1.25 to 2.3 warn (DeprecationWarning, an error here), so both fail the old
    annotations. Then shape/type inference and aot_impl through NVIDIA's own code."""
    node = plugin_nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    h, kv, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_size"]
    b, t, s, n, vb = 2, 21, 40, 9, 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        launch = ts.build_layer(trt, node, _shapes(b, h, kv, t, s, n, d, vb), _types(trt, "fp16"))
    assert launch.output_shapes == [(b, h, t, d)] and launch.output_types == [trt.DataType.HALF]
    assert launch.grid == (-(-t // BLOCK_M), b * h, 1)
    kernel = compile_naavit(SM, "fp16", h, kv, d, attrs["scale"])
    assert launch.block == (kernel.threads, 1, 1)
    assert launch.shared_mem == kernel.shared_bytes <= SHARED_LIMIT
    assert launch.extra_args == [("INT32", v) for v in (t, s, n, vb)] and len(RUNTIME_ARGS) == 4
    assert launch.kernel_name == kernel.name and launch.ptx == kernel.ptx.encode()
    assert f".entry {kernel.name}" in kernel.ptx and f".target sm_{SM}" in kernel.ptx


@pytest.mark.slow
def test_tensorrt_launch_replayed_under_the_interpreter(trt, plugin, tmp_path):
    """Fault 2: every selfcheck case, fp32 and fp16, built through NVIDIA's plugin code;
    the kernel then runs (Triton's interpreter) with the grid and extra args aot_impl
    returned, in TensorRT's order (inputs, extra args, outputs), against the reference."""
    launches = []
    for dtype in ("fp32", "fp16"):
        for c in CASES:
            b, t, vb = c.batch, c.new, c.batch if c.per_row_images else 1
            shapes = _shapes(b, c.heads, c.kv_heads, t, c.past + t, c.visual, c.head_dim, vb)
            launch = ts.build_layer(trt, _node(c.heads, c.kv_heads, c.head_dim), shapes, _types(trt, dtype))
            assert [kind for kind, _ in launch.extra_args] == ["INT32"] * len(RUNTIME_ARGS)
            launches.append({"case": c.name, "dtype": dtype, "grid": launch.grid,
                             "extra_args": [v for _, v in launch.extra_args]})
    (tmp_path / "launches.json").write_text(json.dumps(launches))
    _, report = selfcheck_interpreted("--launches", str(tmp_path / "launches.json"))
    failed = [(r["case"], r["dtype"], r["max_abs_error"]) for r in report["cases"] if not r["ok"]]
    assert not failed and len(report["cases"]) == 2 * len(CASES)
