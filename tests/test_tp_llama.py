"""Tensor parallelism end to end on CPU (gloo, two worker processes): TP=2 generates the same greedy
tokens and logprobs as TP=1, each rank holds exactly its slice of the checkpoint, and failures are
clear errors."""
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from porter.engine import LLM, SamplingParams
from porter.engine.executor import WorkerDiedError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
# two prompts; the longer one spans two KV blocks of 16
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11 + (i * 37) % 600 for i in range(21)]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)


def make_llama(path: Path, **overrides) -> Path:
    """A tiny random HF Llama checkpoint. A wide init spreads the logits, so greedy choices are
    not near-ties that summation order (all-reduce vs one matmul) could flip."""
    cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
               num_hidden_layers=2, vocab_size=100, max_position_embeddings=128, initializer_range=0.2,
               tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    HFLlama(LlamaConfig(**cfg)).save_pretrained(path)
    return path


def start(path: Path, tp: int) -> LLM:
    return LLM(path, tensor_parallel_size=tp, device="cpu", skip_tokenizer_init=True, max_model_len=64,
               num_kv_blocks=16, max_num_seqs=4)


def run(llm: LLM, prompts):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, GREEDY)]


def assert_same_generation(tp1, tp2):
    for (ids1, lps1), (ids2, lps2) in zip(tp1, tp2, strict=True):
        assert ids2 == ids1
        for step1, step2 in zip(lps1, lps2, strict=True):
            assert step2.keys() == step1.keys()
            for tok in step1:
                assert step2[tok] == pytest.approx(step1[tok], abs=1e-4)


# --- the expected slice of each parameter on rank r, written from the sharding rules ---------------

def _rows(t, r, tp):
    n = t.shape[0] // tp
    return t[r * n:(r + 1) * n]


def _cols(t, r, tp):
    n = t.shape[1] // tp
    return t[:, r * n:(r + 1) * n]


