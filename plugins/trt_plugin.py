"""`saisa::NAAViTAttention` as a TensorRT plugin (TensorRT 10.9+ `tensorrt.plugin`, AOT).

At engine build TensorRT calls `naavit_aot` once per layer shape; it compiles the Triton
kernel to PTX for this GPU and describes the launch with shape expressions, so the
engine carries the kernel and runs with no Python. Importing this module registers
the plugin. The TensorRT-facing code is only this; the kernel, its compilation and the
launch arithmetic are tested without TensorRT (`naavit_kernel`, `aot`).
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp

from saisa_edge.export import naavit
from saisa_edge.plugins.aot import RUNTIME_ARGS, compile_naavit, runtime_values
from saisa_edge.plugins.naavit_kernel import BLOCK_M

_DTYPES = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16"}
_build_sm: list[int] = []  # compute capability the engine is built for, set by `configure`


def configure(sm: int) -> None:
    """Compile kernels for compute capability `sm` (the build's target GPU)."""
    _build_sm[:] = [sm]


@trtp.register(f"{naavit.DOMAIN}::{naavit.OP_TYPE}")
def naavit_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                visual_key: trtp.TensorDesc, visual_value: trtp.TensorDesc, query_pos: trtp.TensorDesc,
                key_pos: trtp.TensorDesc, visual_end: trtp.TensorDesc, num_heads: int, num_kv_heads: int,
                head_size: int, scale: float) -> trtp.TensorDesc:
    """The output has the query's shape and type."""
    return query.like()


@trtp.aot_impl(f"{naavit.DOMAIN}::{naavit.OP_TYPE}")
def naavit_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
               visual_key: trtp.TensorDesc, visual_value: trtp.TensorDesc, query_pos: trtp.TensorDesc,
               key_pos: trtp.TensorDesc, visual_end: trtp.TensorDesc, num_heads: int, num_kv_heads: int,
               head_size: int, scale: float, outputs: tuple[trtp.TensorDesc], tactic: int,
               ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    if not _build_sm:
        raise RuntimeError("saisa plugin: configure(sm) before building")
    kernel = compile_naavit(_build_sm[0], _DTYPES[query.dtype], num_heads, num_kv_heads, head_size, scale)
    b, t = query.shape_expr[0], query.shape_expr[2]
    s, n, vb = key.shape_expr[2], visual_key.shape_expr[2], visual_key.shape_expr[0]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(t, BLOCK_M)
    launch.grid_y = b * num_heads
    launch.block_x = kernel.threads
    launch.shared_mem = kernel.shared_bytes
    values = runtime_values(num_heads, num_kv_heads, head_size, t, s, n, vb)
    extra = trtp.SymIntExprs(len(RUNTIME_ARGS))
    for i, v in enumerate(values):
        extra[i] = trtp.SymInt32(v)
    return kernel.name, kernel.ptx, launch, extra
