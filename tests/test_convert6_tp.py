"""Converted MoE and older-style models run tensor parallel: TP=2 (gloo, two worker processes) generates
what TP=1 does, with the FusedMoE experts really sharded (intermediate dim split over the ranks)."""
from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

from test_tp_converted import tp2_matches_tp1

SMALL = dict(vocab_size=100, max_position_embeddings=128, initializer_range=0.2)


@pytest.mark.parametrize("model_type, hf_class, config", [
    ("mixtral", MixtralForCausalLM, MixtralConfig(**SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2, tie_word_embeddings=False)),
    ("gpt2", GPT2LMHeadModel, GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=4)),
])
def test_converted_model_tp2_matches_tp1(tmp_path, model_type, hf_class, config):
    full, rank0 = tp2_matches_tp1(tmp_path, model_type, hf_class, config)
    if model_type == "mixtral":  # experts [E, 2I, H] with I = 64 -> 32 per rank
        w13 = next(n for n in full if n.endswith("layers.0.mlp.experts.w13_weight"))
        assert full[w13] == (4, 128, 32) and rank0[w13] == (4, 64, 32)
    else:  # Conv1D-born MLP linears are column/row sharded after the transposed load
        fc = next(n for n in full if n.endswith("h.0.mlp.c_fc.weight"))
        assert full[fc] == (128, 32) and rank0[fc] == (64, 32)
