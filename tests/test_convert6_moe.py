"""porter convert on mixture-of-experts files: stacked experts -> FusedMoE, per-expert checkpoint keys.

End to end per model type: convert the installed modeling file, make a tiny random checkpoint
(save_pretrained writes per-expert keys), then porter verify's checks: prefill logits, greedy tokens of
the paged engine equal HF's for 4 prompts over 12 new tokens, logprobs within 2e-3 (fp32, CPU).
"""
from __future__ import annotations

import json

import libcst as cst
import pytest

from porter.convert import ConversionError, convert_source
from porter.convert.context import Context, SourceLines
from porter.convert.expert_weights import expert_keys
from porter.convert.normalise_moe import normalise_moe
from porter.convert.report import Report

from convert6_helpers import convert as _convert, verify_tiny as _verify


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_model_matches_hf(model_type, tmp_path):
    result, out = _convert(model_type, tmp_path)
    code = result.code
    assert "FusedMoE(" in code and "load_expert_weight(" in code
    assert "index_add_" not in code and "one_hot" not in code  # the HF expert loop is gone
    _verify(model_type, out)


def test_dense_and_sparse_layers_mixed(tmp_path):
    """qwen2_moe with a dense MLP on layer 0 and experts on layer 1 (mlp_only_layers)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2_moe", mlp_only_layers=[0])
    cfg.save_pretrained(tmp_path / "cfg")
    assert json.loads((tmp_path / "cfg" / "config.json").read_text())["mlp_only_layers"] == [0]
    _, out = _convert("qwen2_moe", tmp_path)
    _verify(str(tmp_path / "cfg"), out)


def test_expert_keys_come_from_conversion_mapping():
    assert expert_keys(["MixtralForCausalLM", "mixtral"], "gate_up_proj", "down_proj")[0] == \
        expert_keys(["mixtral"], "gate_up_proj", "down_proj")[0]
    keys, used = expert_keys(["mixtral"], "gate_up_proj", "down_proj")
    assert (keys.gate, keys.up, keys.down, used) == ("w1", "w3", "w2", 2)
    keys, _ = expert_keys(["deepseek_v2"], "gate_up_proj", "down_proj")  # an alias of qwen2_moe's mapping
    assert (keys.gate, keys.up, keys.down) == ("gate_proj", "up_proj", "down_proj")
    assert expert_keys(["llama"], "gate_up_proj", "down_proj") == (None, 0)


EXPERTS = '''
class Experts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_exp
        self.inter = config.ffn
        self.gate_up = nn.Parameter(torch.empty(self.num_experts, {gate_up_shape}))
        self.down = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, self.inter)){extra}
        self.act_fn = ACT2FN[config.act]

    def forward(self, hidden_states, idx, w):
        out = torch.zeros_like(hidden_states)
        mask = torch.nn.functional.one_hot(idx, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            pos, tok = torch.where(mask[e])
            g, u = nn.functional.linear(hidden_states[tok], self.gate_up[e]).chunk(2, dim=-1)
            h = nn.functional.linear(self.act_fn(g) * u, self.down[e])
            out.index_add_(0, tok, h * w[tok, pos, None])
        return out


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.k
        self.experts = Experts(cfg)

    def forward(self, x, weights, ids):
        return self.experts(x, ids, weights)
'''


def _normalise(src: str):
    module = cst.parse_module(src)
    ctx = Context(filename="snippet.py", report=Report("snippet.py"), lines=SourceLines(module), package=None)
    return normalise_moe(module, ctx).code, ctx


def test_experts_class_becomes_fused_moe_with_the_callers_config():
    code, ctx = _normalise(EXPERTS.format(gate_up_shape="2 * self.inter, config.hidden_size", extra=""))
    assert ("self.experts = FusedMoE(num_experts=cfg.n_exp, top_k=cfg.k, hidden_size=cfg.hidden_size, "
            "intermediate_size=cfg.ffn, activation=cfg.act)") in code
    # arguments bound by the experts forward's roles (ids go to one_hot, weights scale the outputs)
    assert "return self.experts(x, topk_weights=weights, topk_ids=ids)" in code
    assert ctx.moe_experts == {"gate_up": "down"}


def test_transposed_expert_layout_is_refused_with_its_line():
    src = EXPERTS.format(gate_up_shape="config.hidden_size, 2 * self.inter", extra="")
    with pytest.raises(ConversionError, match=r"snippet.py:\d+: cannot convert .*expert.*"):
        _normalise(src)


def test_expert_biases_are_refused():
    extra = "\n        self.down_bias = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))"
    src = EXPERTS.format(gate_up_shape="2 * self.inter, config.hidden_size", extra=extra)
    with pytest.raises(ConversionError, match="down_bias.*per-expert biases"):
        _normalise(src)


def test_moe_file_the_normaliser_cannot_handle_is_still_refused():
    """Experts as a ModuleList of MLPs (no stacked parameters): analyse's refusal still names it."""
    src = '''
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

class Moe(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList([Mlp(config) for _ in range(config.num_local_experts)])

    def forward(self, x):
        return x
'''
    with pytest.raises(ConversionError, match="mixture-of-experts block `Moe`"):
        convert_source(src, "moe.py")


def test_gate_in_a_helper_method_with_casts_and_a_functional_activation():
    src = EXPERTS.format(gate_up_shape="2 * self.inter, config.hidden_size", extra="")
    src = src.replace("            g, u = nn.functional.linear(hidden_states[tok], self.gate_up[e]).chunk(2, dim=-1)\n"
                      "            h = nn.functional.linear(self.act_fn(g) * u, self.down[e])\n",
                      "            h = nn.functional.linear(self._gate(nn.functional.linear(hidden_states[tok], self.gate_up[e])), "
                      "self.down[e])\n")
    src = src.replace("        self.act_fn = ACT2FN[config.act]\n", "        self.act_fn = F.silu\n")
    src = src.replace("class Block(", "    def _gate(self, gate_up):\n        g, u = gate_up.chunk(2, dim=-1)\n"
                      "        return (self.act_fn(g.float()) * u.float()).to(g.dtype)\n\n\nclass Block(")
    code, _ = _normalise(src)
    assert 'activation="silu")' in code


def test_clamped_gate_is_refused():
    """A swiglu limit (clamped gate/up) is not what FusedMoE computes."""
    src = EXPERTS.format(gate_up_shape="2 * self.inter, config.hidden_size", extra="")
    src = src.replace("            h = nn.functional.linear(self.act_fn(g) * u, self.down[e])\n",
                      "            h = nn.functional.linear(self.act_fn(g.clamp(max=7.0)) * u, self.down[e])\n")
    with pytest.raises(ConversionError, match="not `act\\(gate\\) \\* up`"):
        _normalise(src)
