"""porter convert on multi-head latent attention (deepseek_v2): low-rank q/kv projections, rope on the rope
part only, v zero-padded to the q/k head size; its MoE layers (grouped routing, routed scaling, shared
experts, a dense first layer) through FusedMoE.

End to end as in test_convert6_moe: convert the installed modeling file once, tiny random checkpoint from
a small config, porter verify's prefill logits, greedy tokens over 12 new tokens for 4 prompts and
logprobs within 2e-3 (fp32, CPU).
"""
from __future__ import annotations

from pathlib import Path

import libcst as cst
import torch
import pytest

from porter.convert import ConversionError
from porter.convert.context import Context, SourceLines
from porter.convert.normalise_mla import normalise_mla
from porter.convert.report import Report

from convert6_helpers import convert as _convert, verify_tiny as _verify

# v_head_dim 8 < q/k head 16 + 16: the padding path runs; head_dim = rope dim (what the config derives,
# and the value verify's shrink_config sets)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=16, v_head_dim=8, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, num_hidden_layers=2,
            vocab_size=256)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return _convert("deepseek_v2", tmp_path_factory.mktemp("mla"))


@pytest.mark.parametrize("extra", [
    dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5),
    dict(q_lora_rank=None, topk_method="greedy"),
    dict(q_lora_rank=None, topk_method="greedy", rope_parameters=YARN),  # yarn: mscale in the softmax scale
    dict(q_lora_rank=24, topk_method="greedy", v_head_dim=40),  # v wider than q/k: q and k padded instead
], ids=["q_lora-grouped", "q_proj-greedy", "yarn", "wide-v"])
def test_deepseek_v2_matches_hf(converted, extra, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("deepseek_v2", **{**TINY, **extra}).save_pretrained(tmp_path / "cfg")
    _verify(str(tmp_path / "cfg"), converted[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_v2_matches_hf_on_cuda(converted, dtype, tmp_path):
    """DeepSeek-V2's real head layout: q/k heads of 176 + 16 = 192 (not a power of two), v heads of 128
    padded to 192, through the Triton attention and FusedMoE kernels."""
    from transformers import AutoConfig

    from porter.verify.run import VerifyOptions, verify

    tiny = {**TINY, "qk_nope_head_dim": 176, "v_head_dim": 128}
    AutoConfig.for_model("deepseek_v2", **tiny, q_lora_rank=24, topk_method="group_limited_greedy", n_group=2,
                         topk_group=1).save_pretrained(tmp_path / "cfg")
    report = verify(VerifyOptions(target=str(tmp_path / "cfg"), tiny=True, model_file=converted[1], max_tokens=12,
                                  device="cuda", dtype=dtype))
    assert report.passed, [f"{c.name}: {c.detail}" for c in report.checks if not c.passed]


def test_deepseek_v2_conversion(converted):
    result, _ = converted
    code = result.code
    assert "self.kv_a_proj_with_mqa = ReplicatedLinear(" in code and "self.kv_b_proj = ColumnParallelLinear(" in code
    assert "self.o_proj = RowParallelLinear(" in code and "torch.nn.functional.pad(value_states" in code
    assert "def expand_kv" not in code and ".flatten(-2).type_as(xq)" in code
    assert "FusedMoE(" in code and '"gate_proj"' in code  # per-expert keys from the conversion mapping
    assert any("latent attention" in c.message for c in result.report.by_pass()["mla"])
    # the rewritten attention is shorter than the source's; later classes are still reported at their source lines
    source = Path(result.report.filename).read_text().splitlines()
    decoder = next(c for c in result.report.by_pass()["analyse"] if "decoder layer" in c.message)
    assert source[decoder.line - 1].startswith("class DeepseekV2DecoderLayer(")


# a latent attention written differently from deepseek_v2 (other names, rope inline on the q split,
# the kv_b expansion inline): recognised by its dataflow
MLA = '''
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def rope(a, b, f):
    a2 = torch.view_as_complex(a.float().reshape(*a.shape[:-1], -1, 2))
    b2 = torch.view_as_complex(b.float().reshape(*b.shape[:-1], -1, 2))
    return torch.view_as_real(a2 * f.unsqueeze(1)).flatten(3).type_as(a), torch.view_as_real(b2 * f.unsqueeze(1)).flatten(3).type_as(b)


class Latent(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n = config.heads
        self.wq = nn.Linear(config.hidden_size, self.n * (config.nope + config.rope), bias=False)
        self.down = nn.Linear(config.hidden_size, config.rank + config.rope, bias=False)
        self.down_norm = Norm(config.rank)
        self.up = nn.Linear(config.rank, self.n * (config.nope + config.vdim), bias=False)
        self.wo = nn.Linear(self.n * config.vdim, config.hidden_size, bias=False)
        self.nope, self.rope, self.rank, self.vdim = config.nope, config.rope, config.rank, config.vdim

    def forward(self, x, freqs, mask=None):
        b, s = x.shape[:-1]
        q = self.wq(x).view(b, s, -1, self.nope + self.rope).transpose(1, 2)
        qn, qr = q.split([self.nope, self.rope], dim=-1)
        lat, kr = torch.split(self.down(x), [self.rank, self.rope], dim=-1)
        kv = self.up(self.down_norm(lat)).view(b, s, -1, self.nope + self.vdim).transpose(1, 2)
        kn, v = torch.split(kv, [self.nope, self.vdim], dim=-1)
        qr, kr = rope(qr, kr.view(b, 1, s, self.rope), freqs)
        attention_interface = ALL_ATTENTION_FUNCTIONS["sdpa"]
        out, w = attention_interface(self, torch.cat((qn, qr), -1), torch.cat((kn, kr.expand(-1, self.n, -1, -1)), -1), v, mask, scaling=0.1)
        return self.wo(out.reshape(b, s, -1)), w
'''


def _normalise(src: str):
    module = cst.parse_module(src)
    ctx = Context(filename="snippet.py", report=Report("snippet.py"), lines=SourceLines(module), package=None)
    return normalise_mla(module, ctx).code, ctx


def test_latent_attention_recognised_by_dataflow():
    code, ctx = _normalise(MLA)
    assert "self.wq = ColumnParallelLinear(" in code and "self.up = ColumnParallelLinear(" in code
    assert "self.down = ReplicatedLinear(" in code and "self.wo = RowParallelLinear(" in code
    assert ctx.attn_heads["Latent"] == ("divide(self.n, get_tp_world_size())",) * 2 + \
        ("max(self.nope + self.rope, self.vdim)",)
    # flat tokens: heads from the projections' widths, one rope key broadcast to every head
    assert "qn, qr = torch.split(q.unflatten(-1, (-1, qk_head_size)), [self.nope, self.rope], dim=-1)" in code
    assert "qr, kr = rope(qr, kr.unsqueeze(1), freqs)" in code
    assert "kn, v = torch.split(kv_1, [self.nope, self.vdim], dim=-1)" in code  # the forward had a `kv`
    assert "head_size = max(qk_head_size, self.vdim)" in code
    assert "v = torch.nn.functional.pad(v, (0, head_size - self.vdim))" in code
    assert "scaling=0.1" in code and "out = self.wo(out)[0]" in code
    assert code.count(".flatten(-2).type_as(") == 2 and ".flatten(3)" not in code
    assert "view(b, s" not in code and "transpose(1, 2)" not in code


def test_latent_attention_runs_on_flat_tokens():
    """The rewritten forward, run with a stand-in attention, equals the batch-shaped original."""
    import torch
    from torch import nn

    class Cfg:
        hidden_size, heads, nope, rope, rank, vdim = 16, 2, 4, 4, 6, 3

    class Norm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w = nn.Parameter(torch.rand(n))

        def forward(self, x):
            return x * self.w

    def sdpa(module, q, k, v, mask, scaling):  # [b, h, s, d] causal attention with a given scale
        s = (q @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2), None

    class Lin(nn.Linear):  # engine linears return (out, bias)
        def forward(self, x):
            return super().forward(x), None

    def load(src, **names):
        ns = {"torch": torch, "nn": nn, "Norm": Norm, "ALL_ATTENTION_FUNCTIONS": {"sdpa": sdpa}, **names}
        exec(compile(src.replace("from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n", ""), "s", "exec"),
             ns)
        return ns

    hf = load(MLA)
    code, _ = _normalise(MLA)
    flat = load(code, ColumnParallelLinear=Lin, ReplicatedLinear=Lin, RowParallelLinear=Lin,
                divide=lambda a, b: a // b, get_tp_world_size=lambda: 1)
    torch.manual_seed(0)
    ref = hf["Latent"](Cfg())
    new = flat["Latent"](Cfg())
    new.load_state_dict(ref.state_dict())

    def flat_attention(self, q, k, v, mask, scaling):  # [T, h, d] -> [T, h * d]
        out, _ = sdpa(self, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scaling)
        return out[0].flatten(-2), None

    flat["ALL_ATTENTION_FUNCTIONS"]["sdpa"] = flat_attention
    x = torch.randn(1, 5, 16)
    angles = torch.arange(5)[:, None] * torch.rand(2)
    freqs = torch.polar(torch.ones_like(angles), angles)
    want, _ = ref(x, freqs[None])
    got, _ = new(x[0], freqs)
    torch.testing.assert_close(got, want[0])


def test_unsupported_latent_variant_is_refused_with_its_line():
    """q split into parts that do not match the key's [nope, rope] layout: not the recognised MLA."""
    src = MLA.replace("qn, qr = q.split([self.nope, self.rope], dim=-1)", "qn, qr = q.split([self.rope, self.nope], dim=-1)")
    line = next(i for i, text in enumerate(src.splitlines(), 1) if "q = self.wq(x)" in text)
    with pytest.raises(ConversionError, match=rf"snippet.py:{line}: cannot convert multi-head latent attention "
                                              r"`Latent`: q is not split once into \[self.nope, self.rope\]"):
        _normalise(src)


def test_unmodelled_computation_is_refused_not_dropped():
    """The forward is regenerated from the recognised parts: a statement computing anything else (here a
    scale on the rope key) would be lost, so the converter refuses it by line."""
    src = MLA.replace("        kv = self.up(", "        kr = kr * 2.0\n        kv = self.up(")
    line = next(i for i, text in enumerate(src.splitlines(), 1) if "kr = kr * 2.0" in text)
    with pytest.raises(ConversionError, match=rf"snippet.py:{line}: cannot convert multi-head latent attention "
                                              r"`Latent`: `kr = kr \* 2.0` computes on a tensor"):
        _normalise(src)
    # the un-normed latent used elsewhere than the norm: also refused
    src = MLA.replace("        kv = self.up(", "        lat = lat * 2.0\n        kv = self.up(")
    with pytest.raises(ConversionError, match=r"the latent `lat` is read other than by `self.down_norm`"):
        _normalise(src)


def test_other_attention_is_left_alone():
    """A plain attention block (no normed latent split) is not MLA: untouched, no heads recorded."""
    src = '''
class Attn(nn.Module):
    def __init__(self, config):
        self.q_proj = nn.Linear(4, 4)

    def forward(self, x):
        q, k = self.q_proj(x).split([2, 2], dim=-1)
        out, w = ALL_ATTENTION_FUNCTIONS["sdpa"](self, q, k, k, None)
        return out, w
'''
    code, ctx = _normalise(src)
    assert code == src and not ctx.attn_heads


def test_deepseek_v2_tp2_matches_tp1(tmp_path):
    """TP=2 (gloo, two workers) generates what TP=1 does: heads split over the ranks (q and kv_b
    column-parallel, o_proj row-parallel), the latent projections replicated, the experts' intermediate
    dim split."""
    from transformers import AutoConfig, DeepseekV2ForCausalLM

    from test_tp_converted import tp2_matches_tp1

    config = AutoConfig.for_model("deepseek_v2", **TINY, q_lora_rank=24, topk_method="group_limited_greedy",
                                  n_group=2, topk_group=1, intermediate_size=64, max_position_embeddings=128,
                                  initializer_range=0.2)
    full, rank0 = tp2_matches_tp1(tmp_path, "deepseek_v2", DeepseekV2ForCausalLM, config)
    attn = "model.layers.1.self_attn."
    assert full[attn + "kv_b_proj.weight"] == (4 * (16 + 8), 32) and rank0[attn + "kv_b_proj.weight"] == (48, 32)
    assert full[attn + "q_b_proj.weight"] == (4 * 32, 24) and rank0[attn + "q_b_proj.weight"] == (64, 24)
    assert full[attn + "o_proj.weight"] == (64, 32) and rank0[attn + "o_proj.weight"] == (64, 16)
    assert rank0[attn + "kv_a_proj_with_mqa.weight"] == full[attn + "kv_a_proj_with_mqa.weight"] == (48, 64)
    assert rank0["model.layers.1.mlp.experts.w13_weight"] == (4, 32, 64)


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_deepseek_v3_matches_hf(rope_interleave, tmp_path):
    """Another MLA file: the rope chosen by an if/else between an interleaved and a rotate-half function on
    `cos, sin = position_embeddings`; sigmoid routing with a score-correction bias (a persistent buffer, loaded
    as a frozen parameter; set non-zero here since verify's perturbation moves parameters only)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from porter.verify.run import VerifyOptions, verify
    from porter.verify.tiny import make_tiny_checkpoint

    result, out = _convert("deepseek_v3", tmp_path)
    assert "e_score_correction_bias = nn.Parameter(" in result.code
    AutoConfig.for_model("deepseek_v3", **TINY, q_lora_rank=24, n_group=2, topk_group=1,
                         rope_interleave=rope_interleave).save_pretrained(tmp_path / "cfg")
    ckpt = make_tiny_checkpoint(str(tmp_path / "cfg"), tmp_path / "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    biases = [k for k in weights if k.endswith("e_score_correction_bias")]
    assert biases
    gen = torch.Generator().manual_seed(0)
    weights.update({k: torch.randn(weights[k].shape, generator=gen) for k in biases})
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    report = verify(VerifyOptions(target=str(ckpt), model_file=out, max_tokens=12))
    assert report.passed, [f"{c.name}: {c.detail}" for c in report.checks if not c.passed]


def test_glm4_moe_lite_matches_hf(tmp_path):
    """Its tiny config has v heads (256) wider than q/k heads (192 + 16): q and k are the padded ones."""
    _, out = _convert("glm4_moe_lite", tmp_path)
    _verify("glm4_moe_lite", out)
