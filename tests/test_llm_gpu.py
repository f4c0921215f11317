"""The engine on CUDA (triton backend, CUDA graphs for decode) against HF and against eager mode."""
import pytest
import torch

from porter.commands.run import bundled_fixture
from porter.engine import LLM, SamplingParams

from test_llm_parity import hf_greedy, make_prompts, save_tiny_llama

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-gpu")
    return path, save_tiny_llama(path, kv_heads=2, tied=False, seed=4)


def run(path, prompts, max_new, **kw):
    llm = LLM(model=path, device="cuda", dtype="float32", skip_tokenizer_init=True, **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=1))
    return llm, [o.outputs[0] for o in outs]


def test_cuda_graphs_match_hf_and_eager(ckpt):
    path, hf = ckpt
    prompts = make_prompts(160, [5, 21, 9], seed=5)  # 3 decodes pad to the captured size 4
    # two engines live at once in this test: give each a fixed cache instead of 90% of the GPU
    llm, graphed = run(path, prompts, 16, max_num_seqs=8, block_size=16, num_kv_blocks=64)
    assert llm.engine_config.attention_backend == "triton"
    assert llm.runner.graphs is not None and llm.runner.graphs.num_replays > 0
    _, eager = run(path, prompts, 16, max_num_seqs=8, enforce_eager=True, num_kv_blocks=64)
    for prompt, g, e in zip(prompts, graphed, eager):
        ref, ref_lps = hf_greedy(hf, prompt, 16)
        assert g.token_ids == e.token_ids == ref
        for pos, entry in enumerate(g.logprobs):
            assert abs(entry[ref[pos]] - ref_lps[pos][ref[pos]].item()) < 1e-3


def test_preemption_on_gpu_matches_hf(ckpt):
    path, hf = ckpt
    prompts = make_prompts(160, [7, 11, 6, 13, 9], seed=6)
    llm, outs = run(path, prompts, 18, max_num_seqs=5, block_size=16, num_kv_blocks=4)
    assert llm.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 18)[0]


def test_fixture_bf16_auto_sizes_cache_and_generates():
    llm = LLM(model=bundled_fixture(), device="cuda", dtype="bfloat16", max_num_seqs=16)
    assert llm.runner.num_kv_blocks > llm.runner.max_blocks_per_seq
    outs = llm.generate(["The cat", "Once upon a time"] * 4, SamplingParams(temperature=0, max_tokens=24))
    fp32 = LLM(model=bundled_fixture(), device="cpu").generate(["The cat"], SamplingParams(temperature=0, max_tokens=24))
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert outs[0].outputs[0].token_ids[:4] == fp32[0].outputs[0].token_ids[:4]
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids  # same prompt, same batch: same tokens
