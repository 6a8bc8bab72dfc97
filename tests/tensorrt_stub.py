"""NVIDIA's pure-Python `tensorrt.plugin` on a minimal stand-in for TensorRT's native module.

The bindings wheel (`pip install --no-deps tensorrt-cu12-bindings==10.16.1.11`) ships
`tensorrt_bindings/plugin/` as plain Python next to a native `tensorrt.so` that needs
TensorRT's libraries. `load()` imports that package as `tensorrt.plugin` on top of
`native_module()`: enums, plugin-field and tensor-descriptor records, a plugin registry
and an expression builder that evaluates shape expressions to concrete ints. Nothing of
NVIDIA's plugin logic is replaced. `build_layer` then drives a plugin through the calls
TensorRT's builder makes (as read in TensorRT's `IPluginV3Quick*` interfaces and the ONNX
parser's plugin importer), with concrete shapes.
"""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import importlib.util
import operator
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import AttributeProto, NodeProto, helper

WHEEL = "tensorrt-cu12-bindings==10.16.1.11"


def plugin_package() -> Path | None:
    """Where the bindings wheel put NVIDIA's plugin package (found without importing the
    native part), or None where the wheel is not installed."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "plugin"
    return path if (path / "_lib.py").exists() else None


def _enum(name: str, members: str) -> type[enum.Enum]:
    return enum.Enum(name, members.split())  # type: ignore[return-value]


class _Interface:
    """A native interface class: Python plugins subclass it and call its __init__."""

    def __init__(self) -> None:
        pass


class DimExpr:
    """An `IDimensionExpr` whose value is known: the builder's view once shapes are fixed."""

    def __init__(self, value: int) -> None:
        self.value = int(value)

    def is_constant(self) -> bool:
        return True

    def get_constant_value(self) -> int:
        return self.value


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ExprBuilder:
    """`IExprBuilder`: constants and the DimensionOperations, evaluated at once."""

    def __init__(self, ops: type[enum.Enum]) -> None:
        self._ops = {ops.SUM: operator.add, ops.PROD: operator.mul, ops.MAX: max, ops.MIN: min,  # type: ignore[attr-defined]
                     ops.SUB: operator.sub, ops.EQUAL: operator.eq, ops.LESS: operator.lt,  # type: ignore[attr-defined]
                     ops.FLOOR_DIV: operator.floordiv, ops.CEIL_DIV: _ceil_div}  # type: ignore[attr-defined]

    def constant(self, value: int) -> DimExpr:
        return DimExpr(value)

    def operation(self, op: enum.Enum, a: DimExpr, b: DimExpr) -> DimExpr:
        return DimExpr(int(self._ops[op](a.value, b.value)))


class PluginField:
    """`trt.PluginField`: name, data (a numpy array, as the binding returns it), type."""

    def __init__(self, name: str, data: Any = None, type: Any = None) -> None:
        self.name = name
        self.data = np.frombuffer(data, np.int8) if isinstance(data, bytes) else np.asarray(data)
        self.type = type


class PluginTensorDesc:
    def __init__(self, dims: tuple[int, ...] = (), type: Any = None, format: Any = None, scale: float = 1.0):
        self.dims, self.type, self.format, self.scale = dims, type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc) -> None:
        self.desc, self.min, self.opt, self.max = desc, desc.dims, desc.dims, desc.dims


class Dims(tuple):
    MAX_DIMS = 8


class _Registry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        self.creators[creator.name, creator.plugin_version, namespace] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, version, namespace))


def native_module() -> types.ModuleType:
    """The names `tensorrt.plugin` takes from TensorRT's native module."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)  # a package: tensorrt.plugin
    trt.__path__ = []
    data_type = _enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64 INT4 FP4 E8M0")
    registry = _Registry()

    class Logger(_Interface):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

        def log(self, severity: int, message: str) -> None:
            pass

    class DimsExprs(list):
        def __init__(self, n: int) -> None:
            super().__init__([None] * n)

    names: dict[str, Any] = dict(
        Logger=Logger, DataType=data_type, float32=data_type.FLOAT, float16=data_type.HALF,  # type: ignore[attr-defined]
        bfloat16=data_type.BF16, int32=data_type.INT32, int64=data_type.INT64,  # type: ignore[attr-defined]
        TensorFormat=_enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR "
                                           "DLA_HWC4 HWC16 DHWC"),
        PluginFieldType=_enum("PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 "
                                                 "INT64 FP8 INT4 FP4"),
        DimensionOperation=_enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV"),
        QuickPluginCreationRequest=_enum("QuickPluginCreationRequest",
                                         "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT"),
        TensorRTPhase=_enum("TensorRTPhase", "BUILD RUNTIME"),
        PluginArgType=_enum("PluginArgType", "INT"),
        PluginArgDataType=_enum("PluginArgDataType", "INT8 INT16 INT32"),
        PluginField=PluginField, PluginFieldCollection=list, PluginTensorDesc=PluginTensorDesc,
        DynamicPluginTensorDesc=DynamicPluginTensorDesc, Dims=Dims, DimsExprs=DimsExprs, IDimensionExpr=DimExpr,
        IExprBuilder=ExprBuilder, ITensor=type("ITensor", (), {}), get_plugin_registry=lambda: registry,
    )
    for interface in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                      "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr"):
        names[interface] = type(interface, (_Interface,), {})
    trt.__dict__.update(names)
    return trt


@contextmanager
def loaded(package: Path) -> Iterator[types.ModuleType]:
    """`tensorrt` (the stand-in) with NVIDIA's `tensorrt.plugin` imported under it, and
    sys.modules as it was afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith(("tensorrt.", "saisa_edge.plugins.trt"))}
    for k in saved:
        del sys.modules[k]
    trt = native_module()
    sys.modules["tensorrt"] = trt
    try:
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", package / "__init__.py",
                                                      submodule_search_locations=[str(package)])
        assert spec is not None and spec.loader is not None
        trtp = importlib.util.module_from_spec(spec)
        sys.modules["tensorrt.plugin"] = trtp
        trt.plugin = trtp  # type: ignore[attr-defined]
        spec.loader.exec_module(trtp)
        yield trt
    finally:
        for k in [k for k in sys.modules if k == "tensorrt" or k.startswith(("tensorrt.", "saisa_edge.plugins.trt"))]:
            del sys.modules[k]
            parent, _, child = k.rpartition(".")
            if parent in sys.modules and k not in saved:  # `from saisa_edge.plugins import trt_plugin` forgets it
                vars(sys.modules[parent]).pop(child, None)
        sys.modules.update(saved)


