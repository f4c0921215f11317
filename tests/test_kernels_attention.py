"""Triton attention kernels vs their torch references (CPU: interpreter, tiny shapes, fp32)."""
import pytest
import torch

from porter.kernels.decode_attention import DecodeConfig, choose_num_splits, decode_attention
from porter.kernels.kv_cache import write_kv_cache
from porter.kernels.prefill_attention import prefill_attention
from porter.kernels.reference import (
    attention_no_cache_ref,
    paged_attention_ref,
    write_kv_cache_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _paged_batch(seq_lens, q_lens, hq, hkv, d, block_size, dtype, gen, num_blocks=None):
    """Random caches holding every sequence's context in shuffled blocks, and the matching metadata."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = num_blocks or sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + 1
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, hkv, d)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), to(tables), to(starts), to(lens)


def _features(hq, gen, sliding_window=None, soft_cap=None, alibi=False, sinks=False):
    return dict(
        sliding_window=sliding_window,
        logits_soft_cap=soft_cap,
        alibi_slopes=(torch.rand(hq, generator=gen) * 0.5).to(DEVICE) if alibi else None,
        sinks=torch.randn(hq, generator=gen).to(DEVICE) if sinks else None,
    )


def _rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_write_kv_cache_scatters_and_skips_padding():
    gen = torch.Generator().manual_seed(0)
    t, hkv, d, bs = 7, 2, 8, 4
    qkv = torch.randn(t, 3 * hkv * d, generator=gen)  # k/v as strided views of a fused projection
    k = qkv[:, hkv * d: 2 * hkv * d].view(t, hkv, d)
    v = qkv[:, 2 * hkv * d:].view(t, hkv, d)
    slots = torch.tensor([5, 0, -1, 11, 3, -1, 8])
    k_cache, v_cache = torch.full((4, bs, hkv, d), 7.0), torch.full((4, bs, hkv, d), 7.0)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache(k.to(DEVICE), v.to(DEVICE), kc := k_cache.to(DEVICE), vc := v_cache.to(DEVICE),
                   slots.to(DEVICE))
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(kc.cpu(), k_ref) and torch.equal(vc.cpu(), v_ref)
    assert (k_ref == 7.0).sum() == (16 - 5) * hkv * d  # untouched slots kept their old contents


@pytest.mark.parametrize(
    "hq,hkv,features,num_splits",
    [
        (4, 2, {}, 3),  # GQA, several splits
        (2, 2, {}, 1),  # MHA, one split
        (4, 1, dict(sliding_window=9, soft_cap=5.0), 2),  # MQA
        (4, 2, dict(alibi=True, sinks=True), 2),
        (4, 2, dict(alibi=True, sinks=True), 1),  # one split: stage 1 writes the output itself
    ],
)
def test_decode_attention_matches_reference(hq, hkv, features, num_splits):
    gen = torch.Generator().manual_seed(1)
    seq_lens = [37, 1, 20]
    q, kc, vc, tables, _, lens = _paged_batch(seq_lens, [1] * 3, hq, hkv, 16, 8, torch.float32, gen)
    feats = _features(hq, gen, **features)
    out = decode_attention(q, kc, vc, tables, lens, scale=0.3, num_splits=num_splits, **feats)
    starts = torch.arange(4, dtype=torch.int32, device=DEVICE)
    ref = paged_attention_ref(q, kc, vc, starts, lens, tables, scale=0.3, **feats)
    assert _rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("num_splits,features", [(1, {}), (3, {}), (2, dict(sliding_window=9, sinks=True))])
def test_decode_attention_writes_the_new_kv_itself(num_splits, features):
    """Given new_kv, the decode launch stores this step's k/v in their slots (padding slot -1 skipped) and
    attends over them: the same cache, bit for bit, and the same output as the separate write first."""
    gen = torch.Generator().manual_seed(6)
    seq_lens = [37, 17, 20, 0]  # 17: the new token opens a block; 0 with slot -1: CUDA-graph padding
    q, kc, vc, tables, _, lens = _paged_batch(seq_lens, [1] * 4, 4, 2, 16, 8, torch.float32, gen)
    k_new = torch.randn(4, 2, 16, generator=gen).to(DEVICE)
    v_new = torch.randn(4, 2, 16, generator=gen).to(DEVICE)
    slots = [int(tables[i, (n - 1) // 8]) * 8 + (n - 1) % 8 if n else -1 for i, n in enumerate(seq_lens)]
    slots = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    feats = _features(4, gen, **features)
    k_ref, v_ref = kc.clone(), vc.clone()
    write_kv_cache_ref(k_new, v_new, k_ref, v_ref, slots)
    out = decode_attention(q, kc, vc, tables, lens, scale=0.3, num_splits=num_splits,
                           new_kv=(k_new, v_new, slots), **feats)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
    ref = decode_attention(q, k_ref, v_ref, tables, lens, scale=0.3, num_splits=num_splits, **feats)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    starts = torch.arange(5, dtype=torch.int32, device=DEVICE)
    assert _rel_err(out[:3], paged_attention_ref(q, k_ref, v_ref, starts, lens, tables, scale=0.3,
                                                 **feats)[:3]) < 1e-4


def test_num_splits_fill_the_gpu_but_stay_bounded():
    cfg = DecodeConfig()  # the GPU defaults: 3 programs per SM, >= 128 tokens a split, <= 32 splits
    assert choose_num_splits(16, 8, 8192, cfg, num_sms=132) == 3  # 384 programs
    assert choose_num_splits(128, 8, 2048, cfg, num_sms=132) == 1  # the batch alone fills the GPU
    assert choose_num_splits(1, 8, 32768, cfg, num_sms=132) == 32  # capped
    assert choose_num_splits(1, 8, 300, cfg, num_sms=132) == 3  # no split shorter than 128 tokens


def test_decode_attention_empty_sequence_gives_zeros():
    gen = torch.Generator().manual_seed(2)
    q, kc, vc, tables, _, _ = _paged_batch([5, 5], [1, 1], 2, 1, 16, 8, torch.float32, gen)
    lens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)  # CUDA-graph padding row
    for splits in (1, 2):
        out = decode_attention(q, kc, vc, tables, lens, scale=0.25, num_splits=splits,
                               sinks=torch.ones(2, device=DEVICE))
        assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0] != 0).any()


@pytest.mark.parametrize(
    "hq,hkv,features",
    [
        (4, 2, {}),
        (2, 1, dict(sliding_window=6, soft_cap=4.0)),
        (2, 2, dict(alibi=True, sinks=True)),
    ],
)
def test_prefill_attention_paged_matches_reference(hq, hkv, features):
    """Mixed batch: a full prefill, a prefix-cached/chunked one (q_len < seq_len) and a decode."""
    gen = torch.Generator().manual_seed(3)
    seq_lens, q_lens = [19, 30, 9], [19, 12, 1]
    q, kc, vc, tables, starts, lens = _paged_batch(seq_lens, q_lens, hq, hkv, 16, 8, torch.float32, gen)
    feats = _features(hq, gen, **features)
    out = prefill_attention(q, kc, vc, starts, lens, tables, max(q_lens), scale=0.3, **feats)
    ref = paged_attention_ref(q, kc, vc, starts, lens, tables, scale=0.3, **feats)
    assert _rel_err(out, ref) < 1e-4


def test_prefill_attention_no_cache_matches_reference():
    gen = torch.Generator().manual_seed(4)
    q_lens = [17, 5]
    q = torch.randn(22, 4, 16, generator=gen).to(DEVICE)
    k = torch.randn(22, 2, 16, generator=gen).to(DEVICE)
    v = torch.randn(22, 2, 16, generator=gen).to(DEVICE)
    starts = torch.tensor([0, 17, 22], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    feats = _features(4, gen, sliding_window=7, sinks=True)
    out = prefill_attention(q, k, v, starts, lens, None, max(q_lens), scale=0.25, **feats)
    ref = attention_no_cache_ref(q, k, v, starts, scale=0.25, **feats)
    assert _rel_err(out, ref) < 1e-4


def test_prefill_attention_fp16():
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, tables, starts, lens = _paged_batch([21], [21], 2, 1, 16, 8, torch.float16, gen)
    out = prefill_attention(q, kc, vc, starts, lens, tables, 21, scale=0.25)
    ref = paged_attention_ref(q, kc, vc, starts, lens, tables, scale=0.25)
    assert out.dtype == torch.float16 and _rel_err(out, ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("features", [{}, dict(sliding_window=300, soft_cap=30.0),
                                      dict(alibi=True, sinks=True)])
def test_attention_bf16_gpu_real_shapes(features):
    gen = torch.Generator().manual_seed(6)
    seq_lens = [1000, 4097, 33, 2500]
    hq, hkv, d = 16, 8, 128
    q, kc, vc, tables, _, lens = _paged_batch(seq_lens, [1] * 4, hq, hkv, d, 16, torch.bfloat16, gen)
    feats = _features(hq, gen, **features)
    starts = torch.arange(5, dtype=torch.int32, device=DEVICE)
    ref = paged_attention_ref(q, kc, vc, starts, lens, tables, scale=d ** -0.5, **feats)
    for splits in (1, 7, 32):
        out = decode_attention(q, kc, vc, tables, lens, scale=d ** -0.5, num_splits=splits, **feats)
        assert _rel_err(out, ref) < 1e-2
    q_lens = [300, 4097, 33, 1]
    q2, kc, vc, tables, starts, lens = _paged_batch(seq_lens, q_lens, hq, hkv, d, 16, torch.bfloat16, gen)
    out = prefill_attention(q2, kc, vc, starts, lens, tables, max(q_lens), scale=d ** -0.5, **feats)
    ref = paged_attention_ref(q2, kc, vc, starts, lens, tables, scale=d ** -0.5, **feats)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(8, 1, 64), (12, 4, 96), (8, 2, 256), (64, 8, 128), (4, 4, 80)])
def test_attention_head_shapes_gpu(hq, hkv, d):
    """Head sizes 64..256 (padded ones too) and group sizes 1..8 compile and match, bf16."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = [700, 2100, 5]
    q, kc, vc, tables, _, lens = _paged_batch(seq_lens, [1] * 3, hq, hkv, d, 16, torch.bfloat16, gen)
    starts = torch.arange(4, dtype=torch.int32, device=DEVICE)
    feats = _features(hq, gen, sinks=True)
    ref = paged_attention_ref(q, kc, vc, starts, lens, tables, scale=d ** -0.5, **feats)
    for splits in (1, 9):
        out = decode_attention(q, kc, vc, tables, lens, scale=d ** -0.5, num_splits=splits, **feats)
        assert _rel_err(out, ref) < 1e-2
    q_lens = [700, 2100, 5]
    q2, kc, vc, tables, starts, lens = _paged_batch(seq_lens, q_lens, hq, hkv, d, 16, torch.bfloat16, gen)
    out = prefill_attention(q2, kc, vc, starts, lens, tables, max(q_lens), scale=d ** -0.5, **feats)
    ref = paged_attention_ref(q2, kc, vc, starts, lens, tables, scale=d ** -0.5, **feats)
    assert _rel_err(out, ref) < 1e-2
