"""The `saisa::NAAViTAttention` kernel in Triton: flash attention over two key segments.

One program takes a block of queries of one (batch, head). It streams the image's
keys/values (read where they lie: one copy per image, shared by the batch when
Bv = 1, never concatenated) and then the text keys/values, with an online softmax in
fp32. Visibility is the contract's (`export/naavit.py`): a visual key is visible to a
query at or after the image's end, a text key to queries at or after its position.
GQA: query head h reads K/V head h // (H / KV).

The same function runs under Triton's CPU interpreter (tests), on a GPU from PyTorch
(`scripts/gpu_selftest.sh`), and compiled ahead of time to PTX for the TensorRT plugin.
Its parameters follow TensorRT's AOT launch: the input pointers, then the scalar sizes
(`RUNTIME_ARGS`, which `aot_impl` returns as extra args), then the output pointer; every
launcher calls it that way. Layer constants (heads, scale, block sizes) are constexprs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import triton
import triton.language as tl

Size = Any  # an int, or a TensorRT shape expression
BLOCK_M = 16  # queries per program (decode has T = 1: a small block wastes less)
NUM_WARPS = 4
MAX_HEAD_DIM = 256
SHARED_LIMIT = 48 * 1024  # shared memory a launch may ask for without opting in to more
# (keys per step, pipeline stages) by (fp32, BLOCK_D > 128): the largest that keep every
# compiled variant's shared memory (Triton's is all dynamic, sized by the launch) within SHARED_LIMIT (fp32 tiles are twice the bytes, and fp32's exact
# dot products stage more through shared memory); tests/test_plugins.py measures each.
_KEY_BLOCKS = {(False, False): (64, 3), (False, True): (32, 2), (True, False): (32, 2), (True, True): (16, 1)}


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
    q_ptr, k_ptr, v_ptr, vk_ptr, vv_ptr, qpos_ptr, kpos_ptr, vend_ptr,  # inputs, the op's order
    T, S, N, VB,  # sizes: RUNTIME_ARGS
    out_ptr,  # the output, after the sizes as TensorRT passes it
    H: tl.constexpr, SCALE: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Every tensor is contiguous (TensorRT's linear format), so offsets follow from the
    sizes; the output is laid out like q."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    kv_heads = H // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    dim_ok = dims < HEAD_DIM
    q_offsets = (b * H + h) * T * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = (q * SCALE).to(q.dtype)  # the scale goes on the query first, in the input dtype
    qpos = tl.load(qpos_ptr + b * T + rows, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # visual segment: all keys visible to queries at or after the image
    vb = b % VB  # VB = 1: the whole batch reads one image's keys
    vend = tl.load(vend_ptr + vb)
    sees_image = qpos >= vend
    visual_offset = (vb * kv_heads + kvh) * N * HEAD_DIM
    vk_base, vv_base = vk_ptr + visual_offset, vv_ptr + visual_offset
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(vk_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=tile, other=0.0)
        v = tl.load(vv_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=tile, other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, sees_image[:, None] & col_ok[None, :], m_i, l_i, acc, DOT_PRECISION)

    # text segment: causal by position
    text_offset = (b * kv_heads + kvh) * S * HEAD_DIM
    k_base, v_base = k_ptr + text_offset, v_ptr + text_offset
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        kpos = tl.load(kpos_ptr + b * S + cols, mask=col_ok, other=0)
        tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=tile, other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + dims[None, :], mask=tile, other=0.0)
        visible = (kpos[None, :] <= qpos[:, None]) & col_ok[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


_PARAMS = naavit_attention_kernel.arg_names  # (the interpreter's stand-in has these too)
RUNTIME_ARGS = tuple(_PARAMS[8:_PARAMS.index("out_ptr")])  # the sizes, TensorRT's extra args


def runtime_args(query: Sequence[Size], key: Sequence[Size], visual_key: Sequence[Size]) -> list[Size]:
    """RUNTIME_ARGS from the shapes of query [B, H, T, D], key [B, KV, S, D] and visual_key
    [VB, KV, N, D]: ints from PyTorch, shape expressions in the TensorRT plugin."""
    return [query[2], key[2], visual_key[2], visual_key[0]]


def launch_grid(batch: int, heads: int, queries: int) -> tuple[int, int, int]:
    """One program per BLOCK_M queries of one (batch, head); the plugin's aot_impl says the
    same with TensorRT's shape expressions."""
    return triton.cdiv(queries, BLOCK_M), batch * heads, 1


def constants(dtype: str, num_heads: int, num_kv_heads: int, head_size: int, scale: float) -> dict[str, object]:
    """The constexprs of one layer's kernel (`dtype`: fp32, fp16 or bf16)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not 0 < head_size <= MAX_HEAD_DIM:
        raise ValueError(f"head size {head_size}: the NAAViT kernel takes 1 to {MAX_HEAD_DIM}")
    block_d = max(16, triton.next_power_of_2(head_size))
    block_n, _ = _key_blocks(dtype, head_size)
    return {"H": num_heads, "SCALE": scale, "GROUPS": num_heads // num_kv_heads, "HEAD_DIM": head_size,
            "BLOCK_D": block_d, "BLOCK_M": BLOCK_M, "BLOCK_N": block_n,
            "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}  # fp32: exact products, as the ONNX body


def options(dtype: str, head_size: int) -> dict[str, int]:
    """Launch options: warps, and the software pipeline's depth (each stage holds one more
    K and V tile in shared memory)."""
    return {"num_warps": NUM_WARPS, "num_stages": _key_blocks(dtype, head_size)[1]}


def _key_blocks(dtype: str, head_size: int) -> tuple[int, int]:
    return _KEY_BLOCKS[dtype == "fp32", head_size > 128]
