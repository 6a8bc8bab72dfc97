"""The `saisa::NAAViTAttention` kernel in Triton: flash attention over two key segments.

One program takes a block of queries of one (batch, head). It streams the image's
keys/values (read where they lie: one copy per image, shared by the batch when
Bv = 1, never concatenated) and then the text keys/values, with an online softmax in
fp32. Visibility is the contract's (`export/naavit.py`): a visual key is visible to a
query at or after the image's end, a text key to queries at or after its position.
GQA: query head h reads K/V head h // (H / KV).

The same function runs under Triton's CPU interpreter (tests), on a GPU from PyTorch
(`scripts/gpu_selftest.sh`), and compiled ahead of time to PTX for the TensorRT plugin.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_M = 16  # queries per program (decode has T = 1: a small block wastes less)
BLOCK_N = 64  # keys per step


@triton.jit
def _softmax_step(q, k, v, visible, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: scores in the input dtype, masked to `visible`,
    folded into the running max `m_i`, sum `l_i` and output `acc` (fp32)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(q.dtype).to(tl.float32)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block no query sees yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def naavit_attention_kernel(
    q_ptr, k_ptr, v_ptr, vk_ptr, vv_ptr, qpos_ptr, kpos_ptr, vend_ptr, out_ptr,
    H, T, S, N, VB, scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vkb, stride_vkh, stride_vkn,
    stride_ob, stride_oh, stride_ot,
    stride_qpos_b, stride_kpos_b,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = (q * scale).to(q.dtype)  # the scale goes on the query first, in the input dtype
    qpos = tl.load(qpos_ptr + b * stride_qpos_b + rows, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # visual segment: all keys visible to queries at or after the image
    vb = b % VB  # VB = 1: the whole batch reads one image's keys
    vend = tl.load(vend_ptr + vb)
    sees_image = qpos >= vend
    vk_base = vk_ptr + vb * stride_vkb + kvh * stride_vkh
    vv_base = vv_ptr + vb * stride_vkb + kvh * stride_vkh
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(vk_base + cols[:, None] * stride_vkn + dims[None, :], mask=tile, other=0.0)
        v = tl.load(vv_base + cols[:, None] * stride_vkn + dims[None, :], mask=tile, other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, sees_image[:, None] & col_ok[None, :], m_i, l_i, acc, DOT_PRECISION)

    # text segment: causal by position
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_kb + kvh * stride_kh
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        kpos = tl.load(kpos_ptr + b * stride_kpos_b + cols, mask=col_ok, other=0)
        tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=tile, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_ks + dims[None, :], mask=tile, other=0.0)
        visible = (kpos[None, :] <= qpos[:, None]) & col_ok[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def launch_config(head_dim: int) -> dict[str, int]:
    """Compile-time constants shared by the PyTorch launcher and the AOT plugin."""
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}


def dot_precision(is_fp32: bool) -> str:
    """fp32 inputs get exact products (no TF32), as the ONNX function body computes them."""
    return "ieee" if is_fp32 else "tf32"
