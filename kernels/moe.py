"""Triton grouped GEMM for mixture-of-experts layers (reference: kernels/moe_reference.py).

The T*K (token, expert) assignments are sorted by expert and each expert's run is padded to a
multiple of BLOCK_M, so every BLOCK_M block of sorted rows belongs to one expert. Two kernels then
walk those blocks:
  1. gate_up: h[f] = act(x[t] @ W_gate[e]^T) * (x[t] @ W_up[e]^T)        f = t*K + k, into [T*K, I]
  2. down:    y[f] = topk_weight[f] * (h[f] @ W2[e]^T)                     into [T*K, H]
and the K rows of each token are summed. The alignment is done on the device with no host sync,
into buffers sized by an upper bound, so kernels skip the blocks past the real padded length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from porter.kernels.moe_reference import ACTIVATIONS, check_moe_shapes

# The interpreter computes bf16/fp16 wrongly unless loads are cast to fp32 straight away.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class MoEConfig:
    block_m: int
    gate_up_n: int
    gate_up_k: int
    down_n: int
    down_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def pick_config(num_tokens: int, top_k: int, num_experts: int, interpreted: bool = _INTERPRETED) -> MoEConfig:
    """Tiles by the mean rows per expert. Chosen from a sweep on an H100 (benchmarks/bench_moe.py
    --sweep, Mixtral and Qwen2-MoE shapes, 1-4096 tokens): at small counts the kernels stream the
    weights, so thin tiles with a long K step keep more loads in flight; past ~32 rows per expert,
    128x128 tiles win even though each expert's run is padded to 128 rows."""
    if interpreted:  # few, small tiles: each interpreted tile iteration costs milliseconds
        return MoEConfig(16, 32, 32, 32, 32, group_m=1)
    rows = num_tokens * top_k / num_experts
    if rows <= 8:
        return MoEConfig(16, 32, 256, 32, 256, group_m=1, num_warps=4, num_stages=3)
    if rows <= 32:
        return MoEConfig(32, 64, 128, 64, 128, num_warps=4, num_stages=3)
    return MoEConfig(128, 128, 64, 128, 64, num_warps=8, num_stages=3)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """Sort the flattened assignments by expert, padding each expert's run to a multiple of block_m.

    Returns (sorted_ids [P], block_expert [P // block_m], num_padded [1]) where P is an upper bound
    of the padded length: sorted_ids holds flat indices t*K+k (padding = T*K), block_expert the expert
    of each block, num_padded the real padded length. Entries past num_padded are left unset (the
    GEMM kernels stop there). One launch, no host synchronisation: CUDA-graph safe.
    """
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    bound = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.empty(bound, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(bound // block_m, dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    _moe_align_kernel[(num_experts,)](
        flat, sorted_ids, block_expert, num_padded, n, num_experts,
        BLOCK_M=block_m, NUM_BINS=triton.next_power_of_2(num_experts + 1),
        CHUNK=min(1024, max(16, triton.next_power_of_2(n))),
    )
    return sorted_ids, block_expert, num_padded


@triton.jit
def _moe_align_kernel(ids_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, n, num_experts,
                      BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    # One program per expert. Each counts every expert's assignments (a histogram; cheap next to the
    # GEMMs) to find where its padded run starts, then writes its own run in token order.
    e = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for c in range(0, tl.cdiv(n, CHUNK)):
        idx = c * CHUNK + offs
        ids = tl.load(ids_ptr + idx, mask=idx < n, other=num_experts).to(tl.int32)  # spare bin for the tail
        counts += tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    padded = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    my_end = tl.sum(tl.where(bins == e, ends, 0))
    my_padded = tl.sum(tl.where(bins == e, padded, 0))
    my_count = tl.sum(tl.where(bins == e, counts, 0))
    start = my_end - my_padded
    if e == 0:
        tl.store(num_padded_ptr, tl.max(ends))

    seen = my_count * 0
    for c in range(0, tl.cdiv(n, CHUNK)):
        idx = c * CHUNK + offs
        hit = tl.load(ids_ptr + idx, mask=idx < n, other=-1).to(tl.int32) == e
        rank = seen + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(sorted_ids_ptr + start + rank, idx.to(tl.int32), mask=hit)
        seen += tl.sum(hit.to(tl.int32))
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + start + my_count + pad, n, mask=my_count + pad < my_padded)
    for b in range(0, tl.cdiv(my_padded, BLOCK_M * CHUNK)):
        blk = b * CHUNK + offs
        tl.store(block_expert_ptr + start // BLOCK_M + blk, e, mask=blk < my_padded // BLOCK_M)


@triton.jit
def _block_coords(num_rows_bound, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row blocks (mostly one expert) sweep the same weight columns
    # back to back, so a weight tile is reused from L2 instead of reread from memory.
    pid = tl.program_id(0)
    num_m = tl.cdiv(num_rows_bound, BLOCK_M)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        return g * tl.sigmoid(g)
    elif ACTIVATION == "gelu":
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:  # gelu_tanh: 0.5 g (1 + tanh(u)) = g * sigmoid(2u)
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * u)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_rows_bound, num_valid, top_k, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ht,
    ACTIVATION: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_rows_bound, inter, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    row_ok = flat < num_valid
    token = (flat // top_k).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_ok = offs_k < hidden - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        bu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk

    h = _activation(acc_g, ACTIVATION) * acc_u
    h_ptrs = h_ptr + flat.to(tl.int64)[:, None] * stride_ht + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, y_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_rows_bound, num_valid, hidden, inter,
    stride_ht, stride_we, stride_wn, stride_wk, stride_yt,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_rows_bound, hidden, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(sorted_ids_ptr + offs_m)
    row_ok = flat < num_valid
    flat64 = flat.to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + flat64[:, None] * stride_ht + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        k_ok = offs_k < inter - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    weight = tl.load(topk_weights_ptr + flat64, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    y_ptrs = y_ptr + flat64[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", config: MoEConfig | None = None) -> torch.Tensor:
    """[T, H] -> [T, H]; same contract as kernels.moe_reference.moe_reference (ids must lie in [0, E))."""
    check_moe_shapes(x, w13, w2, topk_weights, topk_ids)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported MoE activation {activation!r}; expected one of {ACTIVATIONS}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"dtype mismatch: hidden_states {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.empty_like(x)
    x = x.contiguous()  # the kernels assume unit stride along the reduced dim
    w13, w2 = w13.contiguous(), w2.contiguous()
    cfg = config or pick_config(num_tokens, top_k, num_experts)
    sorted_ids, block_expert, num_padded = moe_align_block_size(topk_ids, cfg.block_m, num_experts)
    bound = sorted_ids.numel()
    num_valid = num_tokens * top_k
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    common = dict(UPCAST=_INTERPRETED, PRECISION=precision, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    h = torch.empty((num_valid, inter), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(bound, cfg.block_m) * triton.cdiv(inter, cfg.gate_up_n),)
    _moe_gate_up_kernel[grid](
        x, w13, h, sorted_ids, block_expert, num_padded,
        bound, num_valid, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        ACTIVATION=activation, BLOCK_N=cfg.gate_up_n, BLOCK_K=cfg.gate_up_k, **common,
    )
    y = torch.empty((num_valid, hidden), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    grid = (triton.cdiv(bound, cfg.block_m) * triton.cdiv(hidden, cfg.down_n),)
    _moe_down_kernel[grid](
        h, w2, y, weights, sorted_ids, block_expert, num_padded,
        bound, num_valid, hidden, inter,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        BLOCK_N=cfg.down_n, BLOCK_K=cfg.down_k, **common,
    )
    if top_k == 1:
        return y
    return y.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
