"""Triton attention backend (CUDA): same functions as torch_backend, run by porter.kernels.

Decode-only batches (one query per sequence) take the split-KV decode kernel, whose launch reads no
device value on the host (CUDA-graph capturable: the grid depends on the batch size and on
meta.max_seq_len, a host int, only through the number of splits). Any other batch (prefill,
prefix-cached or chunked prefill, mixed prefill + decode) takes the varlen prefill kernel.
"""
from __future__ import annotations

import torch

from porter.engine.forward_context import AttentionMetadata
from porter.kernels.decode_attention import choose_num_splits, decode_attention, pick_config
from porter.kernels.kv_cache import write_kv_cache as _write_kv_cache
from porter.kernels.prefill_attention import prefill_attention


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] into slots (block_id * block_size + offset); slot -1 = skip."""
    _write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def _per_head(x: torch.Tensor | None, device) -> torch.Tensor | None:
    # kernels read fp32 per-head values; a no-op for the fp32 buffers the Attention layer keeps
    return None if x is None else x.to(device=device, dtype=torch.float32)


def _is_decode(q: torch.Tensor, meta: AttentionMetadata) -> bool:
    if meta.block_tables is None:
        raise ValueError("paged_attention needs block_tables in the attention metadata")
    return meta.decode_only and q.shape[0] == meta.num_seqs


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding_window: int | None = None, logits_soft_cap: float | None = None,
                    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [T, Hq, D] against each sequence's cached keys -> [T, Hq, D]. The new tokens' k/v are already
    written, or given as new_kv = (k, v) [T, Hkv, D] and written first to meta.slot_mapping (by a decode
    batch in the decode launch itself: one kernel fewer a layer a step)."""
    decode = _is_decode(q, meta)
    if new_kv is not None and not decode:
        write_kv_cache(*new_kv, k_cache, v_cache, meta.slot_mapping)
    opts = dict(scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                alibi_slopes=_per_head(alibi_slopes, q.device), sinks=_per_head(sinks, q.device))
    if decode:
        max_ctx = min(meta.max_seq_len, meta.block_tables.shape[1] * k_cache.shape[1])
        splits = choose_num_splits(meta.num_seqs, k_cache.shape[2], max_ctx, pick_config(q.shape[2]))
        return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, num_splits=splits,
                                new_kv=None if new_kv is None else (*new_kv, meta.slot_mapping), **opts)
    return prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                             meta.block_tables, meta.max_query_len, **opts)


def write_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta: AttentionMetadata, **opts) -> torch.Tensor:
    """The step's k/v [T, Hkv, D] into the cache at meta.slot_mapping, then paged_attention(q, ...)."""
    return paged_attention(q, k_cache, v_cache, meta, new_kv=(k, v), **opts)


def attention_no_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, *,
                       scale: float, sliding_window: int | None = None, logits_soft_cap: float | None = None,
                       alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence attends causally over its own new tokens only: q [T, Hq, D], k/v [T, Hkv, D].
    Only relative positions matter (causal mask, window, ALiBi), so keys count from 0 here."""
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    return prefill_attention(q, k, v, meta.query_start_loc, q_lens.to(torch.int32), None,
                             meta.max_query_len, scale=scale, sliding_window=sliding_window,
                             logits_soft_cap=logits_soft_cap, alibi_slopes=_per_head(alibi_slopes, q.device),
                             sinks=_per_head(sinks, q.device))
