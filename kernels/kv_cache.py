"""Paged KV-cache write: k, v [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] by slot."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import let_next_start, next_pow2, pdl_launch, wait_for_previous


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    t = tl.program_id(0)
    wait_for_previous()
    let_next_start()
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token of a CUDA-graph batch
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    idx = tl.arange(0, BLOCK_HD)
    mask = idx < NUM_KV_HEADS * HEAD_DIM
    h = idx // HEAD_DIM
    d = idx % HEAD_DIM
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + h * stride_kch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter each token's k/v into its cache slot (block_id * block_size + offset); -1 is skipped."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv_cache: k and v must both be [T, Hkv, D], got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    t, hkv, d = k.shape
    if k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"write_kv_cache: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} "
                         f"do not match k {tuple(k.shape)}")
    if slot_mapping.shape[0] < t:
        raise ValueError(f"write_kv_cache: slot_mapping has {slot_mapping.shape[0]} slots for {t} tokens")
    if t == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("write_kv_cache: the head dimension must be contiguous")
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=hkv, HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1], BLOCK_HD=next_pow2(hkv * d), **pdl_launch(k.device),
    )
