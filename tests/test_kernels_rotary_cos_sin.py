"""Rotate-half rotary from per-token cos/sin rows: the Triton kernel (interpreted on CPU) vs its torch
reference and HF's apply_rotary_pos_emb; the engine function's CPU path is HF's math bit for bit."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from porter.engine.layers import rotary
from porter.engine.layers.rotary import apply_rotary_cos_sin
from porter.kernels.rotary_cos_sin import rotary_cos_sin, rotary_cos_sin_ref


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run under TRITON_INTERPRET=1


def _inputs(t, hq, hk, d, rot, dtype=torch.float32, device=DEVICE, scaling=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hk, d, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.randint(0, 100, (t,), generator=g).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    return [x.to(dtype).to(device) for x in (q, k, cos, sin)]


@pytest.mark.parametrize("rot", [8, 4])  # full and partial rotary
def test_kernel_matches_reference_and_hf(rot):
    q, k, cos, sin = _inputs(3, 2, 1, 8, rot, scaling=0.7)
    qo, ko = rotary_cos_sin(q, k, cos, sin)
    q_ref, k_ref = rotary_cos_sin_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, k_ref, atol=1e-6, rtol=1e-6)
    if rot == 8:  # HF's own function on the full width
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        torch.testing.assert_close(qo, q_hf, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ko, k_hf, atol=1e-6, rtol=1e-6)
    else:  # the pass-through dims are copied unchanged
        assert torch.equal(qo[..., rot:], q[..., rot:]) and torch.equal(ko[..., rot:], k[..., rot:])
        assert not torch.equal(qo[..., :rot], q[..., :rot])


def test_kernel_reads_strided_views_and_leaves_inputs_alone():
    g = torch.Generator().manual_seed(2)
    t, hq, hk, d = 3, 2, 1, 8
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(DEVICE)
    q = qkv[:, : hq * d].view(t, hq, d)  # strided rows of a fused projection
    k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
    _, _, cos, sin = _inputs(t, hq, hk, d, d)
    before = qkv.clone()
    qo, ko = rotary_cos_sin(q, k, cos, sin)
    q_ref, k_ref = rotary_cos_sin_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, k_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv, before)


def test_bad_shapes_get_a_clear_error():
    q, k, cos, sin = _inputs(3, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="rotary dim 5"):
        rotary_cos_sin(q, k, torch.zeros(3, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, heads, D\]"):
        rotary_cos_sin(q[None], k, cos, sin)
    with pytest.raises(ValueError, match="apply_rotary_cos_sin"):
        apply_rotary_cos_sin(q, k, cos[:2], sin[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [16, 8])
def test_engine_cpu_path_is_hf_math_bit_for_bit(dtype, rot, monkeypatch):
    monkeypatch.setattr(rotary, "USE_KERNEL", False)
    q, k, cos, sin = _inputs(5, 4, 2, 16, rot, dtype=dtype, scaling=1.3)
    qo, ko = apply_rotary_cos_sin(q, k, cos, sin)
    if rot == 16:
        q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    else:  # HF's partial-rotary models rotate the first rot dims with the same expression
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin)
        q_hf, k_hf = torch.cat((q_rot, q[..., rot:]), -1), torch.cat((k_rot, k[..., rot:]), -1)
    assert torch.equal(qo, q_hf) and torch.equal(ko, k_hf)


def test_engine_dispatches_to_the_kernel_when_forced(monkeypatch):
    q, k, cos, sin = _inputs(3, 2, 2, 8, 8)
    monkeypatch.setattr(rotary, "USE_KERNEL", False)
    torch_out = apply_rotary_cos_sin(q, k, cos, sin)
    from porter.kernels import rotary_cos_sin as ops

    calls = []
    monkeypatch.setattr(ops, "rotary_cos_sin", lambda *a: calls.append(1) or rotary_cos_sin(*a))
    monkeypatch.setattr(rotary, "USE_KERNEL", True)
    kernel_out = apply_rotary_cos_sin(q, k, cos, sin)
    assert calls == [1]
    for a, b in zip(kernel_out, torch_out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rot", [128, 64])
def test_gpu_kernel_matches_reference_at_qwen3_shapes(dtype, rot):
    q, k, cos, sin = _inputs(37, 16, 8, 128, rot, dtype=dtype, device="cuda")
    qo, ko = apply_rotary_cos_sin(q, k, cos, sin)  # CUDA tensors: the kernel path
    q_ref, k_ref = rotary_cos_sin_ref(q.float(), k.float(), cos.float(), sin.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert qo.dtype == dtype
    torch.testing.assert_close(qo.float(), q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ko.float(), k_ref, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_gpu_kernel_under_cuda_graph_replays_with_new_inputs():
    q, k, cos, sin = _inputs(8, 4, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    apply_rotary_cos_sin(q, k, cos, sin)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qo, ko = apply_rotary_cos_sin(q, k, cos, sin)
    for seed in (3, 4):
        for dst, src in zip((q, k, cos, sin), _inputs(8, 4, 2, 64, 64, dtype=torch.bfloat16, device="cuda",
                                                      seed=seed)):
            dst.copy_(src)
        graph.replay()
        q_ref, k_ref = rotary_cos_sin_ref(q, k, cos, sin)
        torch.testing.assert_close(qo, q_ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ko, k_ref, atol=2e-2, rtol=2e-2)
