"""Rotary, RMSNorm and gated-activation kernels vs their torch references."""
import pytest
import torch

from porter.kernels.activation import gelu_and_mul, silu_and_mul
from porter.kernels.reference import (
    fused_add_rms_norm_ref,
    gelu_and_mul_ref,
    rms_norm_ref,
    rotary_ref,
    silu_and_mul_ref,
)
from porter.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from porter.kernels.rotary import apply_rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _cos_sin(max_pos, rot_dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype).to(DEVICE)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [16, 8])  # full and partial rotary
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_strided_views(is_neox, rot_dim, dtype):
    gen = torch.Generator().manual_seed(0)
    t, hq, hk, d = 5, 3, 1, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(dtype).to(DEVICE)
    q, k = qkv[:, : hq * d], qkv[:, hq * d: (hq + hk) * d]
    v_before = qkv[:, (hq + hk) * d:].clone()
    positions = torch.tensor([0, 7, 3, 63, 1], device=DEVICE)
    cache = _cos_sin(64, rot_dim, dtype)
    q_ref, k_ref = rotary_ref(positions, q, k, cache, d, is_neox)
    apply_rotary(positions, q, k, cache, d, is_neox)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k_ref, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)  # v untouched


def test_rotary_rejects_odd_rotary_dim():
    q = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rotary dim"):
        apply_rotary(torch.zeros(2, dtype=torch.long, device=DEVICE), q, q.clone(),
                     torch.zeros(4, 3, device=DEVICE), 8, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 64])
def test_rms_norm_and_fused_add(dtype, hidden):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, hidden, generator=gen).to(dtype).to(DEVICE)
    res = torch.randn(6, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), atol=tol, rtol=tol)
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    out_ref, res_ref = fused_add_rms_norm_ref(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, res_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_per_head_rows_of_a_fused_projection_in_place(dtype):
    gen = torch.Generator().manual_seed(3)
    t, hq, hk, d = 5, 4, 2, 32
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(DEVICE)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)  # rows strided in two levels: no flat view exists
    assert k.stride(0) != hk * k.stride(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    out = rms_norm(k, w, 1e-6)
    assert out.shape == (t, hk, d) and out.is_contiguous()
    torch.testing.assert_close(out, rms_norm_ref(k.contiguous(), w, 1e-6), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(4, 2, 2 * 200, generator=gen)).to(dtype).to(DEVICE)  # 200 spans 2 blocks
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=tol, rtol=tol)
    for approx in ("none", "tanh"):
        torch.testing.assert_close(gelu_and_mul(x, approx), gelu_and_mul_ref(x, approx),
                                   atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul(x, "fast")
