"""Per-head q/k RMSNorm folded into the rotary: the kernel (interpreted on CPU) against norm-then-rotary,
the engine function's fused and unfused paths, and the converter pass that hands the norms over."""
from __future__ import annotations

import pytest
import torch

from porter.convert.qk_norm_rotary import qk_norm_rotary
from porter.engine.layers import rotary
from porter.engine.layers.layernorm import GemmaRMSNorm, RMSNorm
from porter.engine.layers.rotary import apply_rotary_cos_sin
from porter.kernels.reference import rms_norm_ref
from porter.kernels.rotary_cos_sin import rotary_cos_sin, rotary_cos_sin_ref

from convert_pass_helpers import run_pass
from test_kernels_rotary_cos_sin import DEVICE, _inputs


def _weights(d, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(1 + 0.5 * torch.randn(d, generator=g)).to(dtype).to(DEVICE) for _ in range(2)]


@pytest.mark.parametrize("rot", [8, 4])  # full and partial rotary (the pass-through dims are normalised too)
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32)])
def test_kernel_norms_then_rotates(rot, dtype, w_dtype):
    q, k, cos, sin = _inputs(3, 4, 2, 8, rot, dtype=dtype, scaling=0.7)
    qw, kw = _weights(8, w_dtype)
    qo, ko = rotary_cos_sin(q, k, cos, sin, (qw, 1e-6, kw, 1e-5))
    q_ref, k_ref = rotary_cos_sin_ref(rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-5), cos, sin)
    assert qo.dtype == q_ref.dtype and ko.dtype == k_ref.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(qo, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ko, k_ref, atol=tol, rtol=tol)


def test_kernel_rejects_norm_weights_of_another_size():
    q, k, cos, sin = _inputs(2, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="head_dim=8"):
        rotary_cos_sin(q, k, cos, sin, (torch.ones(16, device=DEVICE), 1e-6, torch.ones(16, device=DEVICE), 1e-6))


