"""Reference attention backend and the Attention layer: paged == no-cache == a dense softmax oracle."""
import math

import pytest
import torch

from porter.engine.backends import torch_backend as tb
from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.layers.attention import Attention

D, BS = 8, 4


def oracle(q, k, v, q_pos, scale, window=None, cap=None, alibi=None, sinks=None):
    """Per head, per query loop: softmax over visible keys (k/v hold positions 0..len-1)."""
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i, p in enumerate(q_pos.tolist()):
            logits, vals = [], []
            for j in range(p + 1):
                if window is not None and p - j >= window:
                    continue
                s = float(q[i, h].double() @ k[j, kh].double()) * scale
                if cap:
                    s = math.tanh(s / cap) * cap
                if alibi is not None:
                    s += float(alibi[h]) * (j - p)
                logits.append(s)
                vals.append(v[j, kh].double())
            extra = [float(sinks[h])] if sinks is not None else []
            m = max(logits + extra)
            w = [math.exp(s - m) for s in logits]
            z = sum(w) + sum(math.exp(s - m) for s in extra)
            out[i, h] = sum(wi / z * vi for wi, vi in zip(w, vals))
    return out.float()


def make_batch(seq_lens, q_lens, hq, hkv, gen):
    """Random k/v for whole contexts, scattered into shuffled cache blocks; queries for the last q_len."""
    n_blocks = sum(-(-s // BS) for s in seq_lens) + 3
    perm = torch.randperm(n_blocks, generator=gen).tolist()
    k_cache = torch.zeros(n_blocks, BS, hkv, D)
    v_cache = torch.zeros(n_blocks, BS, hkv, D)
    width = max(-(-s // BS) for s in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    ks, vs, qs, slots = [], [], [], []
    for i, s in enumerate(seq_lens):
        nb = -(-s // BS)
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
        k, v = torch.randn(s, hkv, D, generator=gen), torch.randn(s, hkv, D, generator=gen)
        ks.append(k)
        vs.append(v)
        qs.append(torch.randn(q_lens[i], hq, D, generator=gen))
        slot = tables[i, torch.arange(s) // BS].long() * BS + torch.arange(s) % BS
        # the cached prefix is written now; the new tokens are written by the layer under test
        tb.write_kv_cache(k[: s - q_lens[i]], v[: s - q_lens[i]], k_cache, v_cache, slot[: s - q_lens[i]])
        slots.append(slot[s - q_lens[i]:])
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        slot_mapping=torch.cat(slots), block_tables=tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(seq_lens))
    return ks, vs, qs, k_cache, v_cache, meta


FEATURES = {
    "plain": {},
    "window": {"sliding_window": 3},
    "softcap": {"logits_soft_cap": 2.0},
    "alibi": {"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]},
    "sinks": {"sinks": [0.3, -1.0, 2.0, 0.0]},
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
def test_paged_layer_matches_oracle(feature, hkv):
    gen = torch.Generator().manual_seed(hkv)
    hq, scale = 4, D ** -0.5
    seq_lens, q_lens = [7, 10, 5, 9], [7, 3, 1, 4]  # full prefill, prefix-cached, decode, chunked
    ks, vs, qs, k_cache, v_cache, meta = make_batch(seq_lens, q_lens, hq, hkv, gen)
    opts = FEATURES[feature]
    layer = Attention(hq, D, scale, hkv, prefix="l.attn", **opts)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    q = torch.cat(qs)
    k_new = torch.cat([k[s - n:] for k, s, n in zip(ks, seq_lens, q_lens)])
    v_new = torch.cat([v[s - n:] for v, s, n in zip(vs, seq_lens, q_lens)])
    with set_forward_context(meta):
        out = layer(q.flatten(1), k_new.flatten(1), v_new.flatten(1))
    assert out.shape == (sum(q_lens), hq * D)
    alibi = torch.tensor(opts["alibi_slopes"]) if "alibi_slopes" in opts else None
    sinks = torch.tensor(opts["sinks"]) if "sinks" in opts else None
    start = 0
    for i, (s, n) in enumerate(zip(seq_lens, q_lens)):
        ref = oracle(qs[i], ks[i], vs[i], torch.arange(s - n, s), scale, opts.get("sliding_window"),
                     opts.get("logits_soft_cap"), alibi, sinks)
        torch.testing.assert_close(out[start:start + n].view(n, hq, D), ref, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("feature", list(FEATURES))
def test_paged_equals_no_cache_on_full_prefills(feature):
    gen = torch.Generator().manual_seed(7)
    hq, hkv, scale = 4, 2, 0.3
    seq_lens = [6, 11, 1]
    ks, vs, qs, k_cache, v_cache, meta = make_batch(seq_lens, seq_lens, hq, hkv, gen)
    opts = dict(FEATURES[feature])
    for key in ("alibi_slopes", "sinks"):
        if key in opts:
            opts[key] = torch.tensor(opts[key])
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    tb.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    paged = tb.paged_attention(q, k_cache, v_cache, meta, scale=scale, **opts)
    plain = tb.attention_no_cache(q, k, v, AttentionMetadata.for_prefill(seq_lens), scale=scale, **opts)
    torch.testing.assert_close(paged, plain, atol=1e-6, rtol=1e-6)


def test_write_kv_cache_skips_negative_slots():
    k_cache, v_cache = torch.zeros(2, BS, 1, D), torch.zeros(2, BS, 1, D)
    k, v = torch.ones(3, 1, D), 2 * torch.ones(3, 1, D)
    tb.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat = k_cache.view(-1, 1, D)
    assert flat[5].eq(1).all() and flat[0].eq(1).all()
    assert flat.abs().sum() == 2 * D
    assert v_cache.view(-1, 1, D)[5].eq(2).all()


def test_layer_without_cache_uses_prefill_metadata():
    torch.manual_seed(0)
    layer = Attention(2, D, 0.5, 1)
    q, k, v = torch.randn(5, 2 * D), torch.randn(5, D), torch.randn(5, D)
    with set_forward_context(AttentionMetadata.for_prefill([2, 3])):
        out = layer(q, k, v).view(5, 2, D)
    for sl in (slice(0, 2), slice(2, 5)):
        n = sl.stop - sl.start
        ref = oracle(q[sl].view(n, 2, D), k[sl].view(n, 1, D), v[sl].view(n, 1, D), torch.arange(n), 0.5)
        torch.testing.assert_close(out[sl], ref, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_errors():
    cfg = EngineConfig(hf_config=None, attention_backend="nope")
    with set_current_engine_config(cfg), pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        Attention(2, D, 1.0)
    assert Attention(2, D, 1.0).backend is tb  # no config current: the torch reference
    with set_current_engine_config(EngineConfig(hf_config=None, attention_backend="triton")):
        assert Attention(2, D, 1.0).backend.__name__ == "porter.engine.backends.triton_backend"
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(3, D, 1.0, 2)
    with pytest.raises(ValueError, match="sinks has 3 values for 2"):
        Attention(2, D, 1.0, sinks=[0.0, 1.0, 2.0])
    with pytest.raises(RuntimeError, match="outside a forward context"):
        Attention(1, D, 1.0)(torch.randn(1, D), torch.randn(1, D), torch.randn(1, D))


def test_sinks_parameter_is_referenced_not_copied():
    sinks = torch.nn.Parameter(torch.zeros(2))
    layer = Attention(2, D, 1.0, sinks=sinks)
    assert "sinks" not in dict(layer.named_parameters())
    sinks.data.fill_(3.0)  # loading the owner's parameter later is seen by the layer
    assert layer.sinks.eq(3.0).all()
