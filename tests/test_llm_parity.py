"""The engine end to end against HF transformers: greedy tokens identical, logprobs within 1e-4,
on the bundled fixture and on tiny random Llama checkpoints (GQA/MHA, tied/untied), alone, as a
ragged batch generated together, through chunked prefill, and under preemption."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from porter.commands.run import bundled_fixture
from porter.engine import LLM, SamplingParams

FIXTURE = bundled_fixture()


def hf_greedy(model, prompt: list[int], max_new: int):
    """HF generate(do_sample=False) with EOS disabled: (new token ids, per-step log_softmax rows)."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, min_new_tokens=0, eos_token_id=None,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1) for step in out.logits]
    return tokens, logprobs


def make_prompts(vocab: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def save_tiny_llama(path, *, kv_heads: int, tied: bool, seed: int = 0):
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=160, max_position_embeddings=256,
        tie_word_embeddings=tied, initializer_range=0.1, architectures=["LlamaForCausalLM"],
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def assert_matches_hf(hf_model, llm, prompts, max_new, logprobs=3, **llm_kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(hf_model, prompt, max_new)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged"
        assert got.finish_reason == "length" and out.error is None
        for pos, (entry, ref) in enumerate(zip(got.logprobs, ref_lps)):
            assert set(entry) >= set(ref.topk(logprobs).indices.tolist()) and ref_tokens[pos] in entry
            for token, value in entry.items():
                assert math.isclose(value, ref[token].item(), abs_tol=1e-4), (pos, token, value, ref[token].item())
    return outs


@pytest.fixture(scope="module")
def fixture_hf():
    return AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fixture_llm():
    return LLM(model=FIXTURE, device="cpu", max_num_seqs=8)


def test_fixture_greedy_and_logprobs_match_hf_ragged_batch(fixture_hf, fixture_llm):
    tok = fixture_llm.tokenizer
    texts = ["The cat", "Once upon a time there was", "A paged attention engine keeps its cache in blocks so"]
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    assert_matches_hf(fixture_hf, fixture_llm, prompts, max_new=24)


def test_fixture_text_prompts_stop_at_eos_like_hf(fixture_hf, fixture_llm):
    outs = fixture_llm.generate(["The cat", "Once upon a time"], SamplingParams(temperature=0, max_tokens=40))
    for out in outs:
        ref = fixture_hf.generate(torch.tensor([out.prompt_token_ids]), do_sample=False, max_new_tokens=40,
                                  pad_token_id=2)[0, len(out.prompt_token_ids):].tolist()
        if 1 in ref:  # HF stops after EOS (and pads a batch); ours stops too
            ref = ref[: ref.index(1) + 1]
            assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == fixture_llm.tokenizer.decode(ref, skip_special_tokens=True)
        assert out.prompt is not None


@pytest.mark.parametrize("kv_heads,tied", [(2, True), (4, False), (1, False)])
def test_tiny_random_llama_matches_hf(tmp_path, kv_heads, tied):
    hf = save_tiny_llama(tmp_path, kv_heads=kv_heads, tied=tied)
    llm = LLM(model=tmp_path, device="cpu", skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=16)
    # block size 4 and a 16-token budget: multi-block tables, chunked prefill of the 21-token prompt,
    # and decodes batched with prefill chunks
    prompts = make_prompts(160, [5, 21, 1, 9])
    assert_matches_hf(hf, llm, prompts, max_new=12)


def test_preemption_keeps_outputs_identical_to_hf(tmp_path):
    hf = save_tiny_llama(tmp_path, kv_heads=2, tied=False, seed=1)
    llm = LLM(model=tmp_path, device="cpu", skip_tokenizer_init=True, block_size=4, num_kv_blocks=14,
              max_num_seqs=6)
    prompts = make_prompts(160, [7, 11, 6, 13, 9, 8], seed=1)  # each grows to 5-8 blocks; 14 exist
    assert_matches_hf(hf, llm, prompts, max_new=18, logprobs=1)
    assert llm.scheduler.num_preemptions > 0
    assert llm.block_manager.num_free_blocks == 14


def test_prefix_cache_reuses_blocks_with_identical_output(tmp_path):
    hf = save_tiny_llama(tmp_path, kv_heads=2, tied=True, seed=2)
    llm = LLM(model=tmp_path, device="cpu", skip_tokenizer_init=True, block_size=8)
    shared = make_prompts(160, [35], seed=3)[0]
    first = llm.generate([shared + [10, 11]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert first.num_cached_tokens == 0
    hits_before = llm.block_manager.num_hit_blocks
    second_prompt = shared + [20, 21, 22]
    second = assert_matches_hf(hf, llm, [second_prompt], max_new=6)[0]
    assert second.num_cached_tokens == 32  # four full blocks of the shared 35 tokens
    assert llm.block_manager.num_hit_blocks - hits_before == 4
    cold = LLM(model=tmp_path, device="cpu", skip_tokenizer_init=True, block_size=8, enable_prefix_caching=False)
    cold_out = cold.generate([second_prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert cold_out.num_cached_tokens == 0
    assert cold_out.outputs[0].token_ids == second.outputs[0].token_ids
