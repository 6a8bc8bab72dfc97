"""A small ONNX graph builder: fresh names, constants, lazily streamed weights.

Weights are declared with their shape and read only when the file is written, one at
a time, straight from the checkpoint: an export never holds the model in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import AttributeProto, FunctionProto, TensorProto, helper

from saisa_edge.progress import track

ELEM_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
# Graphs with more weight bytes than this keep them in `<graph>.onnx.data`, written one
# tensor at a time (memory stays at one tensor); protobuf's 2 GiB cap is far above it.
EMBED_LIMIT = 256 * 2**20

Dim = int | str


class Builder:
    """Appends nodes with unique output names; used for graphs and function bodies alike."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._used: Counter[str] = Counter()

    def fresh(self, hint: str) -> str:
        self._used[hint] += 1
        return f"{hint}_{self._used[hint]}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", name: str | None = None,
           out: str | None = None, **attrs: Any) -> Any:
        """Add a node; returns its output name (`out` if given), or a tuple of names when `outputs` > 1."""
        hint = name or op_type
        outs = [out] if out else [self.fresh(hint) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{hint}_node"),
                                           domain=domain, **attrs))
        return outs[0] if outputs == 1 else tuple(outs)

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant as a Constant node (valid in function bodies too)."""
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=onnx.numpy_helper.from_array(arr), name="const")

    def ref_float(self, attr: str) -> str:
        """A float Constant taken from the enclosing function's attribute `attr`."""
        return self._ref(attr, "value_float", AttributeProto.FLOAT)

    def ref_int(self, attr: str) -> str:
        """An int64 scalar Constant taken from the enclosing function's attribute `attr`."""
        return self._ref(attr, "value_int", AttributeProto.INT)

    def _ref(self, attr: str, field: str, kind: AttributeProto.AttributeType) -> str:
        out = self.fresh(f"attr_{attr}")
        a = AttributeProto(name=field, ref_attr_name=attr, type=kind)
        node = helper.make_node("Constant", [], [out], name=self.fresh("attr_node"))
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def shape(self, x: str, start: int, end: int | None = None) -> str:
        kw: dict[str, Any] = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", x, name="shape", **kw)


@dataclass
class Weight:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ValueSpec:
    """A graph input or output: name, element type and dims (str = dynamic axis)."""

    name: str
    elem_type: int
    dims: tuple[Dim, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": TensorProto.DataType.Name(self.elem_type).lower(), "dims": list(self.dims)}


@dataclass
class Graph(Builder):
    name: str = "graph"
    inputs: list[ValueSpec] = field(default_factory=list)
    outputs: list[ValueSpec] = field(default_factory=list)
    weights: list[Weight] = field(default_factory=list)

    def __post_init__(self) -> None:
        Builder.__init__(self)

    def input(self, name: str, elem_type: int, dims: Sequence[Dim]) -> str:
        self.inputs.append(ValueSpec(name, elem_type, tuple(dims)))
        return name

    def output(self, value: str, name: str, elem_type: int, dims: Sequence[Dim]) -> None:
        """Declare `value` a graph output called `name` (best made by `op(..., out=name)`: no copy)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh("output")))
        self.outputs.append(ValueSpec(name, elem_type, tuple(dims)))

    def weight(self, name: str, shape: Sequence[int], dtype: torch.dtype, load: Callable[[], torch.Tensor]) -> str:
        """Declare an initializer read by `load()` (a tensor of `shape`, converted to `dtype`) at save time."""
        self.weights.append(Weight(name, tuple(shape), dtype, load))
        return name

    def save(self, path: Path, opset: int, functions: Sequence[FunctionProto] = (),
             domains: Sequence[tuple[str, int]] = (), embed_limit: int = EMBED_LIMIT) -> dict[str, Any]:
        """Write `path` (plus `path.data` when the weights are too big to embed); return facts for the manifest."""
        total = sum(w.nbytes for w in self.weights)
        external = total > embed_limit
        data_name = path.name + ".data"
        initializers = []
        offset = 0
        with open(path.parent / data_name, "wb") if external else nullcontext(None) as data:
            for w in track(self.weights, f"writing {path.name}", total=len(self.weights)):
                t = w.load().to(w.dtype).contiguous()
                if tuple(t.shape) != w.shape:
                    raise AssertionError(f"{w.name}: loaded {tuple(t.shape)}, declared {w.shape}")
                raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                proto = TensorProto(name=w.name, dims=list(w.shape), data_type=ELEM_TYPE[w.dtype])
                if data is not None:
                    pad = -offset % 64  # aligned, as onnx's own writer does for mmap
                    data.write(b"\0" * pad)
                    offset += pad
                    data.write(raw)
                    proto.data_location = TensorProto.EXTERNAL
                    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                        proto.external_data.add(key=k, value=v)
                    offset += len(raw)
                else:
                    proto.raw_data = raw
                initializers.append(proto)
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(v.name, v.elem_type, list(v.dims)) for v in self.inputs],
            [helper.make_tensor_value_info(v.name, v.elem_type, list(v.dims)) for v in self.outputs],
            initializers,
        )
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in domains]
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                                  producer_name="saisa-edge",
                                  ir_version=helper.find_min_ir_version_for(opsets[:1], ignore_unknown=True))
        onnx.save_model(model, str(path))
        return {"weights_bytes": total, "external_data": data_name if external else None,
                "nodes": len(self.nodes)}
