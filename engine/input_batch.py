"""A step's model inputs: from the scheduler's per-sequence lists to the tensors the model reads.

Host time per step is pure overhead while the GPU waits, and building every block table and slot as
Python lists cost more than the GPU step itself at batch 64 (profile in benchmarks/NOTES-e2e.md). So:
- every live sequence owns a row of a host block-table mirror; a step carries only the entries
  appended since the step that last carried the sequence (`StepInput.blocks_from`), so a decode
  step moves O(new blocks), not O(context);
- positions and cache slots are computed with numpy over the whole batch at once;
- everything is written into two pinned staging buffers (int64: token ids | positions | slots |
  sample rows; int32: query starts | seq lens | block tables), each packed by the step's padded size,
  and reaches the device in two copies. A CUDA-graph step pads on the host (token 0 at position 0,
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
        n64 = 4 * max_num_tokens
        n32 = 2 * max_num_seqs + 1 + max_num_seqs * max_blocks_per_seq
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
        a[0:t] = np.fromiter(chain.from_iterable(new_token_ids), dtype=np.int64, count=t)
        a[p:p + t] = positions
        a[2 * p:2 * p + t] = slots
        a[3 * p:3 * p + n_rows] = sample_rows[:n_rows]
        if p > t:  # graph padding tokens
            a[t:p] = 0
            a[p + t:2 * p] = 0
            a[2 * p + t:3 * p] = -1
        c = self.np32
        c[0:b + 1] = cu
        c[b + 1:s + 1] = np.arange(t + 1, t + 1 + s - b)  # padding sequences: one query each
        c[s + 1:s + 1 + b] = seq_lens
        c[s + 1 + b:2 * s + 1] = 1
        tables = c[2 * s + 1:2 * s + 1 + s * width].reshape(s, width)
        tables[:b] = self.tables[rows, :width]
        tables[b:] = 0
        n64, n32 = 3 * p + n_rows, 2 * s + 1 + s * width
        if self.dev64 is not self.host64:
            self.dev64[:n64].copy_(self.host64[:n64], non_blocking=True)
            self.dev32[:n32].copy_(self.host32[:n32], non_blocking=True)
            self.copied.record()
        d64, d32 = self.dev64, self.dev32
        meta = AttentionMetadata(
            query_start_loc=d32[0:s + 1],
            seq_lens=d32[s + 1:2 * s + 1],
            slot_mapping=d64[2 * p:3 * p],
            block_tables=d32[2 * s + 1:n32].view(s, width),
            max_query_len=1 if pad_to else int(q_lens.max()),  # a padded batch is one-token sequences
            max_seq_len=max_seq_len or (int(seq_lens.max()) if b else 0),
            query_lens_cpu=None if pad_to else q_lens.tolist(),
            seq_lens_cpu=None if pad_to else seq_lens.tolist(),
        )
        return StepTensors(d64[0:p], d64[p:2 * p], meta, None if all_sample else d64[3 * p:n64], t)

    def padded(self, size: int, max_seq_len: int) -> StepTensors:
        """A batch of `size` padding sequences (what CUDA graphs are captured on)."""
        return self.prepare([], [], [], [], None, [], pad_to=size, max_seq_len=max_seq_len)
