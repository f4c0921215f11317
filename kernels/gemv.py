"""Small-M linear: out[M, N] = x[M, K] @ w[N, K]^T (+ bias) for decode batches of a few rows.

With a few rows a linear layer is a weight read: every weight byte is used M times at most, so the kernel's
only job is to stream w at the memory bandwidth in one launch. cuBLAS's GEMV path reaches ~60% of it on
an H100 at the sizes of a 0.6B model's layers and at times adds a split-K reduce kernel. Here each
program owns BLOCK_N output columns for all M rows and reads its [BLOCK_N, K] slab of w exactly once,
reducing over K in registers (no tensor cores: they would sit idle waiting on memory).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import INTERPRETED, let_next_start, next_pow2, pdl_launch, wait_for_previous

MAX_ROWS = 16  # the [rows, BLOCK_N, BLOCK_K] product tile lives in registers


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rm < M, rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    # The weight is constant: its first tile is in flight before the wait for x (launched with PDL, this
    # overlaps the kernel that produces x). It is streamed once, so it should not stay in L2; x should.
    w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0,
                eviction_policy="evict_first")
    wait_for_previous()
    let_next_start()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                    other=0.0, eviction_policy="evict_last").to(tl.float32)
        w_next = tl.load(w_rows + BLOCK_K + kk[None, :], mask=n_mask[:, None] & (kk + BLOCK_K < K)[None, :],
                         other=0.0, eviction_policy="evict_first")
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w = w_next
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def choose_config(m: int, n: int, k: int) -> GemvConfig:
    """From `benchmarks/bench_gemv.py --sweep` on an H200 at Qwen3-0.6B's shapes (1, 2 and 4 rows; the
    sweep is flat near these, within ~0.1 us): 8 columns a program for K <= 1024 (2 warps, 4 at 4 rows),
    4 warps and 2-4 columns over 2048-wide K tiles for longer K, and 8 columns with 2 warps for an LM
    head's long N (82 us against 102 for the 2-column tiles the H100 sweep had picked, cuBLAS 88)."""
    if INTERPRETED:
        return GemvConfig(4, 32, 1)
    if n >= 65536:
        cfg = GemvConfig(8, min(next_pow2(k), 1024), 2)
    elif k <= 1024:
        cfg = GemvConfig(8, next_pow2(k), 2 if m <= 2 else 4)
    else:
        cfg = GemvConfig(4 if k <= 2048 else 2, 2048, 4)
    # past 4 rows, narrow the K tile so that the [rows, BLOCK_N, BLOCK_K] product stays <= 256 values a thread
    cap = 256 * 32 * cfg.num_warps // (next_pow2(m) * cfg.block_n)
    return cfg._replace(block_k=max(16, min(cfg.block_k, cap)))


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for x with at most MAX_ROWS rows (leading dims flattened); fp32 accumulation."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k or w.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} (stride {w.stride()}) need at most "
                         f"{MAX_ROWS} rows, matching K and a row-major weight")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        cfg = config or choose_config(m, n, k)
        _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
            x2, w, bias if bias is not None else w, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=next_pow2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, **pdl_launch(x.device),
        )
    return out.view(*x.shape[:-1], n)
