"""The plugin's PTX launched through the CUDA driver as a TensorRT engine launches it:
loaded from text, the input pointers, the int32 extra args, the output pointer, the grid,
block and shared memory `aot_impl` describes. GPU only (`selfcheck --ptx`); it checks the
PTX itself (ISA version on this driver, parameter layout) where TensorRT is not installed.

Triton's hidden scratch pointers, which TensorRT does not pass, are given as null here:
the driver copies one value per PTX parameter, and both buffers have size 0 (`aot`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from saisa_edge.plugins.aot import CompiledKernel, compile_naavit
from saisa_edge.plugins.naavit_kernel import launch_grid, runtime_args
from saisa_edge.plugins.naavit_torch import DTYPE_NAMES


def _check(result: tuple[Any, ...], what: str) -> Any:
    from cuda.bindings import driver

    status, *value = result
    if status != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {status}")
    return value[0] if value else None


def kernel_args(kernel: CompiledKernel, inputs: Sequence[int], sizes: Sequence[int],
                out: int) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    """cuLaunchKernel's (values, ctypes) for the input addresses, the sizes and the output
    address in TensorRT's order, then a null for each of Triton's hidden pointers."""
    values = (*inputs, *sizes, out, *[0] * kernel.hidden_params)
    types = (*[ctypes.c_void_p] * len(inputs), *[ctypes.c_int32] * len(sizes),
             *[ctypes.c_void_p] * (1 + kernel.hidden_params))
    if len(values) != kernel.params:
        raise RuntimeError(f"{kernel.name}: {len(values)} arguments for {kernel.params} PTX parameters")
    return values, types


def launch_ptx(kernel: CompiledKernel, inputs: Sequence[torch.Tensor], sizes: Sequence[int],
               grid: tuple[int, int, int], out: torch.Tensor) -> None:
    """Run `kernel` on the current CUDA stream and wait for it; raises on any driver error."""
    from cuda.bindings import driver

    torch.cuda.current_stream().synchronize()  # torch's context is current from here on
    module = _check(driver.cuModuleLoadData(kernel.ptx.encode() + b"\0"), "cuModuleLoadData (PTX JIT)")
    try:
        function = _check(driver.cuModuleGetFunction(module, kernel.name.encode()), "cuModuleGetFunction")
        values, types = kernel_args(kernel, [t.data_ptr() for t in inputs], sizes, out.data_ptr())
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        _check(driver.cuLaunchKernel(function, *grid, kernel.threads, 1, 1, kernel.shared_bytes, stream,
                                     (tuple(values), tuple(types)), 0), "cuLaunchKernel")
        _check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize (the kernel's run)")
    finally:
        _check(driver.cuModuleUnload(module), "cuModuleUnload")


def ptx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vk: torch.Tensor, vv: torch.Tensor,
                  qpos: torch.Tensor, kpos: torch.Tensor, vend: torch.Tensor, scale: float) -> torch.Tensor:
    """`naavit_torch.naavit_attention`, computed by the AOT PTX for this GPU."""
    major, minor = torch.cuda.get_device_capability(q.device)
    b, h, t, d = q.shape
    kernel = compile_naavit(major * 10 + minor, DTYPE_NAMES[q.dtype], h, k.shape[1], d, scale)
    inputs = [x.contiguous() for x in (q, k, v, vk, vv, qpos, kpos, vend)]
    out = torch.empty_like(inputs[0])
    launch_ptx(kernel, inputs, runtime_args(q.shape, k.shape, vk.shape), launch_grid(b, h, t), out)
    return out
