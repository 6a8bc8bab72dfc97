"""Graph surgery: find the linear layers, tap their inputs, smooth, insert Q/DQ.

Works on any graph of an artifact: a linear layer is a MatMul whose second input is a
`.weight` initializer, or its transpose (a tied LM head reads the embedding that way).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from saisa_edge.artifacts.names import LOGITS
from saisa_edge.calibration.recipe import Recipe

LM_HEAD = "lm_head"


@dataclass(frozen=True)
class Site:
    node: str  # the MatMul's name
    activation: str  # its first input
    weight: str  # the initializer it multiplies by, [in, out] (or [out, in] when `transposed`)
    transposed: bool
    role: str  # "lm_head" or "linear"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _float_weight(init: dict[str, TensorProto], name: str) -> bool:
    t = init.get(name)
    return t is not None and name.endswith(".weight") and len(t.dims) == 2 and \
        t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)


def find_sites(model: onnx.ModelProto) -> list[Site]:
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    producers, consumers = _producers(graph), _consumers(graph)
    sites = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        act, b = node.input
        transposed = False
        if not _float_weight(init, b):
            src = producers.get(b)
            if not (src is not None and src.op_type == "Transpose" and _float_weight(init, src.input[0])
                    and list(helper.get_attribute_value(src.attribute[0])) == [1, 0]):
                continue
            b, transposed = src.input[0], True
        role = LM_HEAD if b.startswith(LM_HEAD) or transposed or _feeds_logits(node, consumers) else "linear"
        sites.append(Site(node.name, act, b, transposed, role))
    return sites


def _feeds_logits(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    after = consumers.get(node.output[0], [])
    return node.output[0] == LOGITS or any(c.op_type == "Cast" and c.output[0] == LOGITS for c in after)


def with_taps(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (their type is the graph's float type)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    outputs = {o.name for o in tapped.graph.output}
    elem = float_type(model)
    for name in names:
        if name not in outputs:
            tapped.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return tapped


def float_type(model: onnx.ModelProto) -> int:
    """The graph's float element type (that of its `.weight` initializers)."""
    for t in model.graph.initializer:
        if t.name.endswith(".weight") and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return int(t.data_type)
    return TensorProto.FLOAT


def smooth(model: onnx.ModelProto, sites: list[Site], scales: dict[str, np.ndarray]) -> tuple[list[Site], list[str]]:
    """Divide activation channel j by s_j and multiply weight row j by it, for the tensors in
    `scales` (SmoothQuant's s, `smoothquant_scale`, or AWQ's searched scales). The division
    folds into the RMSNorm scale that produces the activation where there is one (no op at
    run time); elsewhere (o_proj, down_proj, projector inputs) it is a Mul by 1/s, which
    TensorRT fuses into the producer. Returns the sites (reading the smoothed tensors) and
    the smoothed tensors' names."""
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    producers, consumers = _producers(graph), _consumers(graph)
    by_act: dict[str, list[Site]] = defaultdict(list)
    for site in sites:
        by_act[site.activation].append(site)
    renamed: dict[str, str] = {}
    inserted: dict[str, onnx.NodeProto] = {}  # before the first consumer
    for act, group in by_act.items():
        if act not in scales or any(site.transposed for site in group):
            continue
        weights = [numpy_helper.to_array(init[site.weight]).astype(np.float32) for site in group]
        scale = np.clip(scales[act], 1e-5, None).astype(np.float32)
        for site, w in zip(group, weights):
            _replace(init[site.weight], (w * scale[:, None]).astype(_np_dtype(init[site.weight])))
        norm = producers.get(act)
        gamma = next((i for i in norm.input if i in init and len(init[i].dims) == 1), None) \
            if norm is not None and norm.op_type == "Mul" else None
        if gamma is not None and len(consumers[gamma]) == 1 and len(consumers[act]) == len(group):
            g = numpy_helper.to_array(init[gamma])
            _replace(init[gamma], (g.astype(np.float32) / scale).astype(g.dtype))
            renamed[act] = act
            continue
        dtype = _np_dtype(init[group[0].weight])
        inverse = numpy_helper.from_array((1.0 / scale).astype(dtype), f"{act}.smooth_scale")
        graph.initializer.append(inverse)
        renamed[act] = f"{act}.smoothed"
        inserted[group[0].node] = helper.make_node("Mul", [act, inverse.name], [renamed[act]],
                                                   name=f"{group[0].node}.smooth")
    _insert_before(graph, {k: [v] for k, v in inserted.items()})
    out = [Site(s.node, renamed.get(s.activation, s.activation), s.weight, s.transposed, s.role) for s in sites]
    by_name = {n.name: n for n in graph.node}
    for site in out:
        by_name[site.node].input[0] = site.activation
    return out, sorted(set(renamed.values()))


