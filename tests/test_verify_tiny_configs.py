"""`porter verify --tiny` on configs whose defaults HF itself cannot run at toy size (routed experts with
no top-k, latent-attention head widths, per-layer lists besides layer_types, head_dim left None), and a
converted MoE model whose layers are all dense."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from porter.verify.run import VerifyOptions, verify
from porter.verify.tiny import LAYERS, perturb_, shrink_config

from convert6_helpers import convert, verify_tiny


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_shrunk_latent_moe_config_routes_and_keeps_an_moe_layer(model_type):
    config = shrink_config(AutoConfig.for_model(model_type))
    assert config.num_experts_per_tok == 2 and config.n_routed_experts % config.n_group == 0
    assert config.topk_group <= config.n_group
    assert config.first_k_dense_replace < LAYERS  # at least one routed layer
    assert config.head_dim == config.qk_rope_head_dim and config.qk_rope_head_dim < 64
    assert config.kv_lora_rank < 512 and config.v_head_dim < 128


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_verify_tiny_by_model_type(model_type, tmp_path):
    _, engine = convert(model_type, tmp_path)
    verify_tiny(model_type, engine)


def test_moe_model_with_only_dense_layers_loads(tmp_path):
    """first_k_dense_replace >= num_hidden_layers: no FusedMoE is built; load_weights must still work."""
    _, engine = convert("deepseek_v2", tmp_path)
    config = shrink_config(AutoConfig.for_model("deepseek_v2"))
    config.first_k_dense_replace = config.num_hidden_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_(model, 0)
    model.save_pretrained(tmp_path / "dense_only")
    report = verify(VerifyOptions(target=str(tmp_path / "dense_only"), model_file=engine, max_tokens=6))
    assert report.passed, [f"{c.name}: {c.detail}" for c in report.checks if not c.passed]


def test_every_per_layer_list_shrinks_with_the_layer_count():
    config = AutoConfig.for_model("mellum")  # mlp_layer_types next to layer_types
    assert len(config.mlp_layer_types) == config.num_hidden_layers > LAYERS
    kinds = set(config.mlp_layer_types)
    shrink_config(config)
    assert len(config.mlp_layer_types) == len(config.layer_types) == config.num_hidden_layers >= LAYERS
    assert set(config.mlp_layer_types) == kinds  # every kind of layer still built


# mellum: per-layer MLP kinds; ministral: head_dim None by default; nemotron: num_key_value_heads None by default
# (its modeling file divides by it), dots1: expert counts None by default, biogpt: an attention built from
# sizes, not the config
@pytest.mark.parametrize("model_type", ["mellum", "ministral", "nemotron", "dots1", "biogpt"])
def test_verify_tiny_runs_where_the_default_config_did_not(model_type, tmp_path):
    _, engine = convert(model_type, tmp_path)
    verify_tiny(model_type, engine)
