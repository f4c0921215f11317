"""Asynchronous scheduling: step n+1 is scheduled and launched before step n's tokens are read back.

The outputs must be exactly those of the synchronous engine (one step at a time) for every way a
sequence can stop or be moved: EOS / stop tokens found one step late, lengths, logprobs, seeded
sampling, chunked prefill, prefix caching and preemption. The spies check that the overlap happens.
"""
import pytest

from porter.commands.run import bundled_fixture
from porter.engine import LLM, SamplingParams
from porter.engine.block_manager import BlockManager
from porter.engine.scheduler import ScheduledBatch, Scheduler
from porter.engine.sequence import Sequence

FIXTURE = bundled_fixture()
PROMPTS = [[5, 17, 42, 8], [9] * 21, [5, 17, 42, 8, 3, 3], list(range(10, 40)), [7]]


def make(async_scheduling: bool, **kw) -> LLM:
    opts = dict(device="cpu", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                max_num_batched_tokens=24)  # chunked prefill for the 30-token prompt
    opts.update(kw)
    return LLM(model=FIXTURE, async_scheduling=async_scheduling, **opts)


def outputs(llm: LLM, params) -> list[tuple]:
    outs = llm.generate(PROMPTS, params)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outs]


def assert_same(got: list[tuple], expected: list[tuple]) -> None:
    """Tokens and finish reasons exactly; logprobs to fp32 noise (an extra step after an EOS changes
    which sequences share a batch, hence the summation order)."""
    for (tok, why, lps), (tok_e, why_e, lps_e) in zip(got, expected, strict=True):
        assert (tok, why) == (tok_e, why_e)
        assert (lps is None) == (lps_e is None)
        for a, b in zip(lps or [], lps_e or [], strict=True):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=10, seed=3, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),  # runs into max_model_len
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1, seed=11),
    ]


def a_token_greedy_decoding_reaches(llm: LLM) -> int:
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return out[0].outputs[0].token_ids[3]  # stops prompt 0 after 4 tokens, with its next step in flight


@pytest.mark.parametrize("kw", [
    {},
    {"block_size": 4, "num_kv_blocks": 18},  # preemption by recompute
    {"enable_prefix_caching": False},
], ids=["default", "preempting", "no-prefix-cache"])
def test_async_outputs_equal_sync_outputs(kw):
    sync, overlapped = make(False, **kw), make(True, **kw)
    params = mixed_params(a_token_greedy_decoding_reaches(sync))
    expected = outputs(sync, params)
    got = outputs(overlapped, params)
    assert_same(got, expected)
    assert expected[0][1] == "stop" and len(expected[0][0]) == 4  # the stop token case really ran
    assert expected[3][1] == "length" and len(expected[3][0]) == 64 - 30
    if "num_kv_blocks" in kw:
        assert overlapped.scheduler.num_preemptions > 0
    # nothing leaks: every block is free again, no sequence is left in flight
    assert overlapped.block_manager.num_free_blocks == overlapped.block_manager.num_blocks
    assert overlapped._in_flight is None and not overlapped.scheduler.has_unfinished()
    assert_same(outputs(overlapped, params), expected)  # and again, with the prefix cache warm


def test_next_step_is_launched_before_the_last_is_read_back():
    llm = make(True)
    events = []
    launch = llm.runner.launch

    def spy_launch(step):
        events.append(("launch", any(-1 in t for t in step.new_token_ids)))
        pending = launch(step)
        result = pending.result
        pending.result = lambda: (events.append(("read", None)), result())[1]
        return pending

    llm.runner.launch = spy_launch
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5
    kinds = [e[0] for e in events]
    # prefill launched, then decode 1 launched (its input pending on the device) before the prefill is read
    assert kinds[:3] == ["launch", "launch", "read"]
    assert events[1] == ("launch", True)
    assert kinds.count("launch") == kinds.count("read") == 5  # the 5th token is the last by length: no extra step


def test_sequence_stopped_by_eos_drops_its_in_flight_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32, eos_token_ids={1})
    seq = Sequence(0, [5, 6, 7], SamplingParams(temperature=0, max_tokens=10))
    sched.add(seq)
    first = sched.schedule()
    sched.launched(first)
    second = sched.schedule()  # scheduled while `first` is in flight: its input token is pending
    assert second.seqs == [seq] and seq.num_pending == 1
    sched.launched(second)
    assert seq.num_pending == 2 and seq.num_tokens == 5 and seq.token_ids == [5, 6, 7]
    finished = sched.update(first, [1])  # EOS: the token `second` computes is thrown away
    assert finished == [seq] and seq.finish_reason == "stop"
    assert seq.token_ids == [5, 6, 7, 1] and seq.num_tokens == 4 and seq.num_pending == 0
    assert bm.num_free_blocks == 8 and not sched.has_unfinished()
    assert sched.update(second, [42]) == [] and seq.token_ids == [5, 6, 7, 1]


def test_last_token_by_length_in_flight_is_not_scheduled_again():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32)
    seq = Sequence(0, [5, 6, 7], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    sched.add(seq)
    first = sched.schedule()
    sched.launched(first)
    assert seq.last_in_flight
    empty = sched.schedule()  # nothing to do until the token arrives; not a stall error
    assert isinstance(empty, ScheduledBatch) and empty.seqs == []
    assert sched.update(first, [9]) == [seq] and seq.finish_reason == "length" and seq.token_ids == [5, 6, 7, 9]


def test_stream_under_async_scheduling_matches_generate():
    llm = make(True)
    stop = a_token_greedy_decoding_reaches(llm)
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop])
    whole = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    streamed = []
    for delta in llm.generate_stream(PROMPTS[0], params):
        assert -1 not in delta.token_ids
        streamed += delta.token_ids
    assert streamed == whole and whole[-1] == stop
    assert llm._in_flight is None and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
