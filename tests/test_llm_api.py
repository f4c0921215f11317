"""LLM API behaviour: input forms, per-request errors, seeds, streaming, bad arguments."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from porter.commands.run import bundled_fixture
from porter.engine import LLM, SamplingParams

FIXTURE = bundled_fixture()


@pytest.fixture(scope="module")
def llm():
    return LLM(model=FIXTURE, device="cpu", max_model_len=48, max_num_seqs=4)


def test_input_forms_and_order(llm):
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ids = llm.tokenizer.encode("The cat")
    single_text = llm.generate("The cat", p)
    single_ids = llm.generate(ids, p)
    batch = llm.generate(["Once upon a time", ids, "The cat"], p)
    assert len(single_text) == len(single_ids) == 1 and len(batch) == 3
    assert single_text[0].outputs[0].token_ids == single_ids[0].outputs[0].token_ids
    assert batch[1].outputs[0].token_ids == batch[2].outputs[0].token_ids == single_ids[0].outputs[0].token_ids
    assert batch[0].prompt == "Once upon a time" and batch[1].prompt is None
    assert batch[2].prompt_token_ids == ids
    assert len({o.request_id for o in batch}) == 3


def test_too_long_prompt_fails_alone(llm):
    long_prompt = list(range(3, 63))  # 60 tokens > max_model_len 48
    outs = llm.generate([long_prompt, "The cat"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    bad, good = outs
    assert bad.outputs[0].finish_reason == "error" and bad.finished
    assert "max_model_len" in bad.error and bad.outputs[0].token_ids == []
    assert good.error is None and len(good.outputs[0].token_ids) == 4


def test_request_larger_than_the_cache_fails_alone():
    small = LLM(model=FIXTURE, device="cpu", num_kv_blocks=2)  # 32 token slots
    outs = small.generate([[5] * 20, [5] * 20], [SamplingParams(max_tokens=20), SamplingParams(max_tokens=5)])
    assert outs[0].outputs[0].finish_reason == "error" and "KV blocks" in outs[0].error
    assert outs[1].error is None and outs[1].outputs[0].finish_reason in ("stop", "length")


def test_out_of_vocabulary_token_fails_alone(llm):
    outs = llm.generate([[5, 10_000], [5, 6]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert outs[0].outputs[0].finish_reason == "error" and "vocabulary" in outs[0].error
    assert len(outs[1].outputs[0].token_ids) == 2


def test_generation_stops_at_max_model_len(llm):
    prompt = list(range(3, 43))  # 40 tokens, room for 8 more
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 8


def test_per_request_params_and_seeds(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    alone = llm.generate(["The cat"], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(["Once upon a time", "The cat", "A"],
                         [SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True), seeded,
                          SamplingParams(temperature=0, max_tokens=3)])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate(["The cat"], SamplingParams(temperature=1.0, max_tokens=12, seed=8, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone
    assert len(mixed[0].outputs[0].token_ids) == 20 and len(mixed[2].outputs[0].token_ids) <= 3


def test_stop_token_ids(llm):
    greedy = llm.generate(["The cat"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    third = greedy.outputs[0].token_ids[2]
    stopped = llm.generate(["The cat"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                       stop_token_ids=[third]))[0]
    first_hit = greedy.outputs[0].token_ids.index(third)
    assert stopped.outputs[0].token_ids == greedy.outputs[0].token_ids[: first_hit + 1]
    assert stopped.outputs[0].finish_reason == "stop"


def test_generate_stream_matches_generate(llm):
    p = SamplingParams(temperature=0, max_tokens=12)
    full = llm.generate(["Once upon a time"], p)[0]
    deltas = list(llm.generate_stream("Once upon a time", p))
    assert sum((d.token_ids for d in deltas), []) == full.outputs[0].token_ids
    assert "".join(d.text for d in deltas).strip() == full.outputs[0].text.strip()
    assert deltas[-1].finished and deltas[-1].output.outputs[0].token_ids == full.outputs[0].token_ids
    assert not any(d.finished for d in deltas[:-1])


def test_abandoned_stream_leaves_engine_usable(llm):
    stream = llm.generate_stream("The cat", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.scheduler.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert len(llm.generate(["The cat"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) >= 1


def test_bad_arguments(llm, tmp_path):
    with pytest.raises(ValueError, match="sampling params for"):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(model=tmp_path / "nope")
    with pytest.raises(ValueError, match="exceeds"):
        LLM(model=FIXTURE, max_model_len=100_000)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=FIXTURE, dtype="float8")
    with pytest.raises(ValueError, match="block_size"):
        LLM(model=FIXTURE, block_size=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model=FIXTURE, max_num_seqs=0)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["architectures"] = ["NotARealForCausalLM"]  # save_pretrained writes the class it saved
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="NotARealForCausalLM"):
        LLM(model=tmp_path, skip_tokenizer_init=True)


def test_text_prompt_without_tokenizer_is_refused(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    llm = LLM(model=tmp_path, skip_tokenizer_init=True, num_kv_blocks=8)
    assert llm.runner.num_kv_blocks == 8
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello")
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""


def test_warm_up_steps_leave_the_cache_and_the_outputs_untouched(llm):
    """The dummy steps the runner takes at start-up on CUDA (to compile kernels) run here on CPU: they
    write no K/V and leave no sequence state behind."""
    before = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids
    caches = [(a.k_cache.clone(), a.v_cache.clone()) for a in llm.runner.attn_layers]
    llm.runner._warm_up()
    assert all(torch.equal(a.k_cache, k) and torch.equal(a.v_cache, v)
               for a, (k, v) in zip(llm.runner.attn_layers, caches))
    assert all(seq_id >= 0 for seq_id in llm.runner.inputs.row_of)  # the dummy sequences are gone
    after = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids
    assert after == before
