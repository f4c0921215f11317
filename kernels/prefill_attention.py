"""Varlen (flash-style) prefill attention over a paged KV cache, or over contiguous k/v.

Queries of several sequences are concatenated ([T, Hq, D], sequence i at query_start_loc[i]..);
sequence i's q_len queries are the last q_len positions of its seq_len-token context, so the causal
mask uses the offset seq_len - q_len: plain, prefix-cached and chunked prefills (and decodes mixed
into the batch) are all the same case. Grid: (query blocks, sequences, query heads).

PAGED=False reads k/v [T, Hkv, D] laid out like q (cache-less path: each sequence sees only its own
new tokens, so seq_len == q_len).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import INTERPRETED, LOG2E, dot_precision, next_pow2, tanh


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = PrefillConfig(16, 16, 1, 1) if INTERPRETED else PrefillConfig()
# Long queries: bigger tiles pay (H100, benchmarks/NOTES-kernels.md: 270 vs 257 TFLOP/s at 4k tokens,
# but 154 vs 174 at 512).
LONG_CONFIG = DEFAULT_CONFIG if INTERPRETED else PrefillConfig(128, 128, 8, 3)
LONG_QUERY = 2048
# Head dims above 128: smaller key tiles so q plus the K/V stages fit in shared memory.
BIG_HEAD_CONFIG = DEFAULT_CONFIG if INTERPRETED else PrefillConfig(64, 32, 4, 2)


def pick_config(max_query_len: int, head_size: int = 128) -> PrefillConfig:
    if head_size > 128:
        return BIG_HEAD_CONFIG
    return LONG_CONFIG if max_query_len >= LONG_QUERY else DEFAULT_CONFIG


@triton.jit
def _attend_tile(q, q_pos, n0, hi, m_i, l_i, acc, d, d_mask,
                 k_ptr, v_ptr, bt_row, q_start, stride_kb, stride_ks, stride_vb, stride_vs,
                 scale, soft_cap, window, slope, MASKED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
                 USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
                 CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N (k_ptr/v_ptr already at the KV head)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    p_mask = pos < hi
    if PAGED:
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=p_mask, other=0).to(tl.int64)
        k_row = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks
        v_row = block * stride_vb + (pos % BLOCK_SIZE) * stride_vs
    else:
        k_row = (q_start + pos).to(tl.int64) * stride_kb
        v_row = (q_start + pos).to(tl.int64) * stride_vb
    if MASKED:
        kv_mask = p_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_ptr + k_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + v_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if CAST_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
    if USE_SOFTCAP:
        s = soft_cap * tanh(s / soft_cap)
    if USE_ALIBI:
        s += slope * (pos[None, :] - q_pos[:, None]).to(tl.float32)
    s = s * LOG2E
    if MASKED:
        visible = p_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible &= q_pos[:, None] - pos[None, :] < window
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# the block-table width varies per eager step: one compiled variant for all widths
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    alibi_ptr, sinks_ptr,
    scale, soft_cap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr, CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    mblk = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    q_offset = seq_len - q_len

    m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < q_len
    q_pos = q_offset + m
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    slope = 0.0
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + h)

    if USE_SINKS:  # the sink is a key with logit sinks[h] and no value: start the softmax with it
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + h).to(tl.float32) * LOG2E
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    hi = tl.minimum(seq_len, q_offset + mblk * BLOCK_M + BLOCK_M)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(q_offset + mblk * BLOCK_M - window + 1, 0)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    # Tiles wholly below the diagonal need no mask: keys < q_offset + first row + 1 are visible to
    # every row of the block (not so under a sliding window, which masks every tile).
    full_end = lo
    if not USE_WINDOW:
        full_end = (q_offset + mblk * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    for n0 in range(lo, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, q_pos, n0, hi, m_i, l_i, acc, d, d_mask, k_head, v_head, bt_row,
                                     q_start, stride_kb, stride_ks, stride_vb, stride_vs,
                                     scale, soft_cap, window, slope, False,
                                     BLOCK_N, BLOCK_SIZE, PAGED, USE_WINDOW, USE_SOFTCAP, USE_ALIBI,
                                     CAST_F32, DOT_PRECISION)
    for n0 in range(full_end, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, q_pos, n0, hi, m_i, l_i, acc, d, d_mask, k_head, v_head, bt_row,
                                     q_start, stride_kb, stride_ks, stride_vb, stride_vs,
                                     scale, soft_cap, window, slope, True,
                                     BLOCK_N, BLOCK_SIZE, PAGED, USE_WINDOW, USE_SOFTCAP, USE_ALIBI,
                                     CAST_F32, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q, k, v, query_start_loc, seq_lens, block_tables, max_query_len, *, scale,
                      sliding_window=None, logits_soft_cap=None, alibi_slopes=None, sinks=None,
                      out=None, config: PrefillConfig | None = None):
    """q [T, Hq, D] -> out [T, Hq, D]. With block_tables, k/v are the paged caches
    [num_blocks, block_size, Hkv, D]; with block_tables None they are [T, Hkv, D] (no cache).
    alibi_slopes and sinks are fp32 tensors [Hq] on q's device (or None)."""
    t, hq, d = q.shape
    paged = block_tables is not None
    hkv = k.shape[2] if paged else k.shape[1]
    if hq % hkv:
        raise ValueError(f"prefill_attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if k.shape[-1] != d or q.stride(2) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("prefill_attention: head sizes differ or the head dimension is not contiguous")
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    if paged:
        kb, ks, kh = k.stride(0), k.stride(1), k.stride(2)
        vb, vs, vh = v.stride(0), v.stride(1), v.stride(2)
        block_size, bt, stride_bt = k.shape[1], block_tables, block_tables.stride(0)
    else:
        kb, ks, kh = k.stride(0), 0, k.stride(1)
        vb, vs, vh = v.stride(0), 0, v.stride(1)
        block_size, bt, stride_bt = 1, seq_lens, 0
    config = config or pick_config(max_query_len, d)
    grid = (triton.cdiv(max_query_len, config.block_m), num_seqs, hq)
    _prefill_kernel[grid](
        q, k, v, out, query_start_loc, seq_lens, bt,
        alibi_slopes if alibi_slopes is not None else seq_lens,
        sinks if sinks is not None else seq_lens,
        float(scale), float(logits_soft_cap or 0.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kb, ks, kh, vb, vs, vh, stride_bt,
        GROUP=hq // hkv, HEAD_DIM=d, D_PAD=max(16, next_pow2(d)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_SIZE=block_size, PAGED=paged,
        USE_WINDOW=bool(sliding_window), USE_SOFTCAP=bool(logits_soft_cap),
        USE_ALIBI=alibi_slopes is not None, USE_SINKS=sinks is not None,
        CAST_F32=INTERPRETED, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