def _norm(cls, d, seed):
    norm = cls(d, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(0.5 * torch.randn(d, generator=torch.Generator().manual_seed(seed)) + (0 if cls is GemmaRMSNorm else 1))
    return norm


@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
def test_engine_function_equals_norms_then_rotary(monkeypatch, cls):
    """Fused (engine RMSNorm) or not (Gemma's offset norm runs on its own first), the kernel path gives what
    `q_norm(q)`, `k_norm(k)` then the rotary give on the torch path."""
    q, k, cos, sin = _inputs(3, 4, 2, 8, 8, scaling=0.7)
    q_norm, k_norm = _norm(cls, 8, 1), _norm(cls, 8, 2)
    calls = []
    real = rotary.kernel_module

    def spy(name):
        mod = real(name)
        calls.append(name)
        return mod

    monkeypatch.setattr(rotary, "kernel_module", spy)
    with torch.no_grad():
        monkeypatch.setattr(rotary, "USE_KERNEL", False)
        want = apply_rotary_cos_sin(q_norm(q), k_norm(k), cos, sin)
        assert torch.equal(apply_rotary_cos_sin(q, k, cos, sin, q_norm, k_norm)[0], want[0])
        monkeypatch.setattr(rotary, "USE_KERNEL", True)
        got = apply_rotary_cos_sin(q, k, cos, sin, q_norm=q_norm, k_norm=k_norm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls == ["rotary_cos_sin"]  # one launch; a Gemma norm ran as its own module before it


def test_engine_function_wants_both_norms_or_neither():
    q, k, cos, sin = _inputs(2, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="both q_norm and k_norm"):
        apply_rotary_cos_sin(q, k, cos, sin, q_norm=RMSNorm(8))


ATTENTION = '''import torch
from torch import nn

from porter.engine.layers.layernorm import RMSNorm
from porter.engine.layers.rotary import apply_rotary_cos_sin


class MyAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_norm = RMSNorm(d, eps=1e-6)
        self.k_norm = RMSNorm(d, eps=1e-6)

    def forward(self, q, k, v, cos, sin):
        query_states = self.q_norm(q.view(q.shape[0], -1, 8))
        key_states = self.k_norm(k.view(k.shape[0], -1, 8))
        value_states = v.view(v.shape[0], -1, 8)
        query_states, key_states = apply_rotary_cos_sin(query_states, key_states, cos, sin)
        return query_states, key_states, value_states
'''
FOLDED = '''        query_states = q.view(q.shape[0], -1, 8)
        key_states = k.view(k.shape[0], -1, 8)
        value_states = v.view(v.shape[0], -1, 8)
        query_states, key_states = apply_rotary_cos_sin(query_states, key_states, cos, sin, q_norm=self.q_norm, k_norm=self.k_norm)
'''


def test_pass_hands_the_norms_to_the_rotary_and_computes_the_same():
    out, notes = run_pass(qk_norm_rotary, ATTENTION)
    assert FOLDED in out
    assert notes == ["MyAttention: q/k norms `self.q_norm`, `self.k_norm` passed to apply_rotary_cos_sin "
                     "(one launch on CUDA)"]
    results = []
    for text in (ATTENTION, out):
        scope = {}
        exec(compile(text, "m.py", "exec"), scope)
        attn = scope["MyAttention"](8).to(DEVICE)
        with torch.no_grad():
            for p in attn.parameters():
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
            q, k, cos, sin = _inputs(3, 4, 2, 8, 8)
            results.append(attn(q.reshape(3, 32), k.reshape(3, 16), k.reshape(3, 16), cos, sin))
    for a, b in zip(*results):  # CPU: both the torch path; CUDA: separate kernels vs the fused one
        tol = 0 if DEVICE == "cpu" else 1e-5
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("edit", [
    ("        value_states = v.view(v.shape[0], -1, 8)\n",
     "        value_states = v.view(v.shape[0], -1, 8) + query_states.sum()\n"),  # read in between
    ("        value_states = v.view(v.shape[0], -1, 8)\n",
     "        value_states = v.view(v.shape[0], -1, 8)\n        key_states = key_states * 2\n"),  # rebound
    ("        key_states = self.k_norm(k.view(k.shape[0], -1, 8))\n",
     "        key_states = k.view(k.shape[0], -1, 8)\n"),  # one norm only
    ("apply_rotary_cos_sin(query_states, key_states, cos, sin)",
     "apply_rotary_cos_sin(key_states, value_states, cos, sin)"),  # not the normed pair
    ("        self.k_norm = RMSNorm(d, eps=1e-6)", "        self.k_norm = nn.LayerNorm(d)"),
])
def test_pass_leaves_anything_else_as_written(edit):
    assert edit[0] in ATTENTION
    src = ATTENTION.replace(*edit)
    out, notes = run_pass(qk_norm_rotary, src)
    assert out == src and notes == []


# ---- GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("rot", [128, 64])
def test_gpu_fused_norm_rotary_bf16(monkeypatch, rot):
    q, k, cos, sin = _inputs(37, 16, 8, 128, rot, dtype=torch.bfloat16, device="cuda")
    q_norm, k_norm = (_norm(RMSNorm, 128, s).to("cuda", torch.bfloat16) for s in (1, 2))
    with torch.no_grad():
        got = apply_rotary_cos_sin(q, k, cos, sin, q_norm=q_norm, k_norm=k_norm)
        monkeypatch.setattr(rotary, "_fusable_norms", lambda *a: False)  # norm kernels, then the rotary kernel
        want = apply_rotary_cos_sin(q, k, cos, sin, q_norm=q_norm, k_norm=k_norm)
    for g, w in zip(got, want):  # the squares sum in another order: a last-bit difference at most, here and there
        torch.testing.assert_close(g, w, atol=1e-2, rtol=1e-2)
