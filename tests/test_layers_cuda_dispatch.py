"""RMSNorm, *AndMul and rotary layers dispatch to porter's Triton kernels on CUDA and match their torch
path. On CPU the kernel path is forced through each module's USE_KERNEL switch (TRITON_INTERPRET=1,
set by conftest); the gpu tests compare both paths in bf16 at Qwen3-0.6B shapes and under CUDA graphs."""
import subprocess
import sys

import pytest
import torch

from porter.engine.layers import activation, layernorm, rotary
from porter.engine.layers.activation import GeluAndMul, SiluAndMul
from porter.engine.layers.layernorm import GemmaRMSNorm, RMSNorm
from porter.engine.layers.rotary import get_rope

LAYER_MODULES = (layernorm, activation, rotary)


def _set_kernel(monkeypatch, value):
    for mod in LAYER_MODULES:
        monkeypatch.setattr(mod, "USE_KERNEL", value)


def _both_paths(monkeypatch, fn, force=True):
    """(fn() with the kernel path forced, fn() on the torch path)."""
    _set_kernel(monkeypatch, force)
    out = fn()
    _set_kernel(monkeypatch, False)
    return out, fn()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each kernel entry point the layers use (the kernels still run)."""
    from porter.kernels import activation as k_act
    from porter.kernels import rmsnorm as k_norm
    from porter.kernels import rotary as k_rot

    calls = {}
    for mod, name in ((k_norm, "rms_norm"), (k_norm, "fused_add_rms_norm"), (k_act, "silu_and_mul"),
                      (k_act, "gelu_and_mul"), (k_rot, "apply_rotary")):
        def spy(*args, _fn=getattr(mod, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(mod, name, spy)
    return calls


def _rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def _norm(hidden, dtype=torch.float32, device="cpu", cls=RMSNorm, seed=5):
    norm = cls(hidden, eps=1e-6) if cls is GemmaRMSNorm else cls(hidden, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * _rand(hidden, seed=seed))
    return norm.to(device=device, dtype=dtype)


# ---- CPU: forced kernel path (Triton interpreter) against the torch path ----

# compiled Triton cannot run on CPU tensors: on a CUDA machine the gpu tests below cover the same dispatch
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="forces the kernels on CPU tensors")

@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_plain_and_residual(monkeypatch, kernel_calls, dtype):
    norm = _norm(48, dtype)
    x, res = _rand(5, 48, dtype=dtype, seed=1), _rand(5, 48, dtype=dtype, seed=2)
    got, ref = _both_paths(monkeypatch, lambda: norm(x))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    (got_n, got_r), (ref_n, ref_r) = _both_paths(monkeypatch, lambda: norm(x, res))
    torch.testing.assert_close(got_r, ref_r, atol=0, rtol=0)  # the residual sum is rounded the same way
    torch.testing.assert_close(got_n, ref_n, atol=tol, rtol=tol)
    assert kernel_calls == {"rms_norm": 1, "fused_add_rms_norm": 1}


@interpreter_only
def test_rms_norm_per_head_view_of_qkv(monkeypatch, kernel_calls):
    """q_norm over [T, heads, head_dim] views of a fused qkv slice (rows not contiguous)."""
    t, heads, hd = 4, 3, 16
    qkv = _rand(t, (heads + 2) * hd, seed=3)
    q = qkv[:, : heads * hd].view(t, heads, hd)
    norm = _norm(hd)
    got, ref = _both_paths(monkeypatch, lambda: norm(q))
    assert got.shape == (t, heads, hd)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    strided = _rand(t, heads, 2 * hd, seed=4)[..., ::2]  # last dim not unit-stride: copied first
    got, ref = _both_paths(monkeypatch, lambda: norm(strided))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert kernel_calls == {"rms_norm": 2}


@interpreter_only
def test_rms_norm_torch_only_forms(monkeypatch, kernel_calls):
    """Gemma's unit offset, weightless norms and broadcast residuals keep the torch path."""
    x = _rand(3, 16, seed=6)
    gemma = _norm(16, cls=GemmaRMSNorm)
    got, ref = _both_paths(monkeypatch, lambda: gemma(x))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    bare = RMSNorm(16, has_weight=False)
    got, ref = _both_paths(monkeypatch, lambda: bare(x))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    plain = _norm(16)
    (got, _), (ref, _) = _both_paths(monkeypatch, lambda: plain(x, _rand(1, 16, seed=7)))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert kernel_calls == {}


