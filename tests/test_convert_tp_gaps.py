"""Tensor-parallel gaps of converted models, closed by code pattern: TP=2 (gloo, two worker processes)
generates what TP=1 does (greedy tokens equal, logprobs within 1e-4 in fp32) for
- the Parallax custom model, whose per-query-head `head_scale` parameter is split with the heads;
- phi3, whose pre-fused `qkv_proj` / `gate_up_proj` (one linear split by offsets / chunk) become
  QKVParallelLinear / MergedColumnParallelLinear loading the fused checkpoint tensor (also with one kv
  head, replicated over the ranks);
- qwen2_moe, whose dense MLP (a per-layer conditional in the decoder) and shared expert are sharded
  like any MLP while the shared expert's gate stays whole.
The converter's refusals and the sharded-parameter loader are tested without processes below."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    PhiConfig,
    PhiForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from porter.convert.pipeline import convert_file
from porter.engine.distributed import tp_override
from porter.engine.layers.sharded_parameter import shard_parameter
from porter.engine.weight_utils import WeightShapeError
from test_convert_passes import run_golden
from test_tp_converted import SMALL, TRANSFORMERS_MODELS, tp2_matches_tp1
from test_tp_llama import assert_same_generation, run

CUSTOM = Path(__file__).resolve().parent.parent / "fixtures" / "custom_model"


def _head_scales(runner) -> dict:
    return {n: p.detach().clone() for n, p in runner.model.named_parameters() if n.endswith("head_scale")}


def test_converted_custom_model_splits_its_per_head_parameter(tmp_path):
    from safetensors.torch import load_file

    from porter.engine import LLM

    result = convert_file(CUSTOM / "modeling_parallax.py")
    notes = [c.message for c in result.report.changes if c.pass_name == "parallel"]
    assert any("head_scale: parameter split over ranks along dim 0" in m for m in notes), notes
    model_file = tmp_path / "parallax_converted.py"
    model_file.write_text(result.code)

    def start(tp):
        return LLM(CUSTOM, model_file=model_file, tensor_parallel_size=tp, device="cpu", trust_remote_code=True,
                   skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=16)

    prompts = [[5, 17, 42, 99, 3, 50, 7], [11 + (i * 37) % 200 for i in range(21)]]
    tp1 = run(start(1), prompts)
    llm = start(2)
    try:
        assert_same_generation(tp1, run(llm, prompts))
        per_rank = llm.runner.executor.collective_rpc(_head_scales)
    finally:
        llm.runner.shutdown()
    ckpt = load_file(CUSTOM / "model.safetensors")
    for name, full in ((n, t) for n, t in ckpt.items() if n.endswith("head_scale")):
        assert full.shape == (4,) and len(set(full.tolist())) == 4  # distinct scales: a wrong slice shows
        for rank, params in enumerate(per_rank):
            torch.testing.assert_close(params[name], full[2 * rank:2 * rank + 2])


PHI3 = dict(SMALL, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_phi3_prefused_projections_shard(tmp_path, kv_heads):
    config = Phi3Config(**PHI3, num_key_value_heads=kv_heads)
    full, rank0 = tp2_matches_tp1(tmp_path, "phi3", Phi3ForCausalLM, config)
    qkv = next(n for n in full if n.endswith("layers.0.self_attn.qkv_proj.weight"))
    gate_up = next(n for n in full if n.endswith("layers.0.mlp.gate_up_proj.weight"))
    down = next(n for n in full if n.endswith("layers.0.mlp.down_proj.weight"))
    head = 32 // 4
    # q: 4 heads -> 2 per rank; kv: 2 heads -> 1 per rank, or 1 head kept whole on both ranks
    assert full[qkv] == ((4 + 2 * kv_heads) * head, 32) and rank0[qkv] == ((2 + 2) * head, 32)
    assert full[gate_up] == (128, 32) and rank0[gate_up] == (64, 32)
    assert full[down] == (32, 64) and rank0[down] == (32, 32)


@pytest.mark.parametrize("model_type, fused", [
    ("phi3", {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear"}),
    # `c_attn(h).split(self.split_size, dim=2)` into hidden-size parts, head_dim = hidden // heads
    # (its TP=2 run is test_convert6_tp.py's gpt2 case)
    ("gpt2", {"c_attn": "QKVParallelLinear"}),
])
def test_report_says_fused_projections_are_sharded(model_type, fused):
    report = convert_file(TRANSFORMERS_MODELS / model_type / f"modeling_{model_type}.py", model_type).report
    notes = [c.message for c in report.changes if c.pass_name == "parallel"]
    assert not any("ReplicatedLinear" in m for m in notes), notes
    for attr, layer in fused.items():
        assert any(m.startswith(f"{attr}: fused in the HF file") and layer in m for m in notes), notes


def test_phi_partial_rotary_slices_within_heads_do_not_stop_sharding(tmp_path):
    """phi slices `query_states[..., :rotary_ndims]` after `.view(*lead, -1, self.head_dim)`: within a head."""
    config = PhiConfig(**PHI3, num_key_value_heads=2)
    full, rank0 = tp2_matches_tp1(tmp_path, "phi", PhiForCausalLM, config)
    qkv = next(n for n in full if n.endswith("layers.0.self_attn.qkv_proj.weight"))
    assert full[qkv] == ((4 + 2 + 2) * 8, 32) and rank0[qkv] == ((2 + 1 + 1) * 8, 32)


def test_qwen2_moe_dense_and_shared_expert_mlps_shard(tmp_path):
    config = Qwen2MoeConfig(**SMALL, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[0],
                            decoder_sparse_step=1, tie_word_embeddings=False)
    full, rank0 = tp2_matches_tp1(tmp_path, "qwen2_moe", Qwen2MoeForCausalLM, config)

    def shape(suffix):
        name = next(n for n in full if n.endswith(suffix))
        return full[name], rank0[name]

    assert shape("layers.0.mlp.gate_up_proj.weight") == ((128, 32), (64, 32))  # dense layer
    assert shape("layers.0.mlp.down_proj.weight") == ((32, 64), (32, 32))
    assert shape("layers.1.mlp.shared_expert.gate_up_proj.weight") == ((96, 32), (48, 32))
    assert shape("layers.1.mlp.shared_expert.down_proj.weight") == ((32, 48), (32, 24))
    assert shape("layers.1.mlp.shared_expert_gate.weight") == ((1, 32), (1, 32))  # gate kept whole
    assert shape("layers.1.mlp.experts.w13_weight") == ((4, 64, 32), (4, 32, 32))


# --- converter decisions, without processes -------------------------------------------------------

ATTENTION = '''# golden: passes=ParallelLinears attention=FooAttention
class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.scale = nn.Parameter({shape})

    def forward(self, hidden_states):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = {query}
        key_states = {key}
        value_states = self.v_proj(hidden_states).view(hidden_shape)
        attn_output = attention(query_states, key_states, value_states)
        return {out}
{extra}'''
QUERY, KEY, OUT = ("self.q_proj(hidden_states)", "self.k_proj(hidden_states).view(hidden_shape)",
                   "self.o_proj(attn_output)")
PER_HEAD = "self.scale.repeat_interleave(self.head_dim)"


def _convert_attention(shape, query=QUERY, key=KEY, out=OUT, extra=""):
    code, ctx = run_golden(ATTENTION.format(shape=shape, query=query, key=key, out=out, extra=extra))
    return code, [f"{r.construct}: {r.why}" for r in ctx.report.refusals]


def test_per_head_parameter_is_split_along_its_head_dim():
    code, refusals = _convert_attention("torch.zeros(self.head_dim, config.num_attention_heads)",
                                        query=f"{QUERY} * self.scale.T.reshape(-1)")
    assert not refusals
    assert 'self.scale = shard_parameter(nn.Parameter(torch.zeros(self.head_dim, config.num_attention_heads)), ' \
           'dim=1, name="scale")' in code


def test_per_head_parameter_of_unknown_shape_is_refused():
    _, refusals = _convert_attention("make_scale(config)", query=f"{QUERY} * {PER_HEAD}")
    assert len(refusals) == 1 and "FooAttention.scale" in refusals[0] and "shape" in refusals[0]


def test_per_kv_head_parameter_is_refused():
    _, refusals = _convert_attention("torch.ones(config.num_key_value_heads)",
                                     key=f"self.k_proj(hidden_states) * {PER_HEAD}")
    assert len(refusals) == 1 and "kv heads" in refusals[0]


def test_parameter_with_two_sharded_dims_is_refused():
    _, refusals = _convert_attention("torch.ones(config.num_attention_heads, config.num_attention_heads)",
                                     query=f"{QUERY} * self.scale.diagonal().repeat_interleave(self.head_dim)")
    assert len(refusals) == 1 and "more than one of its dims" in refusals[0]


def test_per_head_parameter_read_in_a_helper_method_is_refused():
    helper = "\n    def scaled(self, x):\n        return x * self.scale\n"
    _, refusals = _convert_attention("torch.ones(config.num_attention_heads * self.head_dim)",
                                     query=f"self.scaled({QUERY})", extra=helper)
    assert len(refusals) == 1 and "method `scaled`" in refusals[0]


def test_parameters_that_meet_only_whole_data_stay_whole():
    # a per-head-sized parameter read after the row-parallel o_proj (whole again), and one read inside
    # o_proj's argument list next to sharded data is split
    code, refusals = _convert_attention("torch.ones(config.num_attention_heads)", out=f"{OUT} * self.scale.sum()")
    assert not refusals and "shard_parameter" not in code
    code, refusals = _convert_attention("torch.ones(config.num_attention_heads * self.head_dim)",
                                        out="self.o_proj(attn_output * self.scale)")
    assert not refusals and "shard_parameter(" in code


def test_slicing_the_last_dim_is_allowed_only_after_a_per_head_view():
    then = "\n        query_states = torch.cat([query_states[..., :4], query_states[..., 4:]], dim=-1)"
    code, refusals = _convert_attention("torch.ones(1)", query="self.q_proj(hidden_states).view(hidden_shape)" + then)
    assert not refusals and "QKVParallelLinear(" in code
    code, _ = _convert_attention("torch.ones(1)", query="self.q_proj(hidden_states)" + then)
    assert "QKVParallelLinear(" not in code and "ReplicatedLinear(" in code
    # a per-head view chunked along its heads dim (DiffLlama's halves of the heads): not within a head
    heads = "\n        query_states = torch.cat(torch.chunk(query_states, 2, dim=1), dim=1)"
    code, _ = _convert_attention("torch.ones(1)", query="self.q_proj(hidden_states).view(hidden_shape)" + heads)
    assert "QKVParallelLinear(" not in code and "ReplicatedLinear(" in code


def test_dtype_reads_are_not_sharded_data_and_normal_sizes_are_shapes():
    # a parameter of unknown shape only cast to q's dtype stays whole; a per-head one built by
    # torch.normal(size=) splits
    code, refusals = _convert_attention("make_lambda(config)",
                                        out=f"{OUT} * self.scale.sum().to(query_states.dtype)")
    assert not refusals and "shard_parameter" not in code
    code, refusals = _convert_attention("torch.normal(0, 0.1, size=(config.num_attention_heads,))",
                                        query=f"{QUERY} * {PER_HEAD}")
    assert not refusals and "dim=0" in code and "shard_parameter(" in code


def test_split_by_sizes_becomes_a_merged_layer_unless_the_parts_do_not_tile_or_are_resliced():
    mlp = '''# golden: passes=ParallelLinears mlp=FooMLP
class FooMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, config.c + 2 * config.b, bias=False)
        self.out_proj = nn.Linear(config.b, config.hidden_size, bias=False)

    def forward(self, x):
        h = self.in_proj(x)
        gate, up, extra = torch.split(h, [SIZES], dim=-1)
        return self.out_proj(up * self.act(GATE) + extra.sum(-1, keepdim=True))
'''
    out, ctx = run_golden(mlp.replace("SIZES", "config.b, config.b, config.c").replace("GATE", "gate"))
    assert "MergedColumnParallelLinear(" in out and "[config.b, config.b, config.c]" in out
    assert "gate, up, extra = h.split(self.in_proj.output_partition_sizes, dim=-1)" in out
    out, ctx = run_golden(mlp.replace("SIZES", "config.b, config.c, config.c").replace("GATE", "gate"))
    assert "ReplicatedLinear(" in out and "ColumnParallel" not in out  # b + 2c != c + 2b
    assert any("does not split the last dim" in c.message for c in ctx.report.changes)
    out, ctx = run_golden(mlp.replace("SIZES", "config.b, config.b, config.c").replace("GATE", "gate[..., :4]"))
    assert "ReplicatedLinear(" in out and "ColumnParallel" not in out
    assert any("itself sliced by offsets (`gate[..., :4]`)" in c.message for c in ctx.report.changes)


def test_parts_picked_from_the_tuple_a_chunk_returns_shard():
    mlp = '''# golden: passes=ParallelLinears mlp=FooMLP
class FooMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_linear = nn.Linear(config.hidden_size, config.n * 2, bias=False)
        self.output_linear = nn.Linear(config.n, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        hidden_states = self.input_linear(hidden_states)
        chunked = hidden_states.chunk(2, dim=-1)
        return self.output_linear(self.act(chunked[0]) * chunked[PICK])
'''
    out, _ = run_golden(mlp.replace("PICK", "1"))
    assert "MergedColumnParallelLinear(" in out and "[config.n, config.n]" in out
    out, _ = run_golden(mlp.replace("PICK", "1][..., :4"))  # offsets into a part: not its rank slice
    assert "ReplicatedLinear(" in out


def test_shard_parameter_holds_and_loads_the_ranks_slice():
    full = torch.arange(12.0).view(4, 3)
    with tp_override(1, 2):
        p = shard_parameter(nn.Parameter(torch.zeros(4, 3)), dim=0, name="layers.0.attn.scale")
        assert p.shape == (2, 3)
        p.weight_loader(p, full)
        torch.testing.assert_close(p.data, full[2:])
        with pytest.raises(WeightShapeError, match="layers.0.attn.scale"):
            p.weight_loader(p, full[:3])
        with pytest.raises(ValueError, match="not divisible"):
            shard_parameter(nn.Parameter(torch.zeros(3)), dim=0)
    with tp_override(0, 2):
        q = shard_parameter(nn.Parameter(torch.zeros(3, 4)), dim=1)
        q.weight_loader(q, full.T)
        torch.testing.assert_close(q.data, full.T[:, :2])
