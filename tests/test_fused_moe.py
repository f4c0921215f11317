"""FusedMoE layer: routing, weight loading (per-expert on-disk keys and stacked tensors), TP shards,
parity with transformers' own MoE blocks, and the Triton backend through the layer."""
import os

import pytest
import torch
from safetensors.torch import load_file

from porter.engine.distributed import tp_override
from porter.engine.layers.fused_moe import FusedMoE, fused_topk, grouped_topk, load_expert_weight

H, I, E, K = 32, 24, 4, 2


def randomize(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def stacked_moe(gate_up, down, top_k, renormalize=True, **kwargs):
    """A FusedMoE loaded from transformers 5's in-memory stacked expert tensors."""
    num_experts, two_i, hidden = gate_up.shape
    moe = FusedMoE(num_experts, top_k, hidden, two_i // 2, renormalize=renormalize, prefix="mlp.experts", **kwargs)
    params = dict(moe.named_parameters(prefix="experts"))
    for name, tensor in (("experts.gate_up_proj", gate_up), ("experts.down_proj", down)):
        assert load_expert_weight(params, name, tensor, FusedMoE.make_stacked_params_mapping()) is not None
    return moe


def per_token_loop(x, gate_up, down, weights, ids):
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = gate_up[e] @ x[t]
            out[t] += weights[t, k] * (down[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out


def test_layer_equals_per_token_loop():
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2
    x, logits = torch.randn(6, H, generator=g), torch.randn(6, E, generator=g)
    moe = stacked_moe(gate_up, down, K)
    probs = logits.softmax(-1)
    w, ids = probs.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    torch.testing.assert_close(moe(x, logits), per_token_loop(x, gate_up, down, w, ids), rtol=1e-5, atol=1e-5)
    # the same with routing decided outside the layer
    torch.testing.assert_close(moe(x, topk_weights=w, topk_ids=ids), moe(x, logits), rtol=1e-6, atol=1e-6)


def test_mixtral_block_parity_stacked():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    block = randomize(MixtralSparseMoeBlock(cfg).eval())
    moe = stacked_moe(block.experts.gate_up_proj.data, block.experts.down_proj.data, K)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = block(x)
        out = moe(x.view(-1, H), block.gate(x.view(-1, H))[0]).view_as(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_qwen2_moe_block_parity_with_shared_expert():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=40,
                         num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
    block = randomize(Qwen2MoeSparseMoeBlock(cfg).eval())
    moe = stacked_moe(block.experts.gate_up_proj.data, block.experts.down_proj.data, K, renormalize=False)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = block(x[None])[0]
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        out = moe(x, block.gate(x)[0]) + shared
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_deepseek_v2_group_limited_routing_parity():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = DeepseekV2Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                           n_group=4, topk_group=2, topk_method="group_limited_greedy",
                           routed_scaling_factor=1.5, n_shared_experts=1)
    block = randomize(DeepseekV2Moe(cfg).eval(), std=0.5)
    moe = stacked_moe(block.experts.gate_up_proj.data, block.experts.down_proj.data, 3, renormalize=False,
                      use_grouped_topk=True, num_expert_group=4, topk_group=2, routed_scaling_factor=1.5)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = block(x[None])[0]
        out = moe(x, block.gate(x)[0]) + block.shared_experts(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_deepseek_v3_sigmoid_bias_routing_parity():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                           n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1)
    block = randomize(DeepseekV3MoE(cfg).eval(), std=0.5)
    block.gate.e_score_correction_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(4)))
    moe = stacked_moe(block.experts.gate_up_proj.data, block.experts.down_proj.data, 3, renormalize=True,
                      use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                      routed_scaling_factor=2.5, e_score_correction_bias=block.gate.e_score_correction_bias)
    assert set(dict(moe.named_parameters())) == {"w13_weight", "w2_weight"}  # the bias stays the router's
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = block(x[None])[0]
        out = moe(x, block.gate(x)[0]) + block.shared_experts(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_grouped_topk_only_picks_from_kept_groups():
    logits = torch.tensor([[5.0, 0.0, 4.9, 0.0, 0.0, 4.8, 0.0, 0.0]])  # groups of 2: (5,0) (4.9,0) (0,4.8) (0,0)
    w, ids = grouped_topk(logits, top_k=2, renormalize=False, num_expert_group=4, topk_group=1)
    assert sorted(ids[0].tolist()) == [0, 1]  # only group 0 survives, so expert 2 (4.9) is not chosen
    w2, ids2 = fused_topk(logits, top_k=2, renormalize=True)
    assert sorted(ids2[0].tolist()) == [0, 2] and torch.allclose(w2.sum(-1), torch.ones(1))


def test_custom_routing_function_is_used():
    calls = []

    def route(hidden, logits, top_k, renormalize):
        calls.append((top_k, renormalize))
        ids = torch.zeros(hidden.shape[0], top_k, dtype=torch.int32)
        ids[:, 1] = 3
        return torch.full((hidden.shape[0], top_k), 0.5), ids

    g = torch.Generator().manual_seed(6)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2
    moe = stacked_moe(gate_up, down, K, custom_routing_function=route)
    x = torch.randn(3, H, generator=g)
    w = torch.full((3, K), 0.5)
    ids = torch.tensor([[0, 3]] * 3)
    torch.testing.assert_close(moe(x, torch.randn(3, E)), per_token_loop(x, gate_up, down, w, ids),
                               rtol=1e-5, atol=1e-5)
    assert calls == [(K, True)]


def save_tiny(model_cls, cfg, tmp_path):
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.save_pretrained(tmp_path)
    return model, load_file(os.path.join(tmp_path, "model.safetensors"))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_load_per_expert_keys_from_saved_checkpoint(arch, tmp_path):
    """transformers 5 saves experts per expert on disk; load those keys and match the HF block."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=K, initializer_range=0.3)
    if arch == "mixtral":
        cfg = MixtralConfig(intermediate_size=I, num_local_experts=E, **common)
        model, ckpt = save_tiny(MixtralForCausalLM, cfg, tmp_path)
        block_prefix, names, renorm = "model.layers.0.block_sparse_moe.", ("w1", "w2", "w3"), True
    else:
        cfg = Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=I, shared_expert_intermediate_size=40,
                             num_experts=E, norm_topk_prob=True, **common)
        model, ckpt = save_tiny(Qwen2MoeForCausalLM, cfg, tmp_path)
        block_prefix, names, renorm = "model.layers.0.mlp.", ("gate_proj", "down_proj", "up_proj"), True
    moe = FusedMoE(E, K, H, I, renormalize=renorm, prefix=block_prefix + "experts")
    params = {block_prefix + n: p for n, p in moe.named_parameters(prefix="experts")}
    mapping = FusedMoE.make_expert_params_mapping(*names, num_experts=E)
    loaded = {load_expert_weight(params, k, v, mapping) for k, v in ckpt.items() if ".experts." in k}
    assert loaded == set(params)
    assert sum(".experts." in k for k in ckpt) == 3 * E  # no expert key left unused

    block = model.model.layers[0].mlp
    torch.testing.assert_close(moe.w13_weight, block.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(moe.w2_weight, block.experts.down_proj, rtol=0, atol=0)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = moe(x, block.gate(x)[0])
        if arch == "qwen2_moe":
            out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        torch.testing.assert_close(out, block(x[None])[0], rtol=1e-5, atol=1e-5)


def test_expert_params_mapping_shape():
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=2)
    assert ("experts.w13_", "experts.1.up_proj.", 1, "w3") in mapping
    assert ("experts.w2_", "experts.0.down_proj.", 0, "w2") in mapping
    assert len(mapping) == 6
    # expert 1's keys must not match expert 11's
    params = dict(FusedMoE(12, 2, H, I).named_parameters(prefix="experts"))
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=12)
    w = torch.randn(I, H)
    load_expert_weight(params, "mlp.experts.11.gate_proj.weight".removeprefix("mlp."), w, mapping)
    assert torch.equal(params["experts.w13_weight"][11, :I], w)


@pytest.mark.parametrize("tp", [2, 3])
def test_tensor_parallel_shards_sum_to_full(tp):
    inter = 12 * tp // 2 * 2  # divisible by tp
    g = torch.Generator().manual_seed(8)
    gate_up, down = torch.randn(E, 2 * inter, H, generator=g) * 0.3, torch.randn(E, H, inter, generator=g) * 0.3
    x, logits = torch.randn(5, H, generator=g), torch.randn(5, E, generator=g)
    full = stacked_moe(gate_up, down, K)(x, logits)
    total = torch.zeros_like(full)
    local = inter // tp
    for rank in range(tp):
        with tp_override(rank, tp):
            shard = stacked_moe(gate_up, down, K)
        assert shard.w13_weight.shape == (E, 2 * local, H) and shard.w2_weight.shape == (E, H, local)
        rows = slice(rank * local, (rank + 1) * local)
        assert torch.equal(shard.w13_weight[:, :local], gate_up[:, :inter][:, rows])
        assert torch.equal(shard.w13_weight[:, local:], gate_up[:, inter:][:, rows])
        assert torch.equal(shard.w2_weight, down[:, :, rows])
        # per-expert keys give the same shard as the stacked tensors
        with tp_override(rank, tp):
            per_expert = FusedMoE(E, K, H, inter)
        params = dict(per_expert.named_parameters(prefix="experts"))
        mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", E)
        for e in range(E):
            for name, t in (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]),
                            ("down_proj", down[e])):
                load_expert_weight(params, f"experts.{e}.{name}.weight", t, mapping)
        assert torch.equal(per_expert.w13_weight, shard.w13_weight)
        assert torch.equal(per_expert.w2_weight, shard.w2_weight)
        total += shard(x, logits)  # collectives are no-ops under tp_override: sum the partial outputs
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)


def test_weight_loader_rejects_bad_input():
    moe = FusedMoE(E, K, H, I)
    load = moe.weight_loader
    with pytest.raises(ValueError, match="shard_id must be"):
        load(moe.w13_weight, torch.zeros(I, H), "k", "w4", 0)
    with pytest.raises(ValueError, match="does not belong"):
        load(moe.w2_weight, torch.zeros(I, H), "k", "w1", 0)
    with pytest.raises(ValueError, match="out of range"):
        load(moe.w13_weight, torch.zeros(I, H), "k", "w1", E)
    with pytest.raises(ValueError, match="2-D"):
        load(moe.w13_weight, torch.zeros(E, I, H), "k", "w1", 0)
    with pytest.raises(ValueError, match="intermediate_size"):
        load(moe.w13_weight, torch.zeros(I + 2, H), "k", "w1", 0)
    with pytest.raises(ValueError, match="does not match"):
        load(moe.w13_weight, torch.zeros(I, H + 1), "k", "w3", 1)
    with pytest.raises(ValueError, match="fused gate_up"):
        load(moe.w13_weight, torch.zeros(E, I, H), "k", "w13", None)
    with pytest.raises(KeyError, match="does not have"):
        load_expert_weight({}, "experts.0.w1.weight", torch.zeros(I, H),
                           FusedMoE.make_expert_params_mapping("w1", "w2", "w3", E))
    with pytest.raises(ValueError, match="router_logits or precomputed"):
        moe(torch.zeros(2, H))
    with pytest.raises(ValueError, match="router_logits must be"):
        moe(torch.zeros(2, H), torch.zeros(2, E + 1))
    with pytest.raises(ValueError, match="activation"):
        FusedMoE(E, K, H, I, activation="relu")
    with pytest.raises(ValueError, match="not divisible"):
        with tp_override(0, 5):
            FusedMoE(E, K, H, I)


def test_triton_backend_through_layer():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(9)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2
    x, logits = torch.randn(5, H, generator=g), torch.randn(5, E, generator=g)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_moe = stacked_moe(gate_up, down, K, backend="torch").to(device)
    triton_moe = stacked_moe(gate_up, down, K, backend="triton").to(device)
    x, logits = x.to(device), logits.to(device)
    torch.testing.assert_close(triton_moe(x, logits), torch_moe(x, logits), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_layer_defaults_to_triton_and_matches_torch_bf16():
    g = torch.Generator().manual_seed(10)
    h, inter, e, k = 512, 768, 16, 4
    gate_up, down = torch.randn(e, 2 * inter, h, generator=g) / h**0.5, torch.randn(e, h, inter, generator=g) / inter**0.5
    x, logits = torch.randn(300, h, generator=g), torch.randn(300, e, generator=g)
    with torch.device("cuda"):
        moe = stacked_moe(gate_up.cuda(), down.cuda(), k, params_dtype=torch.bfloat16)
    ref = stacked_moe(gate_up, down, k)(x, logits).cuda()
    out = moe(x.cuda().bfloat16(), logits.cuda())
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2
