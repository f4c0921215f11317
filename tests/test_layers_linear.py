"""Parallel linear layers: single-rank exactness, per-rank sharding through weight_loader, errors."""
import pytest
import torch
import torch.nn.functional as F

from porter.engine.distributed import tp_override
from porter.engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from porter.engine.weight_utils import WeightShapeError

torch.manual_seed(0)


def _load(layer, w, b=None, shard_id=None):
    layer.weight.weight_loader(layer.weight, w, shard_id) if shard_id is not None else \
        layer.weight.weight_loader(layer.weight, w)
    if b is not None:
        layer.bias.weight_loader(layer.bias, b, shard_id) if shard_id is not None else \
            layer.bias.weight_loader(layer.bias, b)


def test_replicated_and_column_single_rank_exact():
    x, w, b = torch.randn(5, 16), torch.randn(24, 16), torch.randn(24)
    for cls in (ReplicatedLinear, ColumnParallelLinear):
        layer = cls(16, 24, bias=True, prefix="m.proj")
        _load(layer, w, b)
        out, out_bias = layer(x)
        assert out_bias is None
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)


def test_skip_bias_add_and_return_bias():
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    layer = ColumnParallelLinear(8, 4, skip_bias_add=True)
    _load(layer, w, b)
    out, out_bias = layer(x)
    torch.testing.assert_close(out, F.linear(x, w), rtol=0, atol=0)
    assert out_bias is layer.bias
    plain = RowParallelLinear(8, 4, bias=True, return_bias=False)
    _load(plain, w, b)
    assert isinstance(plain(x), torch.Tensor)
    torch.testing.assert_close(plain(x), F.linear(x, w, b), rtol=0, atol=0)


def test_merged_column_shard_ids_single_rank():
    x = torch.randn(4, 8)
    gate, up = torch.randn(6, 8), torch.randn(10, 8)
    expected = torch.cat([F.linear(x, gate), F.linear(x, up)], dim=-1)
    layer = MergedColumnParallelLinear(8, [6, 10], bias=False)
    _load(layer, gate, shard_id=0)
    _load(layer, up, shard_id=1)
    torch.testing.assert_close(layer(x)[0], expected)
    fused = MergedColumnParallelLinear(8, [6, 10], bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))  # already fused checkpoint
    torch.testing.assert_close(fused(x)[0], expected)
    tup = MergedColumnParallelLinear(8, [6, 10], bias=False)
    tup.weight.weight_loader(tup.weight, torch.cat([gate, up]), (0, 1))
    torch.testing.assert_close(tup.weight, fused.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="invalid shard id"):
        layer.weight.weight_loader(layer.weight, gate, 2)


def test_qkv_single_rank_exact_with_bias():
    x = torch.randn(4, 32)
    q, k, v = torch.randn(32, 32), torch.randn(16, 32), torch.randn(16, 32)
    qb, kb, vb = torch.randn(32), torch.randn(16), torch.randn(16)
    layer = QKVParallelLinear(32, 8, 4, 2, bias=True, prefix="l.qkv_proj")
    for sid, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        _load(layer, w, b, shard_id=sid)
    expected = torch.cat([F.linear(x, q, qb), F.linear(x, k, kb), F.linear(x, v, vb)], dim=-1)
    torch.testing.assert_close(layer(x)[0], expected)
    assert (layer.q_size, layer.kv_size) == (32, 16)
    fused = QKVParallelLinear(32, 8, 4, 2, bias=False)
    fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))
    torch.testing.assert_close(fused.weight, layer.weight, rtol=0, atol=0)


def test_shape_mismatch_names_parameter_and_shapes():
    layer = QKVParallelLinear(32, 8, 4, 2, bias=False, prefix="model.layers.0.self_attn.qkv_proj")
    with pytest.raises(WeightShapeError) as e:
        layer.weight.weight_loader(layer.weight, torch.randn(16, 32), "q")
    msg = str(e.value)
    assert "model.layers.0.self_attn.qkv_proj.weight" in msg and "[32, 32]" in msg and "[16, 32]" in msg
    row = RowParallelLinear(16, 8, prefix="mlp.down_proj")
    with pytest.raises(WeightShapeError, match=r"mlp.down_proj.weight.*\[8, 16\].*\[16, 8\]"):
        row.weight.weight_loader(row.weight, torch.randn(16, 8))
    with pytest.raises(ValueError, match="invalid shard id 'x'"):
        layer.weight.weight_loader(layer.weight, torch.randn(32, 32), "x")


