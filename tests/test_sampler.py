"""Sampler: greedy, temperature, top-k / top-p masks, per-request seeds, logprobs."""
import math

import pytest
import torch

from porter.engine.sampler import Sampler, apply_top_k_top_p
from porter.engine.sampling_params import SamplingParams


def logits_batch(n=4, vocab=50, seed=0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = logits_batch()
    tokens, lps = Sampler()(logits, [SamplingParams(temperature=0)] * 4)
    assert tokens == logits.argmax(-1).tolist()
    assert lps == [None] * 4


def test_greedy_on_half_precision_logits_matches_the_fp32_path_ties_included():
    logits = logits_batch(6).to(torch.bfloat16)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie: the first index wins either way
    greedy, _ = Sampler()(logits, [SamplingParams(temperature=0)] * 6)  # argmax in bf16, no fp32 copy
    with_lp, lps = Sampler()(logits, [SamplingParams(temperature=0, logprobs=0)] * 6)  # the fp32 path
    assert greedy == with_lp == logits.float().argmax(-1).tolist() and greedy[0] == 3
    assert all(set(lp) == {t} for lp, t in zip(lps, with_lp))


def test_top_k_mask_keeps_exactly_k_best():
    logits = logits_batch(3)
    masked = apply_top_k_top_p(logits, torch.tensor([1, 5, 0]), torch.ones(3))
    kept = torch.isfinite(masked)
    assert kept.sum(-1).tolist() == [1, 5, 50]
    top5 = logits[1].topk(5).indices
    assert set(kept[1].nonzero().flatten().tolist()) == set(top5.tolist())
    assert torch.equal(masked[2], logits[2])


def test_top_p_mask_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    masked = apply_top_k_top_p(logits, torch.zeros(3, dtype=torch.long), torch.tensor([0.5, 0.79, 0.81]))
    assert torch.isfinite(masked).tolist() == [
        [True, False, False, False],  # 0.5 already reaches 0.5
        [True, True, False, False],
        [True, True, True, False],
    ]


def test_top_k_then_top_p_combine():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # after top-2 the renormalised mass is 4/7, 3/7: p=0.5 keeps only the first
    masked = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]


def test_sampling_respects_masks():
    logits = logits_batch(2, vocab=30)
    allowed = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(torch.Generator().manual_seed(1))
    seen = set()
    for _ in range(60):
        tokens, _ = sampler(logits, [SamplingParams(temperature=1.5, top_k=3), SamplingParams(temperature=0)])
        seen.add(tokens[0])
        assert tokens[1] == logits[1].argmax().item()
    assert seen <= allowed and len(seen) > 1


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    tokens, _ = Sampler(torch.Generator().manual_seed(0))(logits, [SamplingParams(temperature=1.0)] * 4000)
    freq = torch.bincount(torch.tensor(tokens), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_low_temperature_approaches_greedy():
    logits = logits_batch(8)
    tokens, _ = Sampler(torch.Generator().manual_seed(0))(logits, [SamplingParams(temperature=1e-4)] * 8)
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_requests_reproduce_regardless_of_batch():
    logits = logits_batch(4)
    p = SamplingParams(temperature=1.0, seed=1234)
    runs = []
    for other_seed in (0, 1):
        sampler = Sampler(torch.Generator().manual_seed(other_seed))
        gen = torch.Generator().manual_seed(1234)
        # the seeded row sits at a different position with different neighbours each time
        row = 0 if other_seed == 0 else 2
        batch = logits.clone()
        batch[row] = logits[3]
        params = [SamplingParams(temperature=1.0)] * 4
        params[row] = p
        gens = [None] * 4
        gens[row] = gen
        seq = []
        for _ in range(10):
            tokens, _ = sampler(batch, params, gens)
            seq.append(tokens[row])
        runs.append(seq)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # really sampling


def test_logprobs_are_raw_log_softmax_and_include_chosen():
    logits = logits_batch(3)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=5.0, top_k=40, logprobs=0),
              SamplingParams(temperature=0)]
    tokens, lps = Sampler(torch.Generator().manual_seed(0))(logits, params)
    ref = torch.log_softmax(logits.double(), -1)
    top2 = ref[0].topk(2).indices.tolist()
    assert set(lps[0]) == set(top2) | {tokens[0]}
    assert set(lps[1]) == {tokens[1]}
    for row in (0, 1):
        for t, v in lps[row].items():
            assert math.isclose(v, ref[row, t].item(), abs_tol=1e-5)
    assert lps[2] is None


def test_logprobs_keep_chosen_token_outside_top_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, -2.0]])
    sampler = Sampler(torch.Generator().manual_seed(0))
    # force a low token by masking the others via top_p is impossible; sample until a non-top-1 token
    for _ in range(200):
        tokens, lps = sampler(logits, [SamplingParams(temperature=3.0, logprobs=1)])
        if tokens[0] != 0:
            break
    assert tokens[0] != 0
    assert set(lps[0]) == {0, tokens[0]}


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(top_k=1.5),
    dict(max_tokens=0), dict(stop_token_ids=[-1]), dict(logprobs=-1), dict(seed="x"),
])
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**kwargs)


def test_top_k_zero_means_off():
    assert SamplingParams(top_k=0).top_k == -1
