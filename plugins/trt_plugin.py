"""`saisa::NAAViTAttention` as a TensorRT plugin (TensorRT 10.9+ `tensorrt.plugin`, AOT).

At engine build TensorRT calls `naavit_aot` once per layer shape; it compiles the Triton
kernel to PTX for this GPU and describes the launch with shape expressions, so the
engine carries the kernel and runs with no Python. Importing this module registers
the plugin. The TensorRT-facing code is only this; the kernel, its compilation and the
launch arithmetic are tested without TensorRT (`naavit_kernel`, `aot`).

No `from __future__ import annotations` here: `tensorrt.plugin` checks the annotations
with `issubclass`, which needs the classes, not their names as strings. Attributes are
annotated as arrays because that is how TensorRT hands them over (the ONNX parser passes
an INT or FLOAT attribute as a one-element int32 or float32 field, and numpy 2.4 refuses
`int()` of a one-element array); the functions read element 0. The array types are
spelled on `np.ndarray` itself, not as `npt.NDArray[...]`: from numpy 2.5 (Python 3.12+)
`NDArray` is a `type` alias, whose subscript is no class to that `issubclass` (seen on a
GPU machine, 2026-11-26).
"""

from typing import Any

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp
from saisa_edge.export import naavit
from saisa_edge.plugins.aot import compile_naavit
from saisa_edge.plugins.naavit_kernel import BLOCK_M, runtime_args

PLUGIN_ID = f"{naavit.DOMAIN}::{naavit.OP_TYPE}"
_DTYPES = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16"}
_build_sm: list[int] = []  # compute capability the engine is built for, set by `configure`
Ints = np.ndarray[tuple[Any, ...], np.dtype[np.int32]]
Floats = np.ndarray[tuple[Any, ...], np.dtype[np.float32]]


def configure(sm: int) -> None:
    """Compile kernels for compute capability `sm` (the build's target GPU)."""
    _build_sm[:] = [sm]


@trtp.register(PLUGIN_ID)
def naavit_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                visual_key: trtp.TensorDesc, visual_value: trtp.TensorDesc, query_pos: trtp.TensorDesc,
                key_pos: trtp.TensorDesc, visual_end: trtp.TensorDesc, num_heads: Ints, num_kv_heads: Ints,
                head_size: Ints, scale: Floats) -> trtp.TensorDesc:
    """The output has the query's shape and type."""
    return query.like()


@trtp.aot_impl(PLUGIN_ID)
def naavit_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
               visual_key: trtp.TensorDesc, visual_value: trtp.TensorDesc, query_pos: trtp.TensorDesc,
               key_pos: trtp.TensorDesc, visual_end: trtp.TensorDesc, num_heads: Ints, num_kv_heads: Ints,
               head_size: Ints, scale: Floats, outputs: tuple[trtp.TensorDesc], tactic: int,
               ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    if not _build_sm:
        raise RuntimeError("saisa plugin: configure(sm) before building")
    heads = int(num_heads[0])
    kernel = compile_naavit(_build_sm[0], _DTYPES[query.dtype], heads, int(num_kv_heads[0]), int(head_size[0]),
                            float(scale[0]))
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(query.shape_expr[2], BLOCK_M)
    launch.grid_y = query.shape_expr[0] * heads
    launch.block_x = kernel.threads
    launch.shared_mem = kernel.shared_bytes
    sizes = runtime_args(query.shape_expr, key.shape_expr, visual_key.shape_expr)
    extra = trtp.SymIntExprs(len(sizes))
    for i, size in enumerate(sizes):
        extra[i] = trtp.SymInt32(size)
    return kernel.name, kernel.ptx, launch, extra