def smoothquant_scale(channel_amax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = amax_x(j)^alpha / amax_w(j)^(1-alpha) over the weights [in, out] reading x."""
    w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    return np.clip(channel_amax, 1e-5, None) ** alpha / np.clip(w_amax, 1e-5, None) ** (1 - alpha)


def _insert_before(graph: onnx.GraphProto, new_nodes: dict[str, list[onnx.NodeProto]]) -> None:
    ordered = []
    for n in graph.node:
        ordered += new_nodes.get(n.name, [])
        ordered.append(n)
    del graph.node[:]
    graph.node.extend(ordered)


def _np_dtype(t: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))


def _replace(t: TensorProto, value: np.ndarray) -> None:
    t.CopyFrom(numpy_helper.from_array(value, t.name))


def int_codes(x: np.ndarray, scale: np.ndarray | float, levels: float) -> np.ndarray:
    """Symmetric integer quantization (zero point 0), as QuantizeLinear rounds: half to even."""
    return np.clip(np.round(x / scale), -levels, levels)


def weight_scale(w: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The weight [in, out]'s DequantizeLinear scale: one per output channel, or one for the tensor."""
    if recipe.per_channel_weights:
        return np.clip(np.abs(w).max(axis=0), 1e-8, None) / recipe.weight_levels
    return np.asarray(max(float(np.abs(w).max()), 1e-8) / recipe.weight_levels)


def _quantized_bytes(w: np.ndarray, scale: np.ndarray, recipe: Recipe) -> tuple[int, bytes]:
    q = w / scale
    if recipe.precision == "int8":
        return TensorProto.INT8, int_codes(w, scale, recipe.weight_levels).astype(np.int8).tobytes()
    t = torch.from_numpy(np.clip(q, -recipe.weight_levels, recipe.weight_levels)).to(torch.float8_e4m3fn)
    return TensorProto.FLOAT8E4M3FN, t.view(torch.uint8).numpy().tobytes()


def insert_qdq(model: onnx.ModelProto, sites: list[Site], amax: dict[str, float], recipe: Recipe) -> int:
    """Replace each site's inputs by DequantizeLinear(quantized weight) and
    DequantizeLinear(QuantizeLinear(activation)); returns the bytes of weights saved."""
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    elem = float_type(model)
    np_float = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    zero = helper.make_tensor("qdq.zero_point", recipe.elem_type, [], vals=b"\0", raw=True)
    new_inits: list[TensorProto] = [zero]
    new_nodes: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # inserted before the named MatMul
    quantized_acts: dict[str, str] = {}
    saved = 0
    for s in sites:
        node = nodes[s.node]
        if s.activation not in quantized_acts:
            a_scale = f"{s.activation}.scale"
            new_inits.append(numpy_helper.from_array(
                np.asarray(amax[s.activation] / recipe.activation_levels, dtype=np_float), a_scale))
            q, dq = f"{s.activation}.quantized", f"{s.activation}.dequantized"
            new_nodes[s.node] += [
                helper.make_node("QuantizeLinear", [s.activation, a_scale, zero.name], [q], name=f"{s.node}.input_q"),
                helper.make_node("DequantizeLinear", [q, a_scale, zero.name], [dq], name=f"{s.node}.input_dq"),
            ]
            quantized_acts[s.activation] = dq
        w = numpy_helper.to_array(init[s.weight]).astype(np.float32)
        w = w.T if s.transposed else w  # [in, out]
        base = "lm_head.weight" if s.transposed else s.weight
        w_scale = weight_scale(w, recipe)
        if recipe.per_channel_weights:
            zeros = [f"{base}.zero_point"]
            new_inits.append(helper.make_tensor(zeros[0], recipe.elem_type, [w.shape[1]],
                                                vals=b"\0" * w.shape[1], raw=True))
            axis: dict[str, Any] = {"axis": 1}
        else:
            zeros, axis = [zero.name], {}
        data_type, raw = _quantized_bytes(w, w_scale, recipe)
        new_inits += [
            helper.make_tensor(f"{base}.quantized", data_type, list(w.shape), vals=raw, raw=True),
            numpy_helper.from_array(w_scale.astype(np_float), f"{base}.scale"),
        ]
        new_nodes[s.node].append(helper.make_node(
            "DequantizeLinear", [f"{base}.quantized", f"{base}.scale", *zeros], [f"{base}.dequantized"],
            name=f"{s.node}.weight_dq", **axis))
        node.input[0], node.input[1] = quantized_acts[s.activation], f"{base}.dequantized"
        saved += init[s.weight].ByteSize() - len(raw)
    _insert_before(graph, new_nodes)
    _drop_unused(graph)
    graph.initializer.extend(new_inits)
    return saved


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers and nodes (the tied head's Transpose) nothing reads any more."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
