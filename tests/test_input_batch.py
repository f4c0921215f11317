"""InputBatch: the staged step tensors equal the per-sequence definition, across incremental
block-table updates, row reuse, table restarts (preemption) and CUDA-graph padding."""
import torch

from porter.engine.input_batch import InputBatch

BS = 4


def make(max_seqs=4, max_blocks=8):
    return InputBatch(max_num_tokens=32, max_num_seqs=max_seqs, max_blocks_per_seq=max_blocks, block_size=BS,
                      device=torch.device("cpu"))


def expected(new_token_ids, num_computed, tables):
    ids, pos, slots, starts, lens = [], [], [], [0], []
    for toks, c, table in zip(new_token_ids, num_computed, tables):
        ids += toks
        pos += range(c, c + len(toks))
        slots += [table[p // BS] * BS + p % BS for p in range(c, c + len(toks))]
        starts.append(starts[-1] + len(toks))
        lens.append(c + len(toks))
    return ids, pos, slots, starts, lens


def check(x, new_token_ids, num_computed, tables):
    ids, pos, slots, starts, lens = expected(new_token_ids, num_computed, tables)
    assert x.input_ids.tolist() == ids and x.positions.tolist() == pos
    assert x.meta.slot_mapping.tolist() == slots
    assert x.meta.query_start_loc.tolist() == starts and x.meta.seq_lens.tolist() == lens
    assert x.meta.query_lens_cpu == [len(t) for t in new_token_ids] and x.meta.seq_lens_cpu == lens
    assert x.meta.max_seq_len == max(lens) and x.meta.max_query_len == max(map(len, new_token_ids))
    width = x.meta.block_tables.shape[1]
    assert width == -(-max(lens) // BS)
    for row, table, n in zip(x.meta.block_tables.tolist(), tables, lens):
        needed = -(-n // BS)  # the entries the kernels read for this sequence
        assert row[:needed] == table[:needed]


def test_mixed_step_then_decodes_carry_only_new_blocks():
    ib = make()
    tables = {7: [5, 2], 9: [1, 3, 4]}
    # step 1: a fresh prefill of 6 tokens (7) and a prefix-cached one resuming at token 8 (9)
    x = ib.prepare([7, 9], [[11, 12, 13, 14, 15, 16], [21, 22, 23]], [0, 8], [tables[7], tables[9]], [0, 0],
                   [True, False])
    check(x, [[11, 12, 13, 14, 15, 16], [21, 22, 23]], [0, 8], [tables[7], tables[9]])
    assert x.sample_rows.tolist() == [5]  # only sequence 7 samples: its last token's row
    # step 2: decodes; sequence 7 crosses into a new block (carried alone), 9 carries nothing
    tables[7].append(6)
    x = ib.prepare([9, 7], [[24], [17]], [11, 6], [[], [6]], [3, 2], [True, True])
    check(x, [[24], [17]], [11, 6], [tables[9], tables[7]])
    assert x.sample_rows is None and x.num_tokens == 2  # every row samples: no gather


def test_released_rows_are_reused_and_a_restarted_table_overwrites():
    ib = make(max_seqs=2)
    ib.prepare([1, 2], [[5], [6]], [0, 0], [[3], [4]], [0, 0], [True, True])
    ib.release([1])
    x = ib.prepare([2, 3], [[7], [8, 9]], [1, 0], [[], [0]], [1, 0], [True, True])
    assert len(ib.row_of) == 2 and ib.tables.shape[0] >= 2
    check(x, [[7], [8, 9]], [1, 0], [[4], [0]])
    # sequence 2 was preempted and re-admitted with a new table: blocks_from 0 rewrites its row
    x = ib.prepare([2], [[7, 10]], [0], [[2]], [0], [True])
    check(x, [[7, 10]], [0], [[2]])
    for seq in range(10, 30):  # more live sequences than rows: the mirror grows
        ib.prepare([seq], [[1]], [0], [[seq]], [0], [True])
    assert len(ib.row_of) == 22 and ib.tables[ib.row_of[29], 0] == 29


def test_graph_padding_lands_where_the_padded_batch_was_laid_out():
    ib = make(max_seqs=4)
    captured = ib.padded(4, max_seq_len=32)
    x = ib.prepare([1, 2], [[5], [6]], [3, 9], [[2], [7, 8, 1]], [0, 0], [True, True], pad_to=4)
    for a, b in ((x.input_ids, captured.input_ids), (x.positions, captured.positions),
                 (x.meta.slot_mapping, captured.meta.slot_mapping), (x.meta.seq_lens, captured.meta.seq_lens),
                 (x.meta.query_start_loc, captured.meta.query_start_loc),
                 (x.meta.block_tables, captured.meta.block_tables)):
        assert a.data_ptr() == b.data_ptr() and a.shape == b.shape  # what the graph reads
    empty = ib.padded(2, max_seq_len=32)  # graphs are captured on padding alone: still a decode batch
    assert empty.meta.decode_only and empty.meta.max_query_len == 1 and empty.meta.max_seq_len == 32
    assert x.meta.decode_only and x.meta.block_tables.shape == (4, 8)
    captured = ib.padded(4, max_seq_len=32)
    x = ib.prepare([1, 2], [[5], [6]], [3, 9], [[], []], [1, 3], [True, True], pad_to=4, max_seq_len=32)
    assert captured.input_ids.tolist() == [5, 6, 0, 0] and captured.positions.tolist() == [3, 9, 0, 0]
    assert captured.meta.slot_mapping.tolist() == [2 * BS + 3, 1 * BS + 1, -1, -1]
    assert captured.meta.seq_lens.tolist() == [4, 10, 1, 1]
    assert captured.meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert captured.meta.block_tables.shape == (4, 8)
    assert captured.meta.block_tables[0, 0] == 2 and captured.meta.block_tables[1, :3].tolist() == [7, 8, 1]
    assert captured.meta.block_tables[2:].abs().sum() == 0
    assert x.sample_rows is None


def test_block_table_longer_than_the_model_length_is_refused():
    ib = make(max_blocks=2)
    try:
        ib.prepare([1], [[1]], [0], [[1, 2, 3]], [0], [True])
    except ValueError as e:
        assert "max_blocks_per_seq 2" in str(e)
    else:
        raise AssertionError("no error")


def test_every_staged_segment_is_16_byte_aligned():
    """Triton specialises a kernel on whether each pointer is 16-byte aligned: a segment whose offset
    varied with the batch size would compile new kernel variants in the middle of a run."""
    ib = InputBatch(max_num_tokens=64, max_num_seqs=9, max_blocks_per_seq=8, block_size=BS, device=torch.device("cpu"))
    for b in range(1, 10):
        ids = list(range(100 + 10 * b, 100 + 10 * b + b))
        for pad_to in (None, 9):
            x = ib.prepare(ids, [[3]] * b, [5] * b, [[b, 1]] * b, None, [True] * (b - 1) + [b % 2 == 0], pad_to=pad_to)
            m = x.meta
            for t in (x.input_ids, x.positions, m.slot_mapping, m.query_start_loc, m.seq_lens, m.block_tables,
                      x.sample_rows):
                if t is not None:
                    assert t.data_ptr() % 16 == 0, (b, pad_to)
            assert x.input_ids[:b].tolist() == [3] * b and m.seq_lens[:b].tolist() == [6] * b
            ib.release(ids)


def test_pending_tokens_are_filled_from_the_last_steps_samples():
    ib = make()
    ib.prepare([1, 2], [[5, 6], [7]], [0, 0], [[0], [1]], [0, 0], [True, True])
    ib.set_sampled([1, 2], torch.tensor([40, 41]))
    # same sequences, same order: the steady-decode path
    x = ib.prepare([1, 2], [[-1], [-1]], [2, 1], [[], []], [1, 1], [True, True])
    assert x.input_ids.tolist() == [40, 41]
    ib.set_sampled([1, 2], torch.tensor([50, 51]))
    # reordered, mixed with a new prefill whose tokens are known
    x = ib.prepare([3, 2, 1], [[8, 9], [-1], [-1]], [0, 2, 3], [[2], [], []], [0, 1, 1], [True, True, True])
    assert x.input_ids.tolist() == [8, 9, 51, 50]
    ib.set_sampled([3, 2], torch.tensor([60, 61]))
    try:
        ib.prepare([1], [[-1]], [4], [[]], [1], [True])  # 1 did not sample in the last step
    except RuntimeError as e:
        assert "pending token" in str(e)
    else:
        raise AssertionError("a pending token with no source must fail")
