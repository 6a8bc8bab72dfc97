"""Ahead-of-time compilation of the NAAViT kernel to PTX, for one target and one layer shape.

Attributes fixed at engine build (heads, head size, scale, dtype) become compile-time
constants; sizes that vary per call (T, S, N, the batches and the strides that follow
from them) stay kernel arguments. The PTX targets ISA 8.5 (CUDA 12.5), which
JetPack 6's CUDA 12.6 driver and every newer driver load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from saisa_edge.plugins.naavit_kernel import dot_precision, launch_config, naavit_attention_kernel

Size = Any  # an int, or a TensorRT shape expression
PTX_VERSION = 85
NUM_WARPS = 4
DTYPES = ("fp32", "fp16", "bf16")  # the export names, which are also Triton's
# Sizes passed at each launch (int32, in kernel order, after the nine pointers), as
# functions of (B, T, S, N, VB) for contiguous tensors; everything else is compiled in.
RUNTIME_ARGS = ("T", "S", "N", "VB", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vkb",
                "stride_vkh", "stride_ob", "stride_oh", "stride_qpos_b", "stride_kpos_b")


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    shared_bytes: int
    num_warps: int
    sm: int
    ptx_version: str  # as written in the PTX's .version line
    params: int  # parameters of the .entry

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def _signature(dtype: str, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> tuple[dict, dict]:
    if dtype not in DTYPES:
        raise ValueError(f"no NAAViT kernel for {dtype}")
    t = dtype
    sig: dict[str, str] = {n: f"*{t}" for n in ("q_ptr", "k_ptr", "v_ptr", "vk_ptr", "vv_ptr")}
    sig.update(qpos_ptr="*i64", kpos_ptr="*i64", vend_ptr="*i64", out_ptr=f"*{t}")
    seq = ("H", "T", "S", "N", "VB", "scale", "stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh",
           "stride_ks", "stride_vkb", "stride_vkh", "stride_vkn", "stride_ob", "stride_oh", "stride_ot",
           "stride_qpos_b", "stride_kpos_b")
    sig.update({n: "i32" for n in seq})
    # fixed by the layer: heads and per-head strides of contiguous [B, heads, len, D] tensors
    constants: dict[str, object] = {"H": num_heads, "scale": scale, "stride_qt": head_size, "stride_ot": head_size,
                                    "stride_ks": head_size, "stride_vkn": head_size}
    constants.update(GROUPS=num_heads // num_kv_heads, DOT_PRECISION=dot_precision(dtype == "fp32"),
                     **launch_config(head_size))
    for name in constants:
        sig[name] = "constexpr"
    return sig, constants


def compile_naavit(sm: int, dtype: str, num_heads: int, num_kv_heads: int, head_size: int,
                   scale: float) -> CompiledKernel:
    """PTX of the kernel for compute capability `sm` (87: Jetson Orin, 90: H100, ...)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    sig, constants = _signature(dtype, num_heads, num_kv_heads, head_size, scale)
    source = ASTSource(fn=naavit_attention_kernel, signature=sig, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", sm, 32),
                              options={"num_warps": NUM_WARPS, "ptx_version": PTX_VERSION})
    ptx = compiled.asm["ptx"]
    version = re.search(r"^\.version (\S+)", ptx, re.M)
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    if version is None or entry is None:
        raise RuntimeError("Triton produced PTX without a .version or .entry")
    return CompiledKernel(compiled.metadata.name, ptx, int(compiled.metadata.shared), NUM_WARPS, sm,
                          version.group(1), entry.group(2).count(".param"))


def runtime_values(num_heads: int, num_kv_heads: int, head_size: int, t: Size, s: Size, n: Size, vb: Size) -> list[Size]:
    """RUNTIME_ARGS for contiguous q/out [B, H, T, D], k/v [B, KV, S, D], visual [VB, KV, N, D],
    qpos [B, T], kpos [B, S]. The sizes are ints here and TensorRT shape expressions in the
    plugin, so each product keeps the size on the left."""
    h, kv, d = num_heads, num_kv_heads, head_size
    return [t, s, n, vb, t * (h * d), t * d, s * (kv * d), s * d, n * (kv * d), n * d, t * (h * d), t * d, t, s]
