"""Paged decode attention with split-KV (flash-decoding), one query token per sequence.

Stage 1: grid (num_seqs, num_kv_heads, num_splits). A program takes all query heads of one KV
head (GQA/MQA: the KV is read once for the whole group) over one slice of the context, and writes
the slice's normalised output and its log-sum-exp (base 2) in fp32.
Stage 2: grid (num_seqs, num_q_heads) merges the slices (and the sink column, if any).
With one split (large batches) stage 1 writes the output itself and stage 2 is skipped.
Given this step's k/v (`new_kv`), stage 1 also stores them in the cache (the KV-cache write costs no
launch of its own): the split holding the query's position writes the slot and takes that key and value
from registers, so no program reads a slot while another writes it.

The grid depends only on the batch size and num_splits (never on the context lengths, which are
read on the device), so the launch is CUDA-graph capturable; splits past a sequence's context
write an empty slice (lse = -inf).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import (
    INTERPRETED,
    LOG2E,
    dot_precision,
    let_next_start,
    next_pow2,
    pdl_launch,
    tanh,
    wait_for_previous,
)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # KV tokens per tile
    num_warps: int = 4
    num_stages: int = 3
    # Splits are chosen so that num_seqs * num_kv_heads * num_splits ~ programs_per_sm * SMs.
    # Measured on an H100 (benchmarks/NOTES-kernels.md): ~3 programs per SM is enough to reach the
    # copy bandwidth; more splits only add partial-result traffic and a reduce launch.
    programs_per_sm: float = 3.0
    min_tokens_per_split: int = 128
    max_splits: int = 32


DEFAULT_CONFIG = DecodeConfig(block_n=16, num_warps=1, num_stages=1) if INTERPRETED else DecodeConfig()
# Head dims above 128: halve the tile and the pipeline depth so K/V stages fit in shared memory.
BIG_HEAD_CONFIG = DEFAULT_CONFIG if INTERPRETED else DecodeConfig(block_n=32, num_stages=2)


def pick_config(head_size: int) -> DecodeConfig:
    return DEFAULT_CONFIG if head_size <= 128 else BIG_HEAD_CONFIG


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      config: DecodeConfig | None = None, num_sms: int | None = None) -> int:
    """Enough splits to fill the GPU, none shorter than min_tokens_per_split (host ints only)."""
    config = config or DEFAULT_CONFIG
    if num_sms is None:
        num_sms = _num_sms(torch.cuda.current_device()) if torch.cuda.is_available() else 4
    want = round(config.programs_per_sm * num_sms / max(num_seqs * num_kv_heads, 1))
    useful = triton.cdiv(max(max_seq_len, 1), config.min_tokens_per_split)
    return max(1, min(want, useful, config.max_splits))


# the block-table width varies per eager step: one compiled variant for all widths
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, alibi_ptr, sinks_ptr,
    part_out_ptr, part_lse_ptr, out_ptr, new_k_ptr, new_v_ptr, slot_ptr,
    scale, soft_cap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_nkt, stride_nkh, stride_nvt, stride_nvh,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr, DIRECT: tl.constexpr, WRITE_NEW: tl.constexpr, CAST_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    wait_for_previous()
    let_next_start()

    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos = seq_len - 1
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    head_mask = g < GROUP
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=head_mask[:, None] & d_mask[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=head_mask, other=0.0)
    if WRITE_NEW:  # this step's key/value, at q_pos, cast as the cache stores them
        k_new = tl.load(new_k_ptr + seq * stride_nkt + kvh * stride_nkh + d, mask=d_mask,
                        other=0.0).to(k_cache_ptr.dtype.element_ty)
        v_new = tl.load(new_v_ptr + seq * stride_nvt + kvh * stride_nvh + d, mask=d_mask,
                        other=0.0).to(v_cache_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        if (q_pos >= lo) & (q_pos < hi) & (slot >= 0):  # slot -1: a CUDA-graph padding row
            blk = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            tl.store(k_cache_ptr + blk * stride_kb + off * stride_ks + kvh * stride_kh + d, k_new, mask=d_mask)
            tl.store(v_cache_ptr + blk * stride_vb + off * stride_vs + kvh * stride_vh + d, v_new, mask=d_mask)

    if DIRECT and USE_SINKS:  # the sink is a key with logit sinks[h] and no value
        m_i = tl.load(sinks_ptr + heads, mask=head_mask, other=0.0).to(tl.float32) * LOG2E
        l_i = tl.zeros([GROUP_PAD], tl.float32) + 1.0
    else:
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < hi
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=p_mask, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks
                    + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if WRITE_NEW:  # the slot at q_pos may still be in flight: use the registers
            is_new = (pos == q_pos)[:, None]
            k = tl.where(is_new, k_new[None, :], k)
            v = tl.where(is_new, v_new[None, :], v)
        if CAST_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [GROUP_PAD, BLOCK_N]
        if USE_SOFTCAP:
            s = soft_cap * tanh(s / soft_cap)
        if USE_ALIBI:
            s += slopes[:, None] * (pos - q_pos).to(tl.float32)[None, :]
        s = tl.where(p_mask[None, :], s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a visible key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & d_mask[None, :])
    else:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        row = (seq * NUM_Q_HEADS + heads) * num_splits + split  # part_*: [num_seqs, Hq, splits(, D)]
        tl.store(part_lse_ptr + row, lse, mask=head_mask)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out,
                 mask=head_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, sinks_ptr, out_ptr,
    stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, USE_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    wait_for_previous()
    let_next_start()
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    row = (seq * NUM_Q_HEADS + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * LOG2E
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty sequence (graph padding): output zeros
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    if USE_SINKS:
        total += tl.exp2(sink - m)
    parts = tl.load(part_out_ptr + (row + sp)[:, None] * HEAD_DIM + d[None, :],
                    mask=(sp < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale, num_splits,
                     sliding_window=None, logits_soft_cap=None, alibi_slopes=None, sinks=None,
                     new_kv=None, out=None, config: DecodeConfig | None = None):
    """q [B, Hq, D] (one token per sequence, the last of its context) -> out [B, Hq, D].

    alibi_slopes and sinks are fp32 tensors [Hq] on q's device (or None). new_kv = (k, v, slot_mapping),
    k/v [B, Hkv, D]: this step's key and value, written into their slots (-1: skipped) by this launch;
    without it the cache must already hold them."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"decode_attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if k_cache.shape[3] != d or q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("decode_attention: head sizes differ or the head dimension is not contiguous")
    if new_kv is not None:
        new_k, new_v, slots = new_kv
        if new_k.shape != (b, hkv, d) or new_v.shape != (b, hkv, d) or slots.shape[0] < b:
            raise ValueError(f"decode_attention: new k/v {tuple(new_k.shape)}/{tuple(new_v.shape)} and "
                             f"{slots.shape[0]} slots for {b} sequences of {hkv} KV heads of size {d}")
        if new_k.stride(2) != 1 or new_v.stride(2) != 1:
            raise ValueError("decode_attention: the head dimension of the new k/v must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    config = config or pick_config(d)
    group = hq // hkv
    direct = num_splits == 1
    if direct:  # never touched: stage 1 writes `out`
        part_out = part_lse = seq_lens
    else:
        part_out = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    dummy = seq_lens  # never read when the matching feature is off
    new_k, new_v, slots = new_kv if new_kv is not None else (q, q, dummy)
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        alibi_slopes if alibi_slopes is not None else dummy, sinks if sinks is not None else dummy,
        part_out, part_lse, out, new_k, new_v, slots,
        float(scale), float(logits_soft_cap or 0.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        NUM_Q_HEADS=hq, GROUP=group, GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=d, D_PAD=max(16, next_pow2(d)), BLOCK_SIZE=k_cache.shape[1], BLOCK_N=config.block_n,
        USE_WINDOW=bool(sliding_window), USE_SOFTCAP=bool(logits_soft_cap),
        USE_ALIBI=alibi_slopes is not None, USE_SINKS=sinks is not None, DIRECT=direct,
        WRITE_NEW=new_kv is not None, CAST_F32=INTERPRETED, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(q.device),
    )
    if direct:
        return out
    _decode_reduce_kernel[(b, hq)](
        part_out, part_lse, sinks if sinks is not None else dummy, out,
        out.stride(0), out.stride(1),
        NUM_Q_HEADS=hq, NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits),
        HEAD_DIM=d, D_PAD=next_pow2(d), USE_SINKS=sinks is not None,
        num_warps=1 if INTERPRETED else 4, **pdl_launch(q.device),
    )
    return out
