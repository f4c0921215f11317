"""Rotate-half rotary (HF's `q * cos + rotate_half(q) * sin`) from per-token cos/sin rows, q and k in one
launch. q [T, Hq, D], k [T, Hk, D]; cos, sin [T, R] (R even, <= D): the first R dims of each head rotate,
the rest pass through (partial rotary). cos/sin are used as given (both halves read), so any
cat(freqs, freqs) * scaling form works. Results are new tensors; nothing is read back to the host, so the
launch is CUDA-graph safe. One program per token handles all its q and k heads, math in fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import INTERPRETED, let_next_start, next_pow2, pdl_launch, wait_for_previous


@triton.jit
def _rotate(x_ptr, o_ptr, w_ptr, eps, t, stride_t, stride_h, c1, c2, s1, s2, i, i_mask, p, p_mask,
            HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
            ROT: tl.constexpr, HAS_PASS: tl.constexpr, NORM: tl.constexpr, NORM_ROUND: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)
    h_mask = (h < HEADS)[:, None]
    src = x_ptr + t * stride_t + h[:, None] * stride_h
    dst = o_ptr + t * (HEADS * D) + h[:, None] * D
    mask = h_mask & i_mask[None, :]
    pm = h_mask & p_mask[None, :]
    x1 = tl.load(src + i[None, :], mask=mask, other=0.0)
    x2 = tl.load(src + HALF + i[None, :], mask=mask, other=0.0)
    if HAS_PASS:
        rest = tl.load(src + ROT + p[None, :], mask=pm, other=0.0)
    if NORM:  # per-head RMSNorm first, rounded where the engine's norm kernel rounds (its output dtype)
        dtype = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        squares = tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)
        if HAS_PASS:
            fr = rest.to(tl.float32)
            squares += tl.sum(fr * fr, 1)
        rstd = tl.rsqrt(squares / D + eps)[:, None]
        w1 = tl.load(w_ptr + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
        x1 = (f1 * rstd).to(dtype).to(tl.float32) * w1
        x2 = (f2 * rstd).to(dtype).to(tl.float32) * w2
        if NORM_ROUND:  # the norm's output dtype is the input's (else it is fp32: nothing to round)
            x1 = x1.to(dtype)
            x2 = x2.to(dtype)
        if HAS_PASS:
            wr = tl.load(w_ptr + ROT + p, mask=p_mask, other=0.0).to(tl.float32)[None, :]
            rest = (fr * rstd).to(dtype).to(tl.float32) * wr
            if NORM_ROUND:
                rest = rest.to(dtype)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    out_ty = o_ptr.dtype.element_ty
    tl.store(dst + i[None, :], (x1 * c1 - x2 * s1).to(out_ty), mask=mask)
    tl.store(dst + HALF + i[None, :], (x2 * c2 + x1 * s2).to(out_ty), mask=mask)
    if HAS_PASS:
        tl.store(dst + ROT + p[None, :], rest.to(out_ty), mask=pm)


@triton.jit
def _rotary_cos_sin_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_eps, k_eps,
                           sq_t, sq_h, sk_t, sk_h, scos_t, ssin_t,
                           HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
                           D: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                           PASS_PAD: tl.constexpr, HAS_PASS: tl.constexpr, NORM: tl.constexpr,
                           NORM_ROUND: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    i_mask = i < HALF
    p = tl.arange(0, PASS_PAD)
    p_mask = p < D - 2 * HALF
    wait_for_previous()
    let_next_start()
    c1 = tl.load(cos_ptr + t * scos_t + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * scos_t + HALF + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * ssin_t + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * ssin_t + HALF + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr, qo_ptr, qw_ptr, q_eps, t, sq_t, sq_h, c1, c2, s1, s2, i, i_mask, p, p_mask,
            HQ, HQ_PAD, D, HALF, 2 * HALF, HAS_PASS, NORM, NORM_ROUND)
    _rotate(k_ptr, ko_ptr, kw_ptr, k_eps, t, sk_t, sk_h, c1, c2, s1, s2, i, i_mask, p, p_mask,
            HK, HK_PAD, D, HALF, 2 * HALF, HAS_PASS, NORM, NORM_ROUND)


def _check(q, k, cos, sin) -> int:
    """The rotary width R, or a ValueError naming the offending shape."""
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2 or sin.shape != cos.shape:
        raise ValueError(f"rotary_cos_sin: expected q/k [T, heads, D] and cos/sin [T, R], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    t, d, rot = q.shape[0], q.shape[2], cos.shape[1]
    if k.shape[0] != t or k.shape[2] != d or cos.shape[0] != t:
        raise ValueError(f"rotary_cos_sin: token counts / head sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"cos {tuple(cos.shape)}")
    if rot % 2 or rot > d:
        raise ValueError(f"rotary_cos_sin: rotary dim {rot} must be even and <= head_dim {d}")
    return rot


def rotary_cos_sin_ref(q, k, cos, sin):
    """Torch reference: HF's rotate-half apply on the first R dims, the rest passed through."""
    rot = _check(q, k, cos, sin)
    c, s = cos[:, None, :], sin[:, None, :]

    def one(x):
        xr = x[..., :rot]
        half = torch.cat((-xr[..., rot // 2:], xr[..., : rot // 2]), dim=-1)
        return torch.cat((xr * c + half * s, x[..., rot:].to(torch.result_type(xr, c))), dim=-1)

    return one(q), one(k)


def rotary_cos_sin(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   norms: tuple[torch.Tensor, float, torch.Tensor, float] | None = None):
    """(q_rot, k_rot), new contiguous tensors in the dtype torch would give `q * cos`.

    norms = (q weight, q eps, k weight, k eps): each head of q and k is RMS-normalised first (the engine
    RMSNorm's numerics, over the head dim), in the same launch."""
    rot = _check(q, k, cos, sin)
    in_dtype = q.dtype
    if norms is not None:
        qw, q_eps, kw, k_eps = norms
        if qw.shape != (q.shape[2],) or kw.shape != (q.shape[2],) or qw.dtype != kw.dtype or k.dtype != in_dtype:
            raise ValueError(f"rotary_cos_sin: norm weights {tuple(qw.shape)} / {tuple(kw.shape)} must both be "
                             f"[head_dim={q.shape[2]}] of one dtype, over q and k of one dtype")
        in_dtype = torch.promote_types(q.dtype, qw.dtype)  # what the norm would have returned
    else:
        qw, q_eps, kw, k_eps = cos, 0.0, cos, 0.0  # never read
    out_dtype = torch.promote_types(in_dtype, cos.dtype)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    t, hq, d = q.shape
    hk = k.shape[1]
    qo = torch.empty((t, hq, d), dtype=out_dtype, device=q.device)
    ko = torch.empty((t, hk, d), dtype=out_dtype, device=k.device)
    if t == 0:
        return qo, ko
    rest = d - rot
    _rotary_cos_sin_kernel[(t,)](
        q, k, qo, ko, cos, sin, qw, kw, float(q_eps), float(k_eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        HQ=hq, HK=hk, HQ_PAD=next_pow2(hq), HK_PAD=next_pow2(hk), D=d, HALF=rot // 2,
        HALF_PAD=next_pow2(rot // 2), PASS_PAD=next_pow2(rest), HAS_PASS=rest > 0, NORM=norms is not None,
        NORM_ROUND=in_dtype == q.dtype,
        num_warps=1 if INTERPRETED else 4, **pdl_launch(q.device),
    )
    return qo, ko
