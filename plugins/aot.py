"""Ahead-of-time compilation of the NAAViT kernel to PTX, for one target and one layer shape.

Attributes fixed at engine build (heads, head size, scale, dtype) become compile-time
constants; the sizes that vary per call (RUNTIME_ARGS) stay kernel arguments. The PTX
targets ISA 8.5 (CUDA 12.5), which JetPack 6's CUDA 12.6 driver and every newer driver load.

TensorRT launches the kernel with exactly the op's tensors and the extra args; Triton adds
hidden scratch-buffer pointers after them, which TensorRT does not pass. That is safe only
while the kernel needs no scratch memory, so `check_launchable` refuses a kernel that does,
and one whose shared memory (all dynamic in Triton's PTX: the launch's `shared_mem` sizes
it) exceeds what a launch gets without opting in.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from saisa_edge.plugins.naavit_kernel import SHARED_LIMIT, constants, naavit_attention_kernel, options

PTX_VERSION = 85
DTYPES = ("fp32", "fp16", "bf16")  # the export names, which are also Triton's


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    shared_bytes: int
    num_warps: int
    sm: int
    ptx_version: str  # as written in the PTX's .version line
    params: int  # parameters of the .entry
    hidden_params: int  # of those, Triton's own after the kernel's (scratch pointers)

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def _signature(dtype: str) -> dict[str, str]:
    """Triton types of the kernel's parameters: the eight inputs in the op's order (the
    positions are int64), the int32 sizes, the output; constexprs are filled in later."""
    pointers = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "vk_ptr", "vv_ptr", "out_ptr"), f"*{dtype}")
    pointers.update(dict.fromkeys(("qpos_ptr", "kpos_ptr", "vend_ptr"), "*i64"))
    return {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32")
            for p in naavit_attention_kernel.params}


def check_launchable(metadata: Any, ptx: str, runtime_params: int) -> tuple[int, int]:
    """(parameter count, hidden ones) of a compiled kernel TensorRT can launch; raises otherwise."""
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise RuntimeError("Triton produced PTX without an .entry")
    params = entry.group(2).count(".param")
    scratch = {k: getattr(metadata, k, 0) for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()):
        raise RuntimeError(f"{metadata.name} needs Triton scratch memory ({scratch}), which TensorRT's AOT launch "
                           "does not provide")
    if params < runtime_params:
        raise RuntimeError(f"{metadata.name} has {params} PTX parameters, fewer than its {runtime_params} arguments")
    if metadata.shared > SHARED_LIMIT:
        raise RuntimeError(f"{metadata.name} needs {metadata.shared} bytes of shared memory, over the "
                           f"{SHARED_LIMIT} a launch gets; use smaller blocks")
    return params, params - runtime_params


@functools.lru_cache(maxsize=None)
def compile_naavit(sm: int, dtype: str, num_heads: int, num_kv_heads: int, head_size: int,
                   scale: float) -> CompiledKernel:
    """PTX of the kernel for compute capability `sm` (87: Jetson Orin, 90: H100, ...).
    Cached: TensorRT asks once per layer, profile and tactic, for the same few shapes."""
    if dtype not in DTYPES:
        raise ValueError(f"no NAAViT kernel for {dtype}")
    sig = _signature(dtype)
    source = ASTSource(fn=naavit_attention_kernel, signature=sig,
                       constexprs=constants(dtype, num_heads, num_kv_heads, head_size, scale))
    compiled = triton.compile(source, target=GPUTarget("cuda", sm, 32),
                              options={**options(dtype, head_size), "ptx_version": PTX_VERSION})
    ptx = compiled.asm["ptx"]
    version = re.search(r"^\.version (\S+)", ptx, re.M)
    if version is None:
        raise RuntimeError("Triton produced PTX without a .version")
    params, hidden = check_launchable(compiled.metadata, ptx, sum(t != "constexpr" for t in sig.values()))
    return CompiledKernel(compiled.metadata.name, ptx, int(compiled.metadata.shared),
                          int(compiled.metadata.num_warps), sm, version.group(1), params, hidden)
