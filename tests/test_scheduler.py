"""Scheduler bookkeeping with a stand-in model whose next token is a function of the whole context,
so any token lost, duplicated or reordered by chunking or preemption changes the outputs."""
import pytest

from porter.engine.block_manager import BlockManager
from porter.engine.sampling_params import SamplingParams
from porter.engine.scheduler import Scheduler
from porter.engine.sequence import Sequence

EOS = 1


def next_token(ids):
    return (sum((i + 1) * t for i, t in enumerate(ids)) % 47) + 3  # never EOS (1) or 2


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens_per_step=64, max_model_len=64, caching=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens_per_step,
                     max_model_len=max_model_len, eos_token_ids={EOS})


def check_invariants(sched, batch):
    bm = sched.block_manager
    assert len(batch.seqs) <= sched.max_num_seqs
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(set(id(s) for s in batch.seqs)) == len(batch.seqs)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert n >= 1
        assert seq.num_computed_tokens + n <= seq.num_tokens
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + n
    # a block being written (holding the tokens computed this step) belongs to one sequence only
    written = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        first, last = seq.num_computed_tokens // bm.block_size, (seq.num_computed_tokens + n - 1) // bm.block_size
        written += seq.block_table[first : last + 1]
    assert len(written) == len(set(written))
    for b in written:
        assert bm.blocks[b].ref_count == 1


def drive(sched, seqs, record=None):
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        check_invariants(sched, batch)
        if record is not None:
            record.append([(s.seq_id, n, batch.samples(i)) for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))])
        sampled = [next_token(s.token_ids) for i, s in enumerate(batch.seqs) if batch.samples(i)]
        sched.launched(batch)
        sched.update(batch, sampled)
        steps += 1
        assert steps < 10_000
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks  # nothing leaked
    return [s.output_token_ids for s in seqs]


def prompts(n, base_len=5):
    return [[(7 * i + j) % 40 + 3 for j in range(base_len + (i * 3) % 11)] for i in range(n)]


def seqs_for(ps, max_tokens=12, **kw):
    return [Sequence(i, p, SamplingParams(temperature=0, max_tokens=max_tokens, **kw)) for i, p in enumerate(ps)]


def expected(p, max_tokens):
    ids = list(p)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(p):]


def test_outputs_match_a_sequential_reference():
    ps = prompts(6)
    outs = drive(make(), seqs_for(ps))
    assert outs == [expected(p, 12) for p in ps]


def test_mixed_batch_decodes_with_new_prefill():
    sched = make()
    a = Sequence(0, [5, 6, 7], SamplingParams(max_tokens=5))
    sched.add(a)
    batch = sched.schedule()
    sched.launched(batch)
    sched.update(batch, [9])
    b = Sequence(1, [8, 9, 10, 11, 12], SamplingParams(max_tokens=5))
    sched.add(b)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert batch.num_new_tokens == [1, 5]
    assert not batch.is_decode_only and batch.samples(0) and batch.samples(1)


def test_long_prompt_is_prefilled_in_chunks():
    record = []
    p = list(range(3, 23))  # 20 tokens
    out = drive(make(max_tokens_per_step=8), seqs_for([p], max_tokens=3), record)
    assert out == [expected(p, 3)]
    assert [step[0][1:] for step in record[:3]] == [(8, False), (8, False), (4, True)]


def test_token_budget_shared_between_decodes_and_prefills():
    record = []
    ps = prompts(4, base_len=9)
    outs = drive(make(max_tokens_per_step=10, max_num_seqs=4), seqs_for(ps, max_tokens=6), record)
    assert outs == [expected(p, 6) for p in ps]
    assert any(len(step) > 1 and any(n == 1 for _, n, _ in step) and any(n > 1 for _, n, _ in step)
               for step in record)


def test_max_num_seqs_caps_the_batch():
    record = []
    ps = prompts(7)
    outs = drive(make(max_num_seqs=3), seqs_for(ps, max_tokens=4), record)
    assert outs == [expected(p, 4) for p in ps]
    assert max(len(step) for step in record) == 3


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_when_blocks_run_out_loses_nothing(caching):
    ps = prompts(8, base_len=6)
    plenty = drive(make(num_blocks=256, caching=caching), seqs_for(ps, max_tokens=20))
    sched = make(num_blocks=12, caching=caching)  # each sequence grows to 7 blocks: at most ~2 fit
    scarce_seqs = seqs_for(ps, max_tokens=20)
    scarce = drive(sched, scarce_seqs)
    assert sched.num_preemptions > 0
    assert any(s.num_preemptions for s in scarce_seqs)
    assert scarce == plenty == [expected(p, 20) for p in ps]


