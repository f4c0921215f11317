"""The small-M GEMV kernel against F.linear, the linear layers' dispatch to it, and (GPU) a chain of
dependent kernels launched with programmatic dependent launch inside a CUDA graph."""
import pytest
import torch
import torch.nn.functional as F

from porter.engine.layers import linear as linear_mod
from porter.engine.layers.linear import GEMV_MAX_ROWS, ColumnParallelLinear, RowParallelLinear, linear
from porter.kernels.gemv import MAX_ROWS, GemvConfig, gemv


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run under TRITON_INTERPRET=1


def _rand(*shape, seed=0, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 70, False), (3, 64, 96, True), (8, 5, 33, True),
                                        (MAX_ROWS, 19, 40, False)])
def test_gemv_matches_linear(m, n, k, bias):
    x, w = _rand(m, k, seed=1), _rand(n, k, seed=2)
    b = _rand(n, seed=3) if bias else None
    torch.testing.assert_close(gemv(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [GemvConfig(2, 16, 1), GemvConfig(8, 64, 1), GemvConfig(1, 128, 1)])
def test_gemv_tiles_k_and_n(config):
    """Several K tiles (the weight of the next tile is loaded ahead), a ragged last tile, ragged N."""
    x, w = _rand(2, 3, 100, seed=4), _rand(21, 100, seed=5)
    out = gemv(x, w, config=config)
    assert out.shape == (2, 3, 21)
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_gemv_reads_strided_rows_and_empty_input():
    wide = _rand(2, 64, seed=6)
    x = wide[:, 8:40]  # rows 64 apart
    w = _rand(10, 32, seed=7)
    torch.testing.assert_close(gemv(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert gemv(_rand(0, 32), w).shape == (0, 10)


def test_gemv_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="rows"):
        gemv(_rand(MAX_ROWS + 1, 8), _rand(4, 8))
    with pytest.raises(ValueError, match="matching K"):
        gemv(_rand(1, 8), _rand(4, 9))
    with pytest.raises(ValueError, match="row-major"):
        gemv(_rand(1, 8), _rand(8, 4).t())


def test_gpu_configs_keep_the_product_tile_in_registers(monkeypatch):
    """The compiled kernel's tiles (chosen without a GPU here): at every row count the [rows, BLOCK_N,
    BLOCK_K] fp32 product fits 256 values a thread, tiles are powers of two, and K is never tiled wider
    than it needs."""
    from porter.kernels import gemv as k_gemv

    monkeypatch.setattr(k_gemv, "INTERPRETED", False)
    for n, k in [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024), (1000, 333)]:
        for m in range(1, MAX_ROWS + 1):
            cfg = k_gemv.choose_config(m, n, k)
            pow2 = 1 << (m - 1).bit_length()
            assert pow2 * cfg.block_n * cfg.block_k <= 256 * 32 * cfg.num_warps, (m, n, k, cfg)
            assert all(v & (v - 1) == 0 for v in cfg) and cfg.block_k <= max(16, 1 << (k - 1).bit_length())


def test_linear_layers_take_the_gemv_for_decode_rows_only(monkeypatch):
    from porter.kernels import gemv as k_gemv

    calls, real = [], k_gemv.gemv

    def spy(x, w, b=None, **kw):
        calls.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real(x, w, b, **kw)

    monkeypatch.setattr(k_gemv, "gemv", spy)
    monkeypatch.setattr(linear_mod, "USE_KERNEL", True)
    col = ColumnParallelLinear(24, 40, bias=True).to(DEVICE)
    row = RowParallelLinear(40, 24, bias=False).to(DEVICE)
    with torch.no_grad():
        for p in (*col.parameters(), *row.parameters()):
            p.copy_(_rand(*p.shape, seed=p.numel()))
    monkeypatch.setattr(linear_mod, "GEMV_SHORT_K", 32)  # col's K = 24 is short, row's K = 40 is not
    for rows in (1, 2, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x = _rand(rows, 24, seed=rows)
        with torch.no_grad():
            got = row(col(x)[0])[0]
            monkeypatch.setattr(linear_mod, "USE_KERNEL", False)
            want = row(col(x)[0])[0]
            monkeypatch.setattr(linear_mod, "USE_KERNEL", True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # short K up to 2 rows, long K up to GEMV_MAX_ROWS, then F.linear
    assert calls == [1, 1, 2, 2, 3, GEMV_MAX_ROWS]
    monkeypatch.setattr(linear_mod, "GEMV_WIDE", 64)
    wide = ColumnParallelLinear(24, 64, bias=False).to(DEVICE)
    with torch.no_grad():
        wide.weight.copy_(_rand(64, 24, seed=9))
        wide(_rand(2, 24))
        wide(_rand(1, 24))
    assert calls[6:] == [1]  # an LM-head-wide output takes the GEMV at one row only


def test_linear_falls_back_for_unsupported_inputs(monkeypatch):
    monkeypatch.setattr(linear_mod, "USE_KERNEL", True)
    x, w = _rand(1, 8, seed=1), _rand(4, 8, seed=2)
    torch.testing.assert_close(linear(x.double(), w.double()), F.linear(x.double(), w.double()))  # dtype
    torch.testing.assert_close(linear(x, w.t().contiguous().t()), F.linear(x, w))  # column-major weight


# ---- GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (151936, 1024), (1000, 333)])
def test_gpu_gemv_bf16(m, n, k):
    x = _rand(m, k, seed=1, dtype=torch.bfloat16, device="cuda")
    w = (_rand(n, k, seed=2) / k ** 0.5).to(torch.bfloat16).cuda()
    b = _rand(n, seed=3, dtype=torch.bfloat16, device="cuda")
    want = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(gemv(x, w, b).float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_pdl_chain_in_cuda_graph_equals_plain_launches(monkeypatch):
    """norm -> qkv GEMV -> rotary -> o GEMV -> norm -> gate_up GEMV -> act -> down GEMV, captured with
    programmatic dependent launch, replayed on fresh inputs: bitwise the same as launches without PDL
    (a kernel that read its input before waiting would see the previous replay's values)."""
    from porter.kernels import triton_utils
    from porter.kernels.activation import silu_and_mul
    from porter.kernels.rmsnorm import fused_add_rms_norm, rms_norm
    from porter.kernels.rotary_cos_sin import rotary_cos_sin

    if not triton_utils.pdl_launch(torch.device("cuda")):
        pytest.skip("no programmatic dependent launch on this GPU / Triton")
    dev, bf = "cuda", torch.bfloat16
    hidden, heads, d, inter = 1024, 16, 128, 3072
    ws = {name: (_rand(*shape, seed=i) / shape[-1] ** 0.5).to(bf).to(dev) for i, (name, shape) in enumerate(
        {"qkv": (3 * heads * d, hidden), "o": (hidden, heads * d), "gate_up": (2 * inter, hidden),
         "down": (hidden, inter), "n1": (hidden,), "n2": (hidden,)}.items())}
    x = _rand(1, hidden, seed=10, dtype=bf, device=dev)
    cos = _rand(1, d, seed=11, dtype=bf, device=dev)
    sin = _rand(1, d, seed=12, dtype=bf, device=dev)

    def layer():
        h = x
        for _ in range(3):
            qkv = gemv(rms_norm(h, ws["n1"], 1e-6), ws["qkv"])
            q, k = rotary_cos_sin(qkv[:, : heads * d].view(1, heads, d), qkv[:, heads * d: 2 * heads * d].view(1, heads, d),
                                  cos, sin)
            a = gemv((q + k).view(1, heads * d), ws["o"])
            n, h = fused_add_rms_norm(a, h, ws["n2"], 1e-6)
            h = h + gemv(silu_and_mul(gemv(n, ws["gate_up"])), ws["down"])
        return h

    with torch.inference_mode():
        layer()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer()
        for seed in range(20, 26):
            x.copy_(_rand(1, hidden, seed=seed, dtype=bf, device=dev))
            cos.copy_(_rand(1, d, seed=seed + 100, dtype=bf, device=dev))
            graph.replay()
            got = out.clone()
            with monkeypatch.context() as plain:
                plain.setattr(triton_utils, "_pdl_on", lambda index: False)
                want = layer()
            torch.testing.assert_close(got, want, atol=0, rtol=0)
