"""Tensor-parallel shards of converted blocks: for TP=2, built as rank 0 and rank 1 with tp_override
(collectives are no-ops), the two partial outputs of each attention / MLP block must sum to the
one-rank output. This checks the column/row choices, the fused q/k/v and gate/up splits and the
per-rank head counts the converter emits, without a process group."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from porter.convert import convert_file
from porter.convert.source import resolve_source
from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.distributed import tp_override
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.layers.attention import Attention
from porter.engine.layers.linear import LinearBase, RowParallelLinear

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, initializer_range=0.2)


def build(model_type, tmp_path):
    cfg = AutoConfig.for_model(model_type, **TINY)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(cfg).state_dict()
    path = tmp_path / f"{model_type}_engine.py"
    result = convert_file(resolve_source(model_type)[0], model_type=model_type)
    path.write_text(result.code)
    spec = importlib.util.spec_from_file_location(f"porter_tp_{model_type}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    models = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        ec = EngineConfig(hf_config=cfg, tensor_parallel_size=size)
        with tp_override(rank, size), set_current_engine_config(ec):
            model = getattr(mod, result.architecture)(engine_config=ec)
            model.load_weights((k, v) for k, v in state.items() if "rotary_emb" not in k)
        models.append(model)
    return cfg, models


def blocks(model):
    """name -> module for attention blocks (own an Attention) and MLP blocks (own engine linears)."""
    out = {}
    for name, m in model.named_modules():
        children = list(m.children())
        if any(isinstance(c, Attention) for c in children):
            out[name] = ("attention", m)
        elif any(isinstance(c, LinearBase) for c in children):
            out[name] = ("mlp", m)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt_neox", "gemma2", "phi3"])
def test_two_rank_shards_sum_to_the_one_rank_block(model_type, tmp_path):
    cfg, (full, rank0, rank1) = build(model_type, tmp_path)
    found = blocks(full)
    kinds = {k for k, _ in found.values()}
    assert kinds == {"attention", "mlp"}, f"{model_type}: blocks found {found.keys()}"
    lens = [5, 9]
    torch.manual_seed(3)
    x = torch.randn(sum(lens), cfg.hidden_size)
    positions = torch.cat([torch.arange(n) for n in lens])
    rotary = next(m for n, m in full.named_modules() if n.endswith("rotary_emb"))
    cos_sin = rotary(x, positions)
    shards = [dict(r.named_modules()) for r in (rank0, rank1)]
    with torch.no_grad(), set_forward_context(AttentionMetadata.for_prefill(lens)):
        for name, (kind, block) in found.items():
            args = {"position_embeddings": cos_sin} if kind == "attention" else {}
            want = block(x, **args)
            outs = [s[name](x, **args) for s in shards]
            if any(isinstance(c, RowParallelLinear) for c in block.children()):  # sharded: partial sums
                torch.testing.assert_close(sum(outs), want, atol=1e-4, rtol=1e-4, msg=f"{model_type} {name}")
            else:  # replicated block: every rank computes the whole output
                for out in outs:
                    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4, msg=f"{model_type} {name}")
