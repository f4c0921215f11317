"""The Triton attention backend agrees with the torch reference backend through the engine's metadata."""
import os

import pytest
import torch

from porter.engine.backends import torch_backend, triton_backend
from porter.engine.forward_context import AttentionMetadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D, BS = 4, 2, 16, 8


def _meta(seq_lens, q_lens, gen, num_blocks=24):
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-n // BS) for n in seq_lens) + 2
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    slots = []
    for i, (n, q) in enumerate(zip(seq_lens, q_lens)):
        blocks = [perm.pop() for _ in range(-(-n // BS))]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // BS] * BS + p % BS for p in range(n - q, n)]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=tables.to(DEVICE), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(seq_lens))


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [13, 4, 1]], ids=["decode", "mixed"])
@pytest.mark.parametrize("features", [{}, dict(sliding_window=5, logits_soft_cap=8.0),
                                      dict(alibi=True, sinks=True)], ids=["plain", "window-cap", "alibi-sinks"])
def test_triton_backend_matches_torch_backend(q_lens, features):
    gen = torch.Generator().manual_seed(0)
    meta = _meta([13, 25, 40], q_lens, gen)
    t = sum(q_lens)
    q = torch.randn(t, HQ, D, generator=gen).to(DEVICE)
    k = torch.randn(t, HKV, D, generator=gen).to(DEVICE)
    v = torch.randn(t, HKV, D, generator=gen).to(DEVICE)
    opts = dict(scale=D ** -0.5, sliding_window=features.get("sliding_window"),
                logits_soft_cap=features.get("logits_soft_cap"),
                alibi_slopes=torch.rand(HQ, generator=gen).to(DEVICE) if features.get("alibi") else None,
                sinks=torch.randn(HQ, generator=gen).to(DEVICE) if features.get("sinks") else None)
    caches = torch.randn(2, 24, BS, HKV, D, generator=gen).to(DEVICE)
    kc_ref, vc_ref = caches[0].clone(), caches[1].clone()
    kc, vc = caches[0].clone(), caches[1].clone()
    torch_backend.write_kv_cache(k, v, kc_ref, vc_ref, meta.slot_mapping)
    triton_backend.write_kv_cache(k, v, kc, vc, meta.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    out = triton_backend.paged_attention(q, kc, vc, meta, **opts)
    ref = torch_backend.paged_attention(q, kc_ref, vc_ref, meta, **opts)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [13, 4, 1]], ids=["decode", "mixed"])
def test_write_and_attend_matches_torch_backend(q_lens, monkeypatch):
    """The layer's entry point: write the step's k/v, then attend. A decode batch writes inside the decode
    launch (no separate write kernel); the cache ends up as the torch backend leaves it."""
    gen = torch.Generator().manual_seed(4)
    meta = _meta([13, 25, 40], q_lens, gen)
    t = sum(q_lens)
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, generator=gen).to(DEVICE)
    q, k, v = (x.view(t, -1, D) for x in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))  # strided views
    opts = dict(scale=D ** -0.5, sliding_window=30, sinks=torch.randn(HQ, generator=gen).to(DEVICE))
    caches = torch.randn(2, 24, BS, HKV, D, generator=gen).to(DEVICE)
    kc_ref, vc_ref = caches[0].clone(), caches[1].clone()
    kc, vc = caches[0].clone(), caches[1].clone()
    ref = torch_backend.write_and_attend(q, k, v, kc_ref, vc_ref, meta, **opts)
    if q_lens == [1, 1, 1]:
        monkeypatch.setattr(triton_backend, "write_kv_cache", None)  # a call would fail
    out = triton_backend.write_and_attend(q, k, v, kc, vc, meta, **opts)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_triton_backend_no_cache_matches_torch_backend():
    gen = torch.Generator().manual_seed(1)
    meta = AttentionMetadata.for_prefill([9, 20], device=DEVICE)
    q = torch.randn(29, HQ, D, generator=gen).to(DEVICE)
    k = torch.randn(29, HKV, D, generator=gen).to(DEVICE)
    v = torch.randn(29, HKV, D, generator=gen).to(DEVICE)
    opts = dict(scale=0.3, sliding_window=7, sinks=torch.randn(HQ, generator=gen).to(DEVICE))
    out = triton_backend.attention_no_cache(q, k, v, meta, **opts)
    ref = torch_backend.attention_no_cache(q, k, v, meta, **opts)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_paged_attention_needs_block_tables():
    meta = AttentionMetadata.for_prefill([3], device=DEVICE)
    x = torch.zeros(3, HQ, D, device=DEVICE)
    with pytest.raises(ValueError, match="block_tables"):
        triton_backend.paged_attention(x, x, x, meta, scale=1.0)