@pytest.mark.parametrize("tp", [2, 4])
def test_column_sharding_concat_equals_full(tp):
    x, w, b = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16)
    outs = []
    for r in range(tp):
        with tp_override(r, tp):
            layer = ColumnParallelLinear(8, 16, prefix="c")
        _load(layer, w, b)
        n = 16 // tp
        torch.testing.assert_close(layer.weight, w[r * n:(r + 1) * n], rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, b[r * n:(r + 1) * n], rtol=0, atol=0)
        outs.append(layer(x)[0])
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b))


def test_merged_sharding_keeps_gate_up_halves_per_rank():
    x, gate, up = torch.randn(3, 8), torch.randn(12, 8), torch.randn(12, 8)
    gates, ups = [], []
    for r in range(2):
        with tp_override(r, 2):
            layer = MergedColumnParallelLinear(8, [12, 12], bias=False)
        _load(layer, gate, shard_id=0)
        _load(layer, up, shard_id=1)
        torch.testing.assert_close(layer.weight, torch.cat([gate[r * 6:(r + 1) * 6], up[r * 6:(r + 1) * 6]]),
                                   rtol=0, atol=0)
        g, u = layer(x)[0].chunk(2, dim=-1)
        gates.append(g)
        ups.append(u)
    torch.testing.assert_close(torch.cat(gates, -1), F.linear(x, gate))
    torch.testing.assert_close(torch.cat(ups, -1), F.linear(x, up))


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (2, 4), (4, 2), (4, 1)])
def test_qkv_sharding_with_kv_replication(tp, kv_heads):
    heads, hd, hidden = 4, 4, 16
    q, k, v = torch.randn(heads * hd, hidden), torch.randn(kv_heads * hd, hidden), torch.randn(kv_heads * hd, hidden)
    replicas = max(1, tp // kv_heads)
    local_kv = max(1, kv_heads // tp)
    for r in range(tp):
        with tp_override(r, tp):
            layer = QKVParallelLinear(hidden, hd, heads, kv_heads, bias=False)
        assert (layer.num_heads, layer.num_kv_heads, layer.num_kv_head_replicas) == (heads // tp, local_kv, replicas)
        for sid, w in (("q", q), ("k", k), ("v", v)):
            _load(layer, w, shard_id=sid)
        qs, ks, vs = layer.weight.split([layer.q_size, layer.kv_size, layer.kv_size])
        nq = heads // tp * hd
        kv_rank = r // replicas
        torch.testing.assert_close(qs, q[r * nq:(r + 1) * nq], rtol=0, atol=0)
        torch.testing.assert_close(ks, k[kv_rank * local_kv * hd:(kv_rank + 1) * local_kv * hd], rtol=0, atol=0)
        torch.testing.assert_close(vs, v[kv_rank * local_kv * hd:(kv_rank + 1) * local_kv * hd], rtol=0, atol=0)


def test_qkv_rejects_indivisible_heads():
    with tp_override(0, 4), pytest.raises(ValueError, match="not divisible"):
        QKVParallelLinear(16, 4, 6, 2)
    with tp_override(0, 4), pytest.raises(ValueError, match="kv heads"):
        QKVParallelLinear(16, 4, 8, 3)


@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_sharding_partial_sums_equal_full(input_is_parallel):
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    total = 0
    for r in range(2):
        with tp_override(r, 2):
            layer = RowParallelLinear(16, 8, input_is_parallel=input_is_parallel)
        _load(layer, w, b)
        torch.testing.assert_close(layer.weight, w[:, r * 8:(r + 1) * 8], rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, b, rtol=0, atol=0)  # bias is not sharded
        xin = x[:, r * 8:(r + 1) * 8] if input_is_parallel else x
        total = total + layer(xin)[0]  # what the all-reduce computes; bias added on rank 0 only
    torch.testing.assert_close(total, F.linear(x, w, b))
    with tp_override(0, 2), pytest.raises(ValueError, match="reduce_results=False"):
        RowParallelLinear(16, 8, bias=True, reduce_results=False)