@interpreter_only
def test_gated_activations(monkeypatch, kernel_calls):
    x = 3 * _rand(2, 3, 2 * 40, seed=8)
    for module in (SiluAndMul(), GeluAndMul("none"), GeluAndMul("tanh")):
        got, ref = _both_paths(monkeypatch, lambda: module(x))
        assert got.shape == ref.shape == (2, 3, 40)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    strided = x.transpose(0, 2)  # last dim stride != 1: copied first
    got, ref = _both_paths(monkeypatch, lambda: SiluAndMul()(strided))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert kernel_calls == {"silu_and_mul": 2, "gelu_and_mul": 2}


@interpreter_only
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_on_qkv_slices(monkeypatch, kernel_calls, neox, partial):
    t, hq, hk, hd = 5, 4, 2, 16
    rope = get_rope(hd, 64, is_neox_style=neox, dtype=torch.float32,
                    rope_parameters={"rope_theta": 1000.0, "partial_rotary_factor": partial})
    qkv = _rand(t, (hq + 2 * hk) * hd, seed=9)
    positions = torch.tensor([0, 9, 3, 63, 1])

    def run():
        fresh = qkv.clone()
        q, k = fresh[:, : hq * hd], fresh[:, hq * hd: (hq + hk) * hd]
        q_out, k_out = rope(positions, q, k)
        assert torch.equal(fresh[:, (hq + hk) * hd:], qkv[:, (hq + hk) * hd:])  # v untouched
        return q_out, k_out

    (gq, gk), (rq, rk) = _both_paths(monkeypatch, run)
    assert gq.shape == rq.shape == (t, hq * hd) and gk.shape == rk.shape == (t, hk * hd)
    torch.testing.assert_close(gq, rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rq, qkv[:, : hq * hd])  # the rotation did something
    assert kernel_calls == {"apply_rotary": 1}