def parser_fields(trt: types.ModuleType, creator: Any, node: NodeProto) -> list[PluginField]:
    """What the ONNX parser's plugin importer hands the creator: for each field the creator
    names, the node's attribute of that name (INT as one int32, FLOAT as one float32, STRING
    as chars); attributes the creator does not name are left out."""
    attrs = {a.name: a for a in node.attribute}
    fields = []
    for wanted in creator.field_names:
        a = attrs.get(wanted.name)
        if a is None:
            continue
        value = helper.get_attribute_value(a)
        if a.type == AttributeProto.INT:
            fields.append(PluginField(a.name, np.array([value], np.int32), trt.PluginFieldType.INT32))
        elif a.type == AttributeProto.FLOAT:
            fields.append(PluginField(a.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        elif a.type == AttributeProto.STRING:
            fields.append(PluginField(a.name, value, trt.PluginFieldType.CHAR))
        else:
            raise ValueError(f"attribute {a.name}: type {a.type} is not handled here")
    return fields


def find_creator(trt: types.ModuleType, node: NodeProto) -> Any:
    """The parser's lookup: op_type as the name, `plugin_version` (default "1") and
    `plugin_namespace` (default "") attributes; the node's ONNX domain plays no part."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("plugin_version", b"1").decode()
    namespace = attrs.get("plugin_namespace", b"").decode()
    return trt.get_plugin_registry().get_creator(node.op_type, version, namespace)


@dataclass(frozen=True)
class Launch:
    """What an AOT plugin leaves in the engine for one layer shape."""

    kernel_name: str
    ptx: bytes
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    extra_args: list[tuple[str, int]]  # (PluginArgDataType name, value), in launch order
    output_shapes: list[tuple[int, ...]]
    output_types: list[Any]


class _Slots:
    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.items: dict[int, Any] = {}

    def __setitem__(self, i: int, value: Any) -> None:
        self.items[i] = value


def build_layer(trt: types.ModuleType, node: NodeProto, shapes: list[tuple[int, ...]], dtypes: list[Any]) -> Launch:
    """Create the plugin for `node` as the parser does and take it through the builder's
    calls for one set of concrete input shapes: output types, output shapes, formats, the
    tactic, then the AOT launch parameters and the kernel."""
    creator = find_creator(trt, node)
    if creator is None:
        raise LookupError(f"no plugin creator for {node.op_type}")
    fields = parser_fields(trt, creator, node)
    plugin = creator.create_plugin(node.op_type, creator.plugin_namespace, trt.PluginFieldCollection(fields),
                                   trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.UNKNOWN)
    builder = ExprBuilder(trt.DimensionOperation)
    out_types = plugin.get_output_data_types(dtypes, [len(s) for s in shapes])
    in_exprs = [[builder.constant(d) for d in s] for s in shapes]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    out_shapes = [tuple(e.get_constant_value() for e in exprs) for exprs in out_exprs]
    fmt = trt.TensorFormat.LINEAR
    in_out = [DynamicPluginTensorDesc(PluginTensorDesc(Dims(s), t, fmt))
              for s, t in [*zip(shapes, dtypes), *zip(out_shapes, out_types)]]
    plugin.get_supported_format_combinations(in_out, len(shapes))
    plugin.configure_plugin(in_out[:len(shapes)], in_out[len(shapes):])
    tactics = plugin.get_valid_tactics()
    plugin.set_tactic(tactics[0] if tactics else 0)
    params, slots = types.SimpleNamespace(), _Slots()
    plugin.get_launch_params(in_exprs, in_out, len(shapes), params, slots, builder)
    name, ptx = plugin.get_kernel([d.desc for d in in_out[:len(shapes)]], [d.desc for d in in_out[len(shapes):]])
    extras = [(slots.items[i].dtype.name, slots.items[i].expr.get_constant_value()) for i in range(slots.nbSymExprs)]

    def value(v: Any) -> int:
        return int(v.expr.get_constant_value())

    return Launch(name if isinstance(name, str) else name.decode(), ptx,
                  (value(params.grid_x), value(params.grid_y), value(params.grid_z)),
                  (value(params.block_x), value(params.block_y), value(params.block_z)),
                  value(params.shared_mem), extras, out_shapes, list(out_types))
