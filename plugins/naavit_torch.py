"""The NAAViT kernel from PyTorch (GPU, or CPU under TRITON_INTERPRET=1), and the
contract written plainly in PyTorch as the reference it is checked against."""

from __future__ import annotations

import torch
import triton

from saisa_edge.model.attention import attend
from saisa_edge.plugins.naavit_kernel import BLOCK_M, dot_precision, launch_config, naavit_attention_kernel


def naavit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vk: torch.Tensor, vv: torch.Tensor,
                     qpos: torch.Tensor, kpos: torch.Tensor, vend: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KV, S, D], vk/vv [Bv, KV, N, D], qpos [B, T], kpos [B, S],
    vend [Bv] -> [B, H, T, D]. Bv is 1 (shared image) or B."""
    b, h, t, d = q.shape
    kv, s, n = k.shape[1], k.shape[2], vk.shape[2]
    q, k, v, vk, vv = (x.contiguous() for x in (q, k, v, vk, vv))
    qpos, kpos, vend = qpos.contiguous(), kpos.contiguous(), vend.contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(t, BLOCK_M), b * h)
    naavit_attention_kernel[grid](
        q, k, v, vk, vv, qpos, kpos, vend, out,
        h, t, s, n, vk.shape[0], scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        vk.stride(0), vk.stride(1), vk.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qpos.stride(0), kpos.stride(0),
        GROUPS=h // kv, DOT_PRECISION=dot_precision(q.dtype == torch.float32), **launch_config(d),
    )
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
