"""A step's model inputs: from the scheduler's per-sequence lists to the tensors the model reads.

Host time per step is pure overhead while the GPU waits, and building every block table and slot as
Python lists cost more than the GPU step itself at batch 64 (profile in benchmarks/NOTES-e2e.md). So:
- every live sequence owns a row of a host block-table mirror; a step carries only the entries
  appended since the step that last carried the sequence (`StepInput.blocks_from`), so a decode
  step moves O(new blocks), not O(context);
- positions and cache slots are computed with numpy over the whole batch at once;
- everything is written into two pinned staging buffers (int64: token ids | positions | slots |
  sample rows | pending-token rows; int32: query starts | seq lens | block tables), each packed by the
  step's padded size with every segment 16-byte aligned (a Triton kernel is specialised on its pointers'
  alignment: a varying one would compile new variants mid-run), and reaches the device in two copies.
- a token still pending (sampled by the previous step, its value not on the host yet: asynchronous
  scheduling) is staged as 0 and filled on the device from that step's sampled tokens. A CUDA-graph step pads on the host (token 0 at position 0,
  slot -1, seq_len 1, block 0) and packs by the graph's size, so its copies land exactly where the
  captured graph reads: a decode step is two copies and a replay.
On CPU the staging buffers are the tensors (no copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from porter.engine.forward_context import AttentionMetadata


def _align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class StepTensors:
    input_ids: torch.Tensor  # [P] int64 (P = padded token count)
    positions: torch.Tensor  # [P] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor | None  # [num sampling sequences] int64 rows of the hidden states; None: all rows
    num_tokens: int  # real (unpadded) tokens


class InputBatch:
    def __init__(self, *, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device):
        self.block_size, self.max_blocks = block_size, max_blocks_per_seq
        self.max_tokens, self.max_seqs = max_num_tokens, max_num_seqs
        self.device = device
        on_gpu = device.type == "cuda"
        n64 = 3 * _align(max_num_tokens, 2) + 3 * _align(max_num_seqs, 2)
        n32 = 2 * _align(max_num_seqs + 1, 4) + max_num_seqs * max_blocks_per_seq
        self.host64 = torch.zeros(n64, dtype=torch.int64, pin_memory=on_gpu)
        self.host32 = torch.zeros(n32, dtype=torch.int32, pin_memory=on_gpu)
        self.np64, self.np32 = self.host64.numpy(), self.host32.numpy()
        self.dev64 = torch.zeros(n64, dtype=torch.int64, device=device) if on_gpu else self.host64
        self.dev32 = torch.zeros(n32, dtype=torch.int32, device=device) if on_gpu else self.host32
        self.copied = torch.cuda.Event() if on_gpu else None  # staging may be rewritten once it fires
        # block-table mirror: one row per live sequence
        self.tables = np.zeros((max(8, max_num_seqs), max_blocks_per_seq), dtype=np.int32)
        self.row_of: dict[int, int] = {}
        self.free_rows: list[int] = []
        # the last step's sampled tokens (device) and each sampling sequence's index in them
        self.sampled: torch.Tensor | None = None
        self.sampled_index: dict[int, int] = {}

    # --- block-table mirror -----------------------------------------------------------------------

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.free_rows.append(row)

    def _row(self, seq_id: int) -> int:
        row = self.row_of.get(seq_id)
        if row is None:
            if not self.free_rows:
                used = self.tables.shape[0]
                self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
                self.free_rows.extend(range(self.tables.shape[0] - 1, used - 1, -1))
            row = self.row_of[seq_id] = self.free_rows.pop()
        return row

    def update_tables(self, seq_ids, block_tables, blocks_from) -> np.ndarray:
        """Apply the carried block-table entries; returns each sequence's mirror row."""
        rows = np.empty(len(seq_ids), dtype=np.int64)
        froms = blocks_from if blocks_from is not None else [0] * len(seq_ids)
        for i, (seq_id, blocks, start) in enumerate(zip(seq_ids, block_tables, froms)):
            row = rows[i] = self._row(seq_id)
            if blocks:
                if start + len(blocks) > self.max_blocks:
                    raise ValueError(f"sequence {seq_id}: block table of {start + len(blocks)} entries exceeds "
                                     f"max_blocks_per_seq {self.max_blocks}")
                self.tables[row, start:start + len(blocks)] = blocks
        return rows

    def set_sampled(self, seq_ids: list[int], tokens: torch.Tensor) -> None:
        """The step just launched samples `tokens` [len(seq_ids)] on the device, one per sequence; the
        next step's pending tokens are read from there."""
        self.sampled = tokens
        self.sampled_index = {seq_id: i for i, seq_id in enumerate(seq_ids)}

    def _pending_sources(self, seq_ids, tok_seq: np.ndarray, pending: np.ndarray) -> np.ndarray:
        try:
            return np.fromiter((self.sampled_index[seq_ids[i]] for i in tok_seq[pending]), dtype=np.int64,
                               count=len(pending))
        except KeyError as e:
            raise RuntimeError(f"sequence {e.args[0]} has a pending token but did not sample in the last step: "
                               "this is a bug") from None

    # --- one step ---------------------------------------------------------------------------------

    def prepare(self, seq_ids, new_token_ids, num_computed, block_tables, blocks_from, sample,
                pad_to: int | None = None, max_seq_len: int | None = None) -> StepTensors:
        """Stage and copy one step. pad_to: a CUDA-graph size (decode-only steps): pad the batch to that
        many one-token sequences and lay the tables out at full width, as the graph was captured."""
        rows = self.update_tables(seq_ids, block_tables, blocks_from)
        b = len(seq_ids)
        q_lens = np.fromiter(map(len, new_token_ids), dtype=np.int64, count=b)
        starts = np.asarray(num_computed, dtype=np.int64)
        seq_lens = starts + q_lens
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        t = int(cu[-1])
        tok_seq = np.repeat(np.arange(b), q_lens)
        positions = np.arange(t, dtype=np.int64) + np.repeat(starts - cu[:-1], q_lens)
        bs = self.block_size
        slots = self.tables[rows[tok_seq], positions // bs].astype(np.int64) * bs + positions % bs
        sample_mask = np.asarray(sample, dtype=bool)
        if pad_to is not None and (t != b or pad_to < b):
            raise ValueError(f"only a decode-only batch of at most {pad_to} sequences pads to a graph size")
        all_sample = bool(sample_mask.all()) and t == b  # the sampled rows are then rows 0..b-1
        sample_rows = cu[1:][sample_mask] - 1

        p = pad_to or t  # tokens as laid out (padded)
        s = pad_to or b  # sequences as laid out
        width = self.max_blocks if pad_to else max(1, -(-int(seq_lens.max()) // bs))
        if self.copied is not None:
            self.copied.synchronize()
        n_rows = 0 if all_sample else len(sample_rows)
        a = self.np64
        ids = a[0:t]
        ids[:] = np.fromiter(chain.from_iterable(new_token_ids), dtype=np.int64, count=t)
        pending = np.flatnonzero(ids < 0)  # tokens sampled by the last step, not yet on the host
        n_pend = len(pending)
        if n_pend:
            sources = self._pending_sources(seq_ids, tok_seq, pending)
            ids[pending] = 0
        # int64 segments: ids | positions | slots | sample rows | pending destinations | pending sources
        o_pos = _align(p, 2)
        o_slot = 2 * o_pos
        o_rows = 3 * o_pos
        o_dst = o_rows + _align(n_rows, 2)
        o_src = o_dst + _align(n_pend, 2)
        a[o_pos:o_pos + t] = positions
        a[o_slot:o_slot + t] = slots
        a[o_rows:o_rows + n_rows] = sample_rows[:n_rows]
        if n_pend:
            a[o_dst:o_dst + n_pend] = pending
            a[o_src:o_src + n_pend] = sources
        if p > t:  # graph padding tokens
            a[t:p] = 0
            a[o_pos + t:o_pos + p] = 0
            a[o_slot + t:o_slot + p] = -1
        # int32 segments: query starts | seq lens | block tables
        c = self.np32
        o_lens = _align(s + 1, 4)
        o_bt = o_lens + _align(s, 4)
        c[0:b + 1] = cu
        c[b + 1:s + 1] = np.arange(t + 1, t + 1 + s - b)  # padding sequences: one query each
        c[o_lens:o_lens + b] = seq_lens
        c[o_lens + b:o_lens + s] = 1
        tables = c[o_bt:o_bt + s * width].reshape(s, width)
        tables[:b] = self.tables[rows, :width]
        tables[b:] = 0
        n64, n32 = o_src + n_pend, o_bt + s * width
        if self.dev64 is not self.host64:
            self.dev64[:n64].copy_(self.host64[:n64], non_blocking=True)
            self.dev32[:n32].copy_(self.host32[:n32], non_blocking=True)
            self.copied.record()
        d64, d32 = self.dev64, self.dev32
        if n_pend:
            self._fill_pending(d64[0:p], d64[o_dst:o_dst + n_pend], d64[o_src:o_src + n_pend], pending, sources)
        meta = AttentionMetadata(
            query_start_loc=d32[0:s + 1],
            seq_lens=d32[o_lens:o_lens + s],
            slot_mapping=d64[o_slot:o_slot + p],
            block_tables=d32[o_bt:n32].view(s, width),
            max_query_len=1 if pad_to else int(q_lens.max()),  # a padded batch is one-token sequences
            max_seq_len=max_seq_len or (int(seq_lens.max()) if b else 0),
            query_lens_cpu=None if pad_to else q_lens.tolist(),
            seq_lens_cpu=None if pad_to else seq_lens.tolist(),
        )
        return StepTensors(d64[0:p], d64[o_pos:o_pos + p], meta, None if all_sample else d64[o_rows:o_rows + n_rows], t)

    def _fill_pending(self, input_ids, dst, src, pending: np.ndarray, sources: np.ndarray) -> None:
        """input_ids[dst] = last step's sampled[src], on the device (no wait for that step)."""
        k = len(pending)
        if pending[-1] == k - 1 and np.array_equal(pending, sources):  # pending is increasing: it is 0..k-1
            input_ids[:k].copy_(self.sampled[:k])  # steady decode: the same sequences in the same order
        else:
            input_ids.index_copy_(0, dst, self.sampled.index_select(0, src))

    def padded(self, size: int, max_seq_len: int) -> StepTensors:
        """A batch of `size` padding sequences (what CUDA graphs are captured on)."""
        return self.prepare([], [], [], [], None, [], pad_to=size, max_seq_len=max_seq_len)