def _vocab_rows(t, r, tp, pad_to=64):
    padded = -(-t.shape[0] // pad_to) * pad_to
    padded = -(-padded // tp) * tp
    per = padded // tp
    part = t[r * per:(r + 1) * per]
    return torch.cat([part, part.new_zeros(per - part.shape[0], t.shape[1])])


def expected_shard(ckpt: dict, name: str, hf, r: int, tp: int) -> torch.Tensor:
    if name.endswith("qkv_proj.weight"):
        base = name.removesuffix("qkv_proj.weight")
        kv = hf.num_key_value_heads
        kv_rank = r // max(1, tp // kv)  # ranks share a KV head when there are fewer than ranks
        k, v = ckpt[base + "k_proj.weight"], ckpt[base + "v_proj.weight"]
        kv_rows = max(1, kv // tp) * (k.shape[0] // kv)
        return torch.cat([_rows(ckpt[base + "q_proj.weight"], r, tp),
                          k[kv_rank * kv_rows:(kv_rank + 1) * kv_rows], v[kv_rank * kv_rows:(kv_rank + 1) * kv_rows]])
    if name.endswith("gate_up_proj.weight"):
        base = name.removesuffix("gate_up_proj.weight")
        return torch.cat([_rows(ckpt[base + "gate_proj.weight"], r, tp), _rows(ckpt[base + "up_proj.weight"], r, tp)])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return _cols(ckpt[name], r, tp)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return _vocab_rows(ckpt[name], r, tp)
    return ckpt[name]  # norms: replicated


def _pid(runner) -> int:
    return os.getpid()


def _parameters(runner) -> dict:
    return {n: p.detach().clone() for n, p in runner.model.named_parameters()}


def assert_rank_shards(llm: LLM, ckpt_dir: Path):
    ckpt = load_file(str(ckpt_dir / "model.safetensors"))
    hf = llm.engine_config.hf_config
    per_rank = llm.runner.executor.collective_rpc(_parameters)
    assert len(per_rank) == 2
    for r, params in enumerate(per_rank):
        assert params, "a rank has no parameters"
        for name, value in params.items():
            assert torch.equal(value, expected_shard(ckpt, name, hf, r, 2)), f"rank {r}: {name}"


# --- tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_tp1():
    return run(start(FIXTURE, 1), PROMPTS)


@pytest.fixture(scope="module")
def fixture_tp2_llm():
    llm = start(FIXTURE, 2)
    yield llm
    llm.runner.shutdown()


def test_fixture_llama_tp2_matches_tp1(fixture_tp1, fixture_tp2_llm):
    assert_same_generation(fixture_tp1, run(fixture_tp2_llm, PROMPTS))


def test_fixture_llama_ranks_hold_their_slices(fixture_tp2_llm):
    assert_rank_shards(fixture_tp2_llm, FIXTURE)


def test_fewer_kv_heads_than_ranks_replicates_them(tmp_path):
    ckpt = make_llama(tmp_path / "kv1")
    tp1 = run(start(ckpt, 1), PROMPTS)
    llm = start(ckpt, 2)
    try:
        assert_same_generation(tp1, run(llm, PROMPTS))
        assert_rank_shards(llm, ckpt)  # both ranks hold the one KV head
    finally:
        llm.runner.shutdown()


def test_model_that_cannot_be_split_fails_before_workers_start(tmp_path):
    import multiprocessing

    before = set(multiprocessing.active_children())  # the shared TP engine's workers
    ckpt = make_llama(tmp_path / "odd", num_attention_heads=2, num_key_value_heads=2, intermediate_size=66,
                      hidden_size=32, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"cannot be split over tensor_parallel_size=4: .*num_attention_heads=2") as e:
        start(ckpt, 4)
    assert "intermediate_size=66 is not divisible by 4" in str(e.value)
    assert set(multiprocessing.active_children()) <= before


def test_only_rank0_samples(fixture_tp2_llm):
    """Every rank runs the forward and the logits gather; the sampler runs on rank 0 alone. (This
    writes K/V into block 0, so it runs after the tests that read the shared engine's cache.)"""
    from porter.engine.model_runner import StepInput

    step = StepInput(seq_ids=[0], new_token_ids=[[5, 17, 42]], num_computed=[0], block_tables=[[0]],
                     sample=[True], params=[GREEDY], finished_seq_ids=[])
    (tokens0, logprobs0), (tokens1, logprobs1) = fixture_tp2_llm.runner.executor.collective_rpc("execute", step)
    assert len(tokens0) == 1 and set(logprobs0[0]) >= {tokens0[0]}
    assert (tokens1, logprobs1) == ([], [])


def test_killed_worker_makes_generate_raise(fixture_tp2_llm):
    """Last user of the shared TP engine: it kills a worker."""
    pids = fixture_tp2_llm.runner.executor.collective_rpc(_pid)
    os.kill(pids[1], signal.SIGKILL)
    outcome = {}

    def attempt():
        try:
            run(fixture_tp2_llm, PROMPTS)
            outcome["result"] = "no error"
        except WorkerDiedError as e:
            outcome["result"] = e

    t = threading.Thread(target=attempt, daemon=True)  # watchdog: a hang fails instead of blocking
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "generate hung after a worker was killed"
    assert isinstance(outcome["result"], WorkerDiedError)
    assert "rank 1" in str(outcome["result"]) and "SIGKILL" in str(outcome["result"])


def test_porter_run_tp2_streams_the_tp1_completion():
    from typer.testing import CliRunner

    from porter.cli import app

    cli = CliRunner()
    args = ["run", str(FIXTURE), "--prompt", "Once upon a time", "--max-tokens", "10", "--device", "cpu"]
    tp1 = cli.invoke(app, args)
    tp2 = cli.invoke(app, [*args, "--tp", "2"])
    assert tp1.exit_code == 0 and tp2.exit_code == 0, tp1.output + tp2.output
    assert tp2.output.splitlines()[0] == tp1.output.splitlines()[0]
    bad = cli.invoke(app, [*args, "--tp", "4"])
    assert bad.exit_code == 1
    assert "cannot be split over tensor_parallel_size=4" in bad.output and "num_attention_heads=6" in bad.output


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL, one per rank)")
def test_tp2_bf16_on_two_gpus_is_close_to_tp1():
    """vLLM's check_logprobs_close rule: tokens equal until the first divergence, where each side's
    token is in the other's top-5. TP=2 first, so this process has no CUDA context yet."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 750, (int(n),), generator=g).tolist() for n in torch.randint(5, 60, (8,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
    outs = {}
    for tp in (2, 1):
        llm = LLM(FIXTURE, tensor_parallel_size=tp, device="cuda", dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=128)
        outs[tp] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]
        if tp == 2:
            llm.runner.shutdown()
    for (ids1, lps1), (ids2, lps2) in zip(outs[1], outs[2]):
        d = next((i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b), None)
        if d is not None:
            assert ids1[d] in lps2[d] and ids2[d] in lps1[d], f"step {d}: {ids1[d]} vs {ids2[d]}"
