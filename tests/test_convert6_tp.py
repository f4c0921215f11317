"""Converted MoE and older-style models run tensor parallel: TP=2 (gloo, two worker processes) generates
what TP=1 does, with the FusedMoE experts really sharded (intermediate dim split over the ranks)."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

from test_tp_converted import PROMPTS, _shapes, convert, start_converted
from test_tp_llama import assert_same_generation, run

SMALL = dict(vocab_size=100, max_position_embeddings=128, initializer_range=0.2)


@pytest.mark.parametrize("model_type, hf_class, config", [
    ("mixtral", MixtralForCausalLM, MixtralConfig(**SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2, tie_word_embeddings=False)),
    ("gpt2", GPT2LMHeadModel, GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=4)),
])
def test_converted_model_tp2_matches_tp1(tmp_path, model_type, hf_class, config):
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    hf_class(config).save_pretrained(ckpt)
    model_file = convert(model_type, tmp_path / f"{model_type}_engine.py")
    tp1_llm = start_converted(ckpt, model_file, 1)
    tp1 = run(tp1_llm, PROMPTS)
    full = {n: tuple(p.shape) for n, p in tp1_llm.runner.model.named_parameters()}
    llm = start_converted(ckpt, model_file, 2)
    try:
        assert_same_generation(tp1, run(llm, PROMPTS))
        per_rank = llm.runner.executor.collective_rpc(_shapes)
    finally:
        llm.runner.shutdown()
    assert per_rank[0] == per_rank[1] and per_rank[0].keys() == full.keys()
    if model_type == "mixtral":  # experts [E, 2I, H] with I = 64 -> 32 per rank
        w13 = next(n for n in full if n.endswith("layers.0.mlp.experts.w13_weight"))
        assert full[w13] == (4, 128, 32) and per_rank[0][w13] == (4, 64, 32)
    else:  # Conv1D-born MLP linears are column/row sharded after the transposed load
        fc = next(n for n in full if n.endswith("h.0.mlp.c_fc.weight"))
        assert full[fc] == (128, 32) and per_rank[0][fc] == (64, 32)
