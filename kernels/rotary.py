"""Fused rotary embedding, applied in place to q [T, Hq*D] and k [T, Hk*D] (rows may be strided
views of a fused qkv projection). cos_sin_cache [max_position, rot_dim] holds cos in its first
rot_dim/2 columns and sin in the rest; the first rot_dim dims of each head rotate (partial rotary).
Neox style rotates the two halves; interleaved (GPT-J) style rotates pairs (2i, 2i+1).
One program per token handles all its q and k heads."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import INTERPRETED, let_next_start, next_pow2, pdl_launch, wait_for_previous


@triton.jit
def _rotate_heads(x_ptr, row_stride, t, cos, sin, i, i_mask,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
                  HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)
    if IS_NEOX:
        first, second = i, i + HALF
    else:
        first, second = 2 * i, 2 * i + 1
    base = x_ptr + t * row_stride + h[:, None] * HEAD_SIZE
    mask = (h < NUM_HEADS)[:, None] & i_mask[None, :]
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + first[None, :], (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(base + second[None, :], (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_q, stride_k, stride_cache,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_PAD: tl.constexpr,
                   K_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, HALF: tl.constexpr,
                   HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    wait_for_previous()
    let_next_start()
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    i_mask = i < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, stride_q, t, cos, sin, i, i_mask, NUM_Q_HEADS, Q_PAD, HEAD_SIZE, HALF, IS_NEOX)
    _rotate_heads(k_ptr, stride_k, t, cos, sin, i, i_mask, NUM_K_HEADS, K_PAD, HEAD_SIZE, HALF, IS_NEOX)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool) -> None:
    """Rotate q [T, Hq*head_size] and k [T, Hk*head_size] in place at `positions` [T]."""
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot > head_size:
        raise ValueError(f"apply_rotary: rotary dim {rot} must be even and <= head_size {head_size}")
    t = positions.numel()
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 2 or x.shape[0] != t or x.shape[1] % head_size or x.stride(1) != 1:
            raise ValueError(f"apply_rotary: {name} must be [T={t}, heads*{head_size}] with contiguous "
                             f"rows, got {tuple(x.shape)} strides {x.stride()}")
    if cos_sin_cache.stride(1) != 1:
        raise ValueError("apply_rotary: cos_sin_cache rows must be contiguous")
    if t == 0:
        return
    hq, hk = q.shape[1] // head_size, k.shape[1] // head_size
    _rotary_kernel[(t,)](
        positions, q, k, cos_sin_cache, q.stride(0), k.stride(0), cos_sin_cache.stride(0),
        NUM_Q_HEADS=hq, NUM_K_HEADS=hk, Q_PAD=next_pow2(hq), K_PAD=next_pow2(hk),
        HEAD_SIZE=head_size, HALF=rot // 2, HALF_PAD=next_pow2(rot // 2), IS_NEOX=is_neox,
        num_warps=1 if INTERPRETED else 4, **pdl_launch(q.device),
    )
