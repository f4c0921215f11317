"""Attention metadata for one flat batch, reachable by every Attention layer during a forward.

The model runner builds one `AttentionMetadata` per step and enters `set_forward_context(meta)`
around `model(input_ids, positions)`; `Attention` layers read it with `get_forward_context()`.
Models never see it as an argument (vLLM V1's design).

A batch is a list of sequences; sequence i contributes q_len_i new tokens (its query) at the end
of a context of seq_len_i tokens (so its queries sit at positions seq_len_i - q_len_i ..
seq_len_i - 1). Prefill, prefix-cached prefill, chunked prefill and decode (q_len 1) are the same
thing with different lengths, so mixed batches need no special case.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # int32 [num_seqs + 1]: query_start_loc[i]..query_start_loc[i+1] are sequence i's tokens
    query_start_loc: torch.Tensor
    # int32 [num_seqs]: total context length of each sequence, new tokens included
    seq_lens: torch.Tensor
    # int64 [num_tokens]: flat cache slot (block_id * block_size + offset) for each new token's k/v;
    # -1 = do not write (padding tokens of a CUDA-graph batch)
    slot_mapping: torch.Tensor
    # int32 [num_seqs, max_blocks_per_seq]: physical block ids of each sequence, padded with 0
    block_tables: torch.Tensor | None
    max_query_len: int
    max_seq_len: int
    # python copies of the lengths, so the torch backend needs no device sync
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def for_prefill(cls, query_lens: list[int], device="cpu") -> "AttentionMetadata":
        """Metadata for plain prefills with no KV cache (verification, tests): each sequence attends
        causally over its own new tokens only."""
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=device),
            block_tables=None,
            max_query_len=max(query_lens),
            max_seq_len=max(query_lens),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(query_lens),
        )


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None


_context: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError(
            "Attention layer called outside a forward context: run the model through the engine's "
            "model runner, or wrap the call in `with set_forward_context(AttentionMetadata.for_prefill(...))`."
        )
    return _context


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata | None):
    global _context
    previous = _context
    _context = ForwardContext(attn_metadata)
    try:
        yield _context
    finally:
        _context = previous
