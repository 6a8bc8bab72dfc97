"""The NAAViT kernel from PyTorch (GPU, or CPU under TRITON_INTERPRET=1), and the
contract written plainly in PyTorch as the reference it is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saisa_edge.model.attention import attend
from saisa_edge.plugins.naavit_kernel import constants, launch_grid, naavit_attention_kernel, options, runtime_args

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def naavit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vk: torch.Tensor, vv: torch.Tensor,
                     qpos: torch.Tensor, kpos: torch.Tensor, vend: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KV, S, D], vk/vv [Bv, KV, N, D], qpos [B, T], kpos [B, S],
    vend [Bv] -> [B, H, T, D]. Bv is 1 (shared image) or B."""
    inputs = [x.contiguous() for x in (q, k, v, vk, vv, qpos, kpos, vend)]
    grid = launch_grid(q.shape[0], q.shape[1], q.shape[2])
    return launch(inputs, runtime_args(q.shape, k.shape, vk.shape), grid, scale)


def launch(inputs: Sequence[torch.Tensor], sizes: Sequence[int], grid: tuple[int, ...], scale: float) -> torch.Tensor:
    """The kernel called as TensorRT calls the AOT plugin: the eight contiguous inputs, the
    sizes (RUNTIME_ARGS), then the output."""
    q, k = inputs[0], inputs[1]
    dtype, (_, h, _, d) = DTYPE_NAMES[q.dtype], q.shape
    out = torch.empty_like(q)
    naavit_attention_kernel[grid](*inputs, *sizes, out, **constants(dtype, h, k.shape[1], d, scale),
                                  **options(dtype, d))
    return out


def naavit_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vk: torch.Tensor, vv: torch.Tensor,
                     qpos: torch.Tensor, kpos: torch.Tensor, vend: torch.Tensor, scale: float) -> torch.Tensor:
    """The contract in fp32: visual keys first (expanded over the batch), then text keys."""
    b, h, t, d = q.shape
    vk32, vv32 = (x.float().expand(b, -1, -1, -1) for x in (vk, vv))
    keys = torch.cat([vk32, k.float()], dim=2)
    values = torch.cat([vv32, v.float()], dim=2)
    sees_image = (qpos[:, :, None] >= vend.expand(b)[:, None, None]).expand(b, t, vk.shape[2])
    sees_text = kpos[:, None, :] <= qpos[:, :, None]
    mask = torch.cat([sees_image, sees_text], dim=2)
    out = attend(q.float() * scale * d**0.5, keys, values, mask)  # attend scales by 1/sqrt(d)
    return out.reshape(b, t, h, d).transpose(1, 2).to(q.dtype)