@interpreter_only
def test_rotary_3d_inputs_and_no_key(monkeypatch, kernel_calls):
    t, heads, hd = 3, 2, 8
    rope = get_rope(hd, 32, is_neox_style=True, dtype=torch.float32)
    q, k = _rand(t, heads, hd, seed=10), _rand(t, 1, hd, seed=11)
    positions = torch.tensor([4, 0, 31])
    (gq, gk), (rq, rk) = _both_paths(monkeypatch, lambda: rope(positions, q.clone(), k.clone()))
    assert gq.shape == (t, heads, hd) and gk.shape == (t, 1, hd)
    torch.testing.assert_close(gq, rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gk, rk, atol=1e-5, rtol=1e-5)
    (gq, gk), (rq, rk) = _both_paths(monkeypatch, lambda: rope(positions, q.clone()))
    assert gk is None and rk is None
    torch.testing.assert_close(gq, rq, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        _set_kernel(monkeypatch, True)
        rope(positions[:2], q.clone(), k.clone())
    assert kernel_calls == {"apply_rotary": 2}


def test_cpu_tensors_default_to_torch(monkeypatch, kernel_calls):
    _set_kernel(monkeypatch, None)
    x = _rand(2, 3, 2 * 8, seed=12)
    _norm(16)(x)
    SiluAndMul()(x)
    get_rope(8, 16, dtype=torch.float32)(torch.tensor([0, 1]), x[:, :, :8].clone(), x[:, :, 8:].clone())
    assert kernel_calls == {}


def test_cpu_path_never_imports_kernels():
    code = (
        "import sys, torch\n"
        "from porter.engine.layers.layernorm import RMSNorm\n"
        "from porter.engine.layers.activation import SiluAndMul\n"
        "from porter.engine.layers.rotary import get_rope\n"
        "x = torch.randn(2, 16)\n"
        "RMSNorm(16)(x, x); SiluAndMul()(x); get_rope(8, 16)(torch.tensor([0, 1]), x, x)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['porter', 'kernels']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]
    assert "porter.kernels.rmsnorm" not in loaded and "porter.kernels.activation" not in loaded
    assert "porter.kernels.rotary" not in loaded


# ---- GPU: default dispatch (kernels) against the torch path, bf16, Qwen3-0.6B shapes ----

BF16 = dict(atol=2e-2, rtol=2e-2)
ROPE_BF16 = dict(atol=3e-2, rtol=2e-2)  # the torch path rounds each product to bf16, the kernel only once
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 16, 8, 128, 3072


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_gpu_norm_and_activation_match_torch(monkeypatch, kernel_calls, tokens):
    dev, bf = "cuda", torch.bfloat16
    norm, q_norm = _norm(HIDDEN, bf, dev), _norm(HEAD_DIM, bf, dev, seed=13)
    x, res = _rand(tokens, HIDDEN, dtype=bf, seed=1, device=dev), _rand(tokens, HIDDEN, dtype=bf, seed=2, device=dev)
    qkv = _rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=bf, seed=3, device=dev)
    gate_up = 3 * _rand(tokens, 2 * INTER, dtype=bf, seed=4, device=dev)
    with torch.inference_mode():
        got, ref = _both_paths(monkeypatch, lambda: norm(x), force=None)
        torch.testing.assert_close(got, ref, **BF16)
        (gn, gr), (rn, rr) = _both_paths(monkeypatch, lambda: norm(x, res), force=None)
        torch.testing.assert_close(gr, rr, atol=0, rtol=0)
        torch.testing.assert_close(gn, rn, **BF16)
        q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
        got, ref = _both_paths(monkeypatch, lambda: q_norm(q), force=None)
        torch.testing.assert_close(got, ref, **BF16)
        for module in (SiluAndMul(), GeluAndMul("tanh")):
            got, ref = _both_paths(monkeypatch, lambda: module(gate_up), force=None)
            torch.testing.assert_close(got, ref, **BF16)
    assert kernel_calls == {"rms_norm": 2, "fused_add_rms_norm": 1, "silu_and_mul": 1, "gelu_and_mul": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("neox,partial", [(True, 1.0), (False, 1.0), (True, 0.25)])
def test_gpu_rotary_matches_torch(monkeypatch, kernel_calls, neox, partial):
    dev, bf, tokens = "cuda", torch.bfloat16, 300
    with torch.device(dev):
        rope = get_rope(HEAD_DIM, 40960, is_neox_style=neox, dtype=bf,
                        rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": partial})
    qkv = _rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=bf, seed=5, device=dev)
    positions = torch.randint(0, 40960, (tokens,), generator=torch.Generator().manual_seed(6)).to(dev)

    def run():
        fresh = qkv.clone()
        return rope(positions, fresh[:, : HEADS * HEAD_DIM], fresh[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM])

    with torch.inference_mode():
        (gq, gk), (rq, rk) = _both_paths(monkeypatch, run, force=None)
    torch.testing.assert_close(gq, rq, **ROPE_BF16)
    torch.testing.assert_close(gk, rk, **ROPE_BF16)
    assert kernel_calls == {"apply_rotary": 1}


@pytest.mark.gpu
def test_gpu_layers_capture_in_cuda_graph(monkeypatch):
    """A norm -> rope -> norm -> silu step captured once replays on new inputs like eager kernels."""
    _set_kernel(monkeypatch, None)
    dev, bf, tokens = "cuda", torch.bfloat16, 8
    norm, q_norm, act = _norm(HIDDEN, bf, dev), _norm(HEAD_DIM, bf, dev, seed=13), SiluAndMul()
    with torch.device(dev):
        rope = get_rope(HEAD_DIM, 4096, dtype=bf, rope_parameters={"rope_theta": 1e6})
    x = _rand(tokens, HIDDEN, dtype=bf, seed=1, device=dev)
    res = _rand(tokens, HIDDEN, dtype=bf, seed=2, device=dev)
    qkv = _rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=bf, seed=3, device=dev)
    gate_up = _rand(tokens, 2 * INTER, dtype=bf, seed=4, device=dev)
    positions = torch.arange(tokens, device=dev)

    def step():
        h, r = norm(x, res)
        work = qkv.clone()
        q = q_norm(work[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM))
        q, k = rope(positions, q, work[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM])
        return h, r, q, k, act(gate_up)

    with torch.inference_mode():
        step()  # compile the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        for seed in (20, 30):
            for buf in (x, res, qkv, gate_up):
                buf.copy_(_rand(*buf.shape, dtype=bf, seed=seed + buf.shape[-1], device=dev))
            positions.copy_(torch.arange(seed, seed + tokens, device=dev))
            graph.replay()
            for got, want in zip(outs, step()):
                torch.testing.assert_close(got, want, atol=0, rtol=0)
