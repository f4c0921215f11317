"""Triton MoE grouped GEMM vs the torch expert loop: interpreted on CPU (tiny shapes), real shapes on the GPU."""
import pytest
import torch

pytest.importorskip("triton")

from porter.kernels.moe import MoEConfig, fused_moe, moe_align_block_size, pick_config  # noqa: E402
from porter.kernels.moe_reference import moe_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(tokens, hidden, inter, experts, top_k, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
            weights.to(**to), ids.to(torch.int32).to(**to))


def hand_loop(x, w13, w2, weights, ids):
    """Token by token, slot by slot: the definition of the MoE output, independent of both paths."""
    inter = w13.shape[1] // 2
    x, w13, w2, weights, ids = (t.cpu() for t in (x, w13, w2, weights, ids))
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].double() @ x[t].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += float(weights[t, k]) * (w2[e].double() @ act)
    return out


ALIGN_CASES = {
    "tiny": (torch.tensor([[2, 0], [2, 3], [0, 2], [3, 1], [2, 0]]), 5),  # expert 4 unused
    "two-chunks": (torch.randint(0, 6, (700, 2), generator=torch.Generator().manual_seed(0)), 6),
    "many-experts": (torch.randperm(128, generator=torch.Generator().manual_seed(1))[:24].view(3, 8), 128),
}


@pytest.mark.parametrize("case", list(ALIGN_CASES))
@pytest.mark.parametrize("block_m,dtype", [(16, torch.int32), (32, torch.int64)])
def test_align_block_size_groups_rows_by_expert(case, block_m, dtype):
    ids, num_experts = ALIGN_CASES[case]
    ids = ids.to(dtype=dtype, device=DEVICE)
    sorted_ids, block_expert, num_padded = moe_align_block_size(ids, block_m, num_experts)
    n = ids.numel()
    counts = torch.bincount(ids.flatten().long().cpu(), minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_padded) == int(padded.sum())
    assert sorted_ids.numel() >= int(padded.sum())  # the bound holds
    valid = sorted_ids[:int(padded.sum())].cpu().long()
    flat = ids.flatten().cpu()
    start = 0
    for e in range(num_experts):  # expert e's run: its assignments in token order, then padding
        run = valid[start:start + int(padded[e])]
        assert run[:int(counts[e])].tolist() == torch.nonzero(flat == e).flatten().tolist()
        assert torch.all(run[int(counts[e]):] == n)
        assert torch.all(block_expert[start // block_m:(start + int(padded[e])) // block_m].cpu() == e)
        start += int(padded[e])


def test_reference_matches_hand_loop():
    x, w13, w2, w, ids = make_problem(6, 24, 20, 5, 3, seed=1)
    ref = moe_reference(x, w13, w2, w, ids)
    torch.testing.assert_close(ref.double().cpu(), hand_loop(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_kernel_matches_reference_fp32(activation):
    x, w13, w2, w, ids = make_problem(5, 32, 48, 4, 2)
    out = fused_moe(x, w13, w2, w, ids, activation)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, w, ids, activation), rtol=1e-5, atol=1e-5)


# The GPU's picks (tokens 1, 64, 4096 of 8 experts, top-2) besides a config with several K steps.
CONFIGS = [MoEConfig(block_m=16, gate_up_n=16, gate_up_k=16, down_n=16, down_k=16, group_m=2)]
CONFIGS += [pick_config(t, 2, 8, interpreted=False) for t in (1, 64, 4096)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_kernel_ragged_shapes_and_tile_configs(cfg):
    # H=40, I=24 are not tile multiples; BLOCK_K=16 walks 3 steps over H and 2 over I.
    x, w13, w2, w, ids = make_problem(7, 40, 24, 3, 2, seed=2)
    out = fused_moe(x, w13, w2, w, ids, config=cfg)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)


def test_kernel_top1_single_token():
    x, w13, w2, w, ids = make_problem(1, 32, 32, 4, 1, seed=3)
    out = fused_moe(x, w13, w2, w, ids)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_kernel_low_precision(dtype, tol):
    x, w13, w2, w, ids = make_problem(5, 32, 32, 4, 2, dtype=dtype, seed=4)
    out = fused_moe(x, w13, w2, w, ids)
    assert out.dtype == dtype
    exact = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
    torch.testing.assert_close(out.float(), exact, rtol=tol, atol=tol)


def test_kernel_rejects_bad_input():
    x, w13, w2, w, ids = make_problem(3, 32, 32, 4, 2)
    with pytest.raises(ValueError, match="hidden size"):
        fused_moe(x[:, :16], w13, w2, w, ids)
    with pytest.raises(ValueError, match="activation"):
        fused_moe(x, w13, w2, w, ids, "relu")
    with pytest.raises(ValueError, match="dtype mismatch"):
        fused_moe(x.half(), w13, w2, w, ids)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe(x, w13, w2, w[:, :1], ids)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 64, 333, 2048])
@pytest.mark.parametrize("shape", [(1024, 1792, 8, 2), (512, 352, 60, 4)], ids=["mixtral-ish", "qwen2moe-ish"])
def test_kernel_gpu_bf16(tokens, shape):
    hidden, inter, experts, top_k = shape
    x, w13, w2, w, ids = make_problem(tokens, hidden, inter, experts, top_k, dtype=torch.bfloat16,
                                      device="cuda", seed=tokens)
    out = fused_moe(x, w13, w2, w, ids)
    exact = moe_reference(x.float(), w13.float(), w2.float(), w, ids)
    # bf16 rounding of the intermediate and of each expert's output: compare relative to the output's size.
    err = (out.float() - exact).norm() / exact.norm()
    assert err < 1e-2, f"relative error {err:.2e} with config {pick_config(tokens, top_k, experts)}"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [3, 300])
def test_kernel_gpu_fp32_is_exact(tokens):
    x, w13, w2, w, ids = make_problem(tokens, 256, 320, 8, 2, device="cuda", seed=5)
    out = fused_moe(x, w13, w2, w, ids)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, w, ids), rtol=1e-4, atol=1e-4)