def test_stop_conditions():
    sched = make(max_model_len=10)
    eos = Sequence(0, [3, 4], SamplingParams(max_tokens=10))
    ignore = Sequence(1, [3, 4], SamplingParams(max_tokens=3, ignore_eos=True))
    stop = Sequence(2, [3, 4], SamplingParams(max_tokens=10, stop_token_ids=[42]))
    length = Sequence(3, [3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=10))
    for s in (eos, ignore, stop, length):
        sched.add(s)
    batch = sched.schedule()
    sched.launched(batch)
    sched.update(batch, [EOS, EOS, 42, 5])
    assert eos.finish_reason == "stop" and eos.output_token_ids == [EOS]
    assert stop.finish_reason == "stop" and stop.output_token_ids == [42]
    assert not ignore.is_finished and not length.is_finished
    while sched.has_unfinished():
        batch = sched.schedule()
        sched.launched(batch)
        sched.update(batch, [EOS if s is ignore else 5 for i, s in enumerate(batch.seqs) if batch.samples(i)])
    assert ignore.finish_reason == "length" and ignore.output_token_ids == [EOS] * 3
    assert length.finish_reason == "length" and length.num_tokens == 10  # max_model_len


def test_requests_that_can_never_run_fail_alone():
    sched = make(num_blocks=4, block_size=4, max_model_len=32)
    too_long = Sequence(0, list(range(3, 40)), SamplingParams(max_tokens=2))
    too_big = Sequence(1, list(range(3, 15)), SamplingParams(max_tokens=10))  # 21 KV tokens > 16 slots
    empty = Sequence(2, [], SamplingParams())
    ok = Sequence(3, [3, 4, 5], SamplingParams(max_tokens=4))
    outs = drive(sched, [too_long, too_big, empty, ok])
    assert too_long.finish_reason == "error" and "max_model_len" in too_long.error
    assert too_big.finish_reason == "error" and "KV blocks" in too_big.error
    assert empty.finish_reason == "error" and "empty" in empty.error
    assert ok.finish_reason == "length" and outs[3] == expected([3, 4, 5], 4)


def test_prefix_cache_hit_skips_computed_tokens():
    sched = make(block_size=4)
    shared = [3, 4, 5, 6, 7, 8, 9, 10]
    first = Sequence(0, shared + [11], SamplingParams(max_tokens=2))
    drive(sched, [first])
    second = Sequence(1, shared + [12, 13], SamplingParams(max_tokens=2))
    record = []
    out = drive(sched, [second], record)
    assert second.num_cached_tokens == 8
    assert record[0] == [(1, 2, True)]  # only the two uncached prompt tokens are computed
    assert out == [expected(shared + [12, 13], 2)]


def test_admission_groups_keep_decode_steps_decode_only():
    sched = make(max_num_seqs=8, num_blocks=256)
    sched.admission_group, sched.max_admission_hold = 4, 1000
    ps = prompts(20)
    # staggered lengths: running sequences finish one by one
    seqs = [Sequence(i, p, SamplingParams(temperature=0, max_tokens=3 + (5 * i) % 17)) for i, p in enumerate(ps)]
    record = []
    outs = drive(sched, seqs, record)
    assert outs == [expected(p, s.params.max_tokens) for p, s in zip(ps, seqs)]
    seen = set()
    for step in record:
        new = [seq_id for seq_id, _, _ in step if seq_id not in seen]
        seen.update(new)
        # after the first step, prefills join only in groups (the tail of the queue may be smaller)
        if new and len(seen) > 8:
            assert len(new) >= min(4, 20 - (len(seen) - len(new)))
    mixed = sum(1 for step in record if any(n > 1 for _, n, _ in step))
    assert mixed <= 1 + (20 - 8 + 3) // 4


def test_held_admissions_are_bounded():
    sched = make(max_num_seqs=4, num_blocks=256)
    sched.admission_group, sched.max_admission_hold = 4, 3
    seqs = [Sequence(i, [5, 6, 7], SamplingParams(max_tokens=40 if i < 3 else 2)) for i in range(6)]
    record = []
    drive(sched, seqs, record)
    # seq 3 finishes early, one seat frees: seq 4 joins after at most 3 held steps, not when 4 seats free
    first_step_of_4 = next(i for i, step in enumerate(record) if any(s == 4 for s, _, _ in step))
    finish_of_3 = max(i for i, step in enumerate(record) if any(s == 3 for s, _, _ in step))
    assert first_step_of_4 - finish_of_3 <= 4
