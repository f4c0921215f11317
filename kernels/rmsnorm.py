"""RMSNorm and fused residual-add + RMSNorm, one program per row (HF Llama numerics: normalise in
fp32, cast to the input dtype, then scale by the weight; the residual sum is rounded to the dtype).

Rows may be strided in two levels: a per-head norm over q sliced from a fused qkv output is a
[T, heads, head_dim] view whose rows cannot be flattened without a copy, so row r is read at
(r // inner) * stride_outer + (r % inner) * stride_inner (inner = 1: plain rows)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import INTERPRETED, let_next_start, next_pow2, pdl_launch, wait_for_previous


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, inner, stride_x, stride_xi, stride_r, stride_o,
                     stride_nr, n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_previous()
    let_next_start()
    x = tl.load(x_ptr + (row // inner) * stride_x + (row % inner) * stride_xi + cols, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (xf + r).to(dtype)
        tl.store(new_res_ptr + row * stride_nr + cols, summed, mask=mask)
        xf = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    normed = (xf * rstd).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    if x.shape[-1] != weight.shape[0] or x.stride(-1) != 1:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} (last dim contiguous) does not match "
                         f"weight {tuple(weight.shape)}")
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if x.dim() == 3 and residual is None and x.stride(0) != x.shape[1] * x.stride(1):
        x2, inner, stride_outer, stride_inner = x, x.shape[1], x.stride(0), x.stride(1)  # read in place
    else:
        x2 = x.reshape(-1, n)
        inner, stride_outer, stride_inner = 1, x2.stride(0), 0
    out = torch.empty((rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_res = torch.empty((rows, n), dtype=x.dtype, device=x.device) if residual is not None else out
    r2 = residual.reshape(-1, n) if residual is not None else out
    if residual is not None and r2.shape != (rows, n):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, new_res, inner, stride_outer, stride_inner, r2.stride(0), out.stride(0),
            new_res.stride(0), n, float(eps), HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(n),
            num_warps=1 if INTERPRETED else min(16, max(4, next_pow2(n) // 512)), **pdl_launch(x.device),
        )
    return out.view(x.shape[:-1] + (n,)), new_res.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (rms_norm(x + residual), x + residual), new tensors (inputs untouched)."""
    return _launch(x, residual, weight, eps)
