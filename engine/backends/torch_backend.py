"""Reference attention backend: exact attention with plain torch ops (CPU, and the oracle for kernels).

Each sequence's keys are gathered from the paged cache through its block table, then attended
densely in fp32. Query i of a sequence sits at position seq_len - q_len + i; key j is visible iff
j <= i (causal) and i - j < sliding_window. Scores: s = q.k * scale, then soft cap tanh(s/cap)*cap,
then ALiBi slope*(j - i); sinks add one value-less column per head to the softmax.
"""
from __future__ import annotations

import torch

from porter.engine.forward_context import AttentionMetadata


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] into slots (block_id * block_size + offset); slot -1 = skip."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def _lengths(meta: AttentionMetadata) -> tuple[list[int], list[int], list[int]]:
    q_lens = meta.query_lens_cpu
    if q_lens is None:
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
    seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return q_lens, seq_lens, starts


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *,
           scale: float, sliding_window: int | None = None, logits_soft_cap: float | None = None,
           alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention of one sequence: q [Q, Hq, D], k/v [K, Hkv, D] -> [Q, Hq, D] (q's dtype)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    group = hq // hkv
    qf, kf, vf = q.float(), k.float(), v.float()
    if group > 1:  # kv head j serves query heads j*group .. (j+1)*group-1
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    if logits_soft_cap:
        s = torch.tanh(s / logits_soft_cap) * logits_soft_cap
    rel = (k_pos[None, :] - q_pos[:, None]).to(s.device)  # [Q, K], key minus query position
    if alibi_slopes is not None:
        s = s + alibi_slopes.float().to(s.device)[:, None, None] * rel[None].float()
    visible = rel <= 0
    if sliding_window is not None:
        visible &= rel > -sliding_window
    s = s.masked_fill(~visible[None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().to(s.device)[:, None, None].expand(hq, s.shape[1], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p)  # a row with no visible key (cannot happen causally) gives zeros, not NaN
    return torch.einsum("hqk,khd->qhd", p, vf).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding_window: int | None = None, logits_soft_cap: float | None = None,
                    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] against each sequence's cached keys (new tokens already written) -> [T, Hq, D]."""
    if meta.block_tables is None:
        raise ValueError("paged_attention needs block_tables in the attention metadata")
    block_size = k_cache.shape[1]
    q_lens, seq_lens, starts = _lengths(meta)
    out = torch.empty_like(q)
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        if q_len == 0:
            continue
        n_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :n_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        k_pos = torch.arange(seq_len, device=q.device)
        q_pos = k_pos[seq_len - q_len:]
        out[starts[i]:starts[i + 1]] = attend(
            q[starts[i]:starts[i + 1]], k, v, q_pos, k_pos, scale=scale, sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks)
    return out


def write_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta: AttentionMetadata, **opts) -> torch.Tensor:
    """The step's k/v [T, Hkv, D] into the cache at meta.slot_mapping, then paged_attention(q, ...)."""
    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    return paged_attention(q, k_cache, v_cache, meta, **opts)


def attention_no_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, *,
                       scale: float, sliding_window: int | None = None, logits_soft_cap: float | None = None,
                       alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence attends causally over its own new tokens only: q [T, Hq, D], k/v [T, Hkv, D]."""
    q_lens, seq_lens, starts = _lengths(meta)
    out = torch.empty_like(q)
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        if q_len == 0:
            continue
        sl = slice(starts[i], starts[i + 1])
        pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        out[sl] = attend(q[sl], k[sl], v[sl], pos, pos, scale=scale, sliding_window=sliding_window,
                         logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, sinks=sinks)
    return out
