"""The hand-written engine Llama equals HF's LlamaForCausalLM (same weights) on a ragged batch."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.models.llama import LlamaForCausalLM
from porter.engine.weight_utils import CheckpointKeyError, stacked_param_name


def tiny_config(kv_heads, tied, **extra):
    return LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                       tie_word_embeddings=tied, rms_norm_eps=1e-5, attn_implementation="eager", **extra)


def build_pair(config, seed=0):
    torch.manual_seed(seed)
    hf = HFLlama(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    with set_current_engine_config(EngineConfig(hf_config=config)):
        ours = LlamaForCausalLM(engine_config=EngineConfig(hf_config=config))
    return hf, ours


def engine_logits(model, seqs):
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad(), set_forward_context(AttentionMetadata.for_prefill([len(s) for s in seqs])):
        return model.compute_logits(model(ids, positions))


@pytest.mark.parametrize("kv_heads,tied,extra", [
    (2, False, {}),
    (4, True, {}),
    (1, False, {"attention_bias": True, "mlp_bias": True, "head_dim": 8}),
    (2, True, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}}),
])
def test_logits_match_hf(kv_heads, tied, extra):
    config = tiny_config(kv_heads, tied, **extra)
    hf, ours = build_pair(config)
    state = hf.state_dict()
    if tied:
        assert "lm_head.weight" in state  # the redundant tied head must be skipped, not rejected
    loaded = ours.load_weights(state.items())
    assert loaded == set(dict(ours.named_parameters()))
    seqs = [torch.randint(0, 100, (n,)) for n in (5, 11, 1, 8)]
    out = engine_logits(ours, seqs)
    ref = torch.cat([hf(s[None]).logits[0] for s in seqs]).detach()
    assert out.shape == ref.shape == (25, 100)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefixes_are_full_state_dict_names():
    _, ours = build_pair(tiny_config(2, False))
    attn = ours.model.layers[1].self_attn
    assert attn.attn.layer_name == "model.layers.1.self_attn.attn"
    assert attn.qkv_proj.prefix == "model.layers.1.self_attn.qkv_proj"
    assert ours.lm_head.prefix == "lm_head"
    assert {n for n, _ in ours.named_parameters()} >= {"lm_head.weight", "model.layers.0.mlp.gate_up_proj.weight"}


def test_untied_head_is_loaded_not_skipped():
    hf, ours = build_pair(tiny_config(2, False))
    state = hf.state_dict()
    loaded = ours.load_weights(state.items())
    assert "lm_head.weight" in loaded
    torch.testing.assert_close(ours.lm_head.weight[:100], state["lm_head.weight"], rtol=0, atol=0)


def test_unused_keys_reported_once_at_the_end():
    hf, ours = build_pair(tiny_config(2, False))
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # ignorable buffer
    state["model.layers.0.mlp.experts.w1"] = torch.ones(2)
    state["extra_head.weight"] = torch.ones(2)
    with pytest.raises(CheckpointKeyError) as e:
        ours.load_weights(state.items())
    assert e.value.unused == ["extra_head.weight", "model.layers.0.mlp.experts.w1"]
    assert "model.norm.weight" in e.value.loaded  # everything else was still loaded
    assert "extra_head.weight" in str(e.value) and "inv_freq" not in str(e.value)


def test_tied_config_with_a_different_head_is_an_error():
    hf, ours = build_pair(tiny_config(2, True))
    state = dict(hf.state_dict())
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ours.load_weights(state.items())


def test_stacked_mapping_matches_whole_components():
    mapping = LlamaForCausalLM.stacked_params_mapping
    assert stacked_param_name("model.layers.0.self_attn.q_proj.weight", mapping) == \
        ("model.layers.0.self_attn.qkv_proj.weight", "q")
    assert stacked_param_name("model.layers.0.self_attn.qkv_proj.weight", mapping) is None  # no qkqkv_proj
    assert stacked_param_name("model.layers.0.mlp.up_proj.bias", mapping) == ("model.layers.0.mlp.gate_up_proj.bias", 1)
    assert stacked_param_name("model.layers.0.mlp.gate_up_proj.weight", mapping) is None


@pytest.mark.parametrize("kv_heads", [2, 1])  # kv heads split, and one kv head replicated on both ranks
def test_tp2_rank_shards_of_llama(kv_heads):
    from porter.engine.distributed import tp_override

    config = tiny_config(kv_heads, False)
    hf, _ = build_pair(config)
    state = hf.state_dict()
    hd = 16
    for r in range(2):
        with tp_override(r, 2), set_current_engine_config(EngineConfig(hf_config=config)):
            ours = LlamaForCausalLM(engine_config=EngineConfig(hf_config=config))
        ours.load_weights(state.items())
        attn = ours.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1 if kv_heads <= 2 else kv_heads // 2)
        assert (attn.attn.num_heads, attn.attn.num_kv_heads) == (attn.num_heads, attn.num_kv_heads)
        q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
        pre = "model.layers.0.self_attn."
        kv_rank = r if kv_heads == 2 else 0
        torch.testing.assert_close(q, state[pre + "q_proj.weight"][r * 2 * hd:(r + 1) * 2 * hd], rtol=0, atol=0)
        torch.testing.assert_close(k, state[pre + "k_proj.weight"][kv_rank * hd:(kv_rank + 1) * hd], rtol=0, atol=0)
        torch.testing.assert_close(v, state[pre + "v_proj.weight"][kv_rank * hd:(kv_rank + 1) * hd], rtol=0, atol=0)
        torch.testing.assert_close(attn.o_proj.weight, state[pre + "o_proj.weight"][:, r * 32:(r + 1) * 32],
                                   rtol=0, atol=0)
        gate, up = ours.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
        mlp = "model.layers.0.mlp."
        torch.testing.assert_close(gate, state[mlp + "gate_proj.weight"][r * 48:(r + 1) * 48], rtol=0, atol=0)
        torch.testing.assert_close(up, state[mlp + "up_proj.weight"][r * 48:(r + 1) * 48], rtol=0, atol=0)
        rows = state["lm_head.weight"][r * 64:(r + 1) * 64]
        torch.testing.assert_close(ours.lm_head.weight[: rows.shape[0]], rows, rtol=0, atol=0)