@pytest.mark.gpu
def test_decode_is_cuda_graph_capturable():
    """Capture one decode step, then replay it with new lengths, blocks and queries written in place."""
    gen = torch.Generator().manual_seed(2)
    meta = _meta([30, 7, 45], [1, 1, 1], gen, num_blocks=40)
    q = torch.randn(3, HQ, D, device=DEVICE)
    kc, vc = torch.randn(2, 40, BS, HKV, D, generator=gen).to(DEVICE)
    opts = dict(scale=D ** -0.5, sinks=torch.randn(HQ, device=DEVICE))
    triton_backend.paged_attention(q, kc, vc, meta, **opts)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_backend.paged_attention(q, kc, vc, meta, **opts)
    new = _meta([44, 12, 3], [1, 1, 1], gen, num_blocks=40)
    meta.seq_lens.copy_(new.seq_lens)
    meta.block_tables.copy_(new.block_tables)
    q.copy_(torch.randn(3, HQ, D, device=DEVICE))
    graph.replay()
    torch.testing.assert_close(out, torch_backend.paged_attention(q, kc, vc, new, **opts), atol=1e-4, rtol=1e-4)


def test_attention_layer_runs_the_triton_backend():
    """The engine's Attention layer with attention_backend="triton": same output and cache as "torch",
    sinks given as a model-owned parameter (as gpt-oss loads them)."""
    from torch import nn

    from porter.engine.config import EngineConfig, set_current_engine_config
    from porter.engine.forward_context import set_forward_context
    from porter.engine.layers.attention import Attention

    gen = torch.Generator().manual_seed(3)
    sinks = nn.Parameter(torch.randn(HQ, generator=gen).to(DEVICE))
    layers = {}
    for name in ("torch", "triton"):
        with set_current_engine_config(EngineConfig(hf_config=None, attention_backend=name)):
            layers[name] = Attention(HQ, D, D ** -0.5, HKV, sliding_window=6, sinks=sinks)
    assert layers["triton"].backend is triton_backend
    meta = _meta([13, 25], [13, 1], gen)
    qkv = torch.randn(14, (HQ + 2 * HKV) * D, generator=gen).to(DEVICE)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)  # strided views, as models pass them
    outs = {}
    for name, layer in layers.items():
        layer.k_cache, layer.v_cache = torch.zeros(2, 24, BS, HKV, D, device=DEVICE)
        with set_forward_context(meta):
            outs[name] = layer(q, k, v)
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=1e-4)
    assert torch.equal(layers["triton"].k_cache, layers["torch"].k_cache)


def test_table_width_is_not_a_compile_time_specialisation():
    """An eager step's block-table width follows its longest context: were it specialised (== 1, divisible
    by 16), a new width class would compile a kernel variant in the middle of serving (seconds on a GPU).
    Checked on the compiled (not interpreted) kernels, which decorate without a GPU."""
    import subprocess
    import sys

    code = ("from porter.kernels.decode_attention import _decode_split_kernel as d\n"
            "from porter.kernels.prefill_attention import _prefill_kernel as p\n"
            "print([q.do_not_specialize for k in (p, d) for q in k.params if q.name == 'stride_bt'])")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["[True,", "True]"], out.stderr[-2000:]
