"""porter convert on files that compute attention inline (matmul/baddbmm -> scale/mask/ALiBi -> softmax ->
matmul, or SDPA): bloom (ALiBi, baddbmm, per-head interleaved fused qkv) and falcon (rotary or ALiBi by
config, multi-query / grouped / per-head fused qkv via `_split_heads`, parallel attention + MLP).

End to end per model (as test_convert6_older): convert, tiny random checkpoint, porter verify's prefill
logits, greedy tokens of the paged engine over 12 new tokens for 4 prompts, logprobs within 2e-3 (fp32,
CPU). Unit tests run the normaliser on small custom-named snippets and compare the rewritten block,
run on flat tokens, with the original batch-first block.
"""
from __future__ import annotations

import math
import types

import libcst as cst
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from porter.convert.context import Context, SourceLines
from porter.convert.normalise_function_dropout import normalise_function_dropout
from porter.convert.normalise_inline_attention import normalise_inline_attention
from porter.convert.normalise_logits_name import normalise_logits_name
from porter.convert.normalise_return_dict import normalise_return_dict
from porter.convert.report import Report
from porter.engine.distributed import tp_override
from porter.engine.layers.alibi import alibi_slopes, local_heads

from convert6_helpers import convert as _convert, verify_tiny as _verify


# ---------------------------------------------------------------- dev-set parity
def test_bloom_matches_hf(tmp_path):
    result, out = _convert("bloom", tmp_path)
    code = result.code
    assert "alibi_slopes=alibi_slopes(self.num_heads) * self.beta" in code  # once, at construction
    assert "build_alibi_tensor" not in code and "baddbmm" not in code and "alibi" not in code.split(
        "def forward")[1].split("def ")[0]  # no per-forward ALiBi plumbing left in the first forward
    _verify("bloom", out)


@pytest.mark.parametrize("overrides", [{}, {"attn_config": {"clip_qkv": 0.5, "softmax_scale": 0.3}}],
                         ids=["default", "clip_qkv,softmax_scale"])
def test_mpt_matches_hf(overrides, tmp_path):
    """ALiBi with the interleaved slope variant, passed to the blocks under another name (position_bias),
    sliced to the key length in the block: slopes once, bias plumbing gone."""
    from transformers import AutoConfig

    result, out = _convert("mpt", tmp_path)
    assert "alibi_slopes=alibi_slopes_interleaved(self.n_heads, 8)" in result.code
    assert "position_bias" not in result.code and "build_mpt_alibi_tensor(" not in result.code.split("class MptModel")[1]
    target = "mpt"
    if overrides:
        AutoConfig.for_model("mpt", **overrides).save_pretrained(tmp_path / "cfg")
        target = str(tmp_path / "cfg")
    _verify(target, out)


@pytest.mark.parametrize("overrides", [
    {},  # default: rotary, multi-query, parallel attention + MLP
    {"alibi": True},
    {"new_decoder_architecture": True, "num_kv_heads": 2},  # grouped kv broadcast to all heads
    {"multi_query": False, "num_kv_heads": 4},  # per-head interleaved q/k/v
    {"parallel_attn": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_falcon_matches_hf(overrides, tmp_path):
    from transformers import AutoConfig

    result, out = _convert("falcon", tmp_path)
    # config-driven branches stay config-driven: one converted file serves every variant
    assert "if not self.use_alibi:" in result.code and "self.use_alibi = config.alibi" in result.code
    assert "if self.config.parallel_attn:" in result.code and "if self.new_decoder_architecture:" in result.code
    target = "falcon"
    if overrides:
        AutoConfig.for_model("falcon", **overrides).save_pretrained(tmp_path / "cfg")
        target = str(tmp_path / "cfg")
    _verify(target, out)


@pytest.mark.parametrize("model_type", ["bloom", "falcon", "mpt"])
def test_inline_attention_models_tp2_match_tp1(model_type, tmp_path):
    """Fused q/k/v sliced by offsets or per-head views keep their blocks replicated: still correct on
    two ranks (the ALiBi slopes cover all heads on each rank)."""
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, MptConfig, MptForCausalLM

    from test_tp_converted import tp2_matches_tp1

    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, initializer_range=0.2)
    cls, config = {"bloom": (BloomForCausalLM, BloomConfig(**small, n_head=4)),
                   "falcon": (FalconForCausalLM, FalconConfig(**small, num_attention_heads=4, alibi=True)),
                   "mpt": (MptForCausalLM, MptConfig(vocab_size=100, d_model=32, n_heads=4, n_layers=2,
                                                     max_seq_len=128, initializer_range=0.2))}[model_type]
    tp2_matches_tp1(tmp_path, model_type, cls, config)


# ---------------------------------------------------------------- ALiBi slopes
@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 40])
def test_alibi_slopes_equal_the_reference_formula(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, "cpu"))
    assert torch.equal(alibi_slopes(heads, torch.bfloat16), alibi_slopes(heads).bfloat16().float())


@pytest.mark.parametrize("heads", [1, 4, 6, 12, 16, 24])
def test_interleaved_alibi_slopes_equal_the_reference_bias(heads):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from porter.engine.layers.alibi import alibi_slopes_interleaved

    bias = build_mpt_alibi_tensor(heads, 5)  # [heads, 1, 5]: slope * (key - 4)
    torch.testing.assert_close(bias[:, 0, 4] - bias[:, 0, 3], alibi_slopes_interleaved(heads), rtol=0, atol=0)


def test_alibi_slopes_per_rank():
    full = alibi_slopes(8)
    with tp_override(1, 2):
        assert torch.equal(local_heads(full), full[4:])


# ---------------------------------------------------------------- the normaliser on snippets
_HEADER = "import math\nimport torch\nfrom torch import nn\nfrom torch.nn import functional as F\n\n\n"

# a custom block nobody has seen: fused projection split by offsets, multi-query key, matmul attention
_MIXER = _HEADER + '''class TokenMixer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv = 1
        self.width = config.hidden_size // self.n_head
        self.qkv = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv) * self.width)
        self.out = nn.Linear(self.n_head * self.width, config.hidden_size)
        self.drop = nn.Dropout(0.1)

    def _split(self, fused):
        bsz, seqlen, _ = fused.shape
        fused = fused.view(bsz, seqlen, self.n_head + 2 * self.n_kv, self.width)
        q = fused[:, :, : self.n_head]
        k = fused[:, :, self.n_head : self.n_head + self.n_kv]
        v = fused[:, :, self.n_head + self.n_kv :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, attention_mask=None):
        bsz, seqlen, _ = x.shape
        q, k, v = self._split(self.qkv(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.width)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.drop(scores.softmax(dim=-1))
        ctx = torch.matmul(probs, v)
        ctx = ctx.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.out(ctx), probs
'''

_SDPA_BLOCK = _HEADER + '''class Mixer2(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None):
        b, s, h = hidden_states.shape
        q, k, v = self.proj(hidden_states).split(h, dim=2)
        q = q.view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k = k.view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        v = v.view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None)
        y = y.transpose(1, 2).contiguous().view(b, s, h)
        return self.o(y)
'''


def _normalise(src: str):
    module = cst.parse_module(src)
    ctx = Context(filename="s.py", report=Report("s.py"), lines=SourceLines(module), package=None)
    return normalise_inline_attention(module, ctx).code, ctx


def _flat_reference(module, q, k, v, mask, scaling=None, num_heads=None, num_kv_heads=None, head_size=None,
                    alibi_slopes=None):
    """What the engine's Attention computes for one causal sequence of flat tokens."""
    t = q.shape[0]
    q, k, v = (x.reshape(t, -1, head_size) for x in (q, k, v))
    assert q.shape[1] == num_heads and k.shape[1] == num_kv_heads
    k, v = (x.repeat_interleave(num_heads // num_kv_heads, dim=1) for x in (k, v))
    scale = head_size ** -0.5 if scaling is None else scaling
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, -1), None


def _run_both(src: str, cls_name: str):
    config = types.SimpleNamespace(num_attention_heads=4, hidden_size=32)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(src, "s.py", "exec"), ns)  # the test's own snippet
    hf = ns[cls_name](config).eval()
    code, ctx = _normalise(src)
    assert not ctx.report.refusals, ctx.report.refusals
    new_ns = {"ALL_ATTENTION_FUNCTIONS": {"eager": _flat_reference}}
    exec(compile(code, "s_flat.py", "exec"), new_ns)
    flat = new_ns[cls_name](config).eval()
    flat.load_state_dict(hf.state_dict())
    x = torch.randn(1, 9, 32)
    causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    want = hf(x, attention_mask=causal)
    got = flat(x[0])  # flat [T, hidden], no mask: the engine applies causality
    want, got = (w[0] if isinstance(w, tuple) else w for w in (want, got))
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    return code


def test_custom_named_inline_attention_runs_the_same_on_flat_tokens():
    code = _run_both(_MIXER, "TokenMixer")
    assert "attention_interface(self, q, k, v, None, scaling=(1 / math.sqrt(self.width)), " \
           "num_heads=self.n_head, num_kv_heads=(self.n_head + self.n_kv) - (self.n_head)" in code
    assert "fused.reshape(fused.shape[0], self.n_head + 2 * self.n_kv, self.width)" in code
    assert "ctx.reshape(x.shape[0], -1)" in code and "transpose" not in code and "softmax" not in code
    assert "return self.out(ctx), attn_weights" in code or "return self.out(ctx), probs" in code


def test_sdpa_call_runs_the_same_on_flat_tokens():
    code = _run_both(_SDPA_BLOCK, "Mixer2")
    assert "scaled_dot_product_attention" not in code and "permute" not in code
    assert "split(h, dim=1)" in code  # the last dim of a flat [T, hidden] tensor


@pytest.mark.parametrize("change, construct", [
    ("probs = self.drop(scores.softmax(dim=-1))", "probs = self.drop(scores.softmax(dim=2))"),
    ("probs = self.drop(scores.softmax(dim=-1))", "probs = self.drop((scores + x.sum()).softmax(dim=-1))"),
    ("ctx = ctx.transpose(1, 2).reshape(bsz, seqlen, -1)", "ctx = ctx.reshape(bsz, -1, seqlen)"),
    ("ctx = ctx.transpose(1, 2).reshape(bsz, seqlen, -1)", "ctx = torch.flip(ctx, [2]).reshape(bsz, seqlen, -1)"),
])
def test_unproven_constructs_are_refused_with_file_and_line(change, construct):
    src = _MIXER.replace(change, construct)
    code, ctx = _normalise(src)
    assert "attention_interface" not in code  # the class is left as it was
    [refusal] = ctx.report.refusals
    class_line = src.splitlines().index("class TokenMixer(nn.Module):") + 1
    construct_line = next(i for i, line in enumerate(src.splitlines(), 1) if construct.strip() in line)
    assert refusal.line == class_line and "inline attention in `TokenMixer`" in refusal.construct
    assert f"(line {construct_line})" in refusal.why


def test_alibi_bias_needs_the_standard_slope_formula():
    """An additive bias from a forward input is ALiBi only if the model builds it with known ALiBi slopes."""
    src = _MIXER.replace("def forward(self, x, attention_mask=None):", "def forward(self, x, bias, attention_mask=None):") \
        .replace("probs = self.drop(scores.softmax(dim=-1))", "probs = self.drop((scores + bias).softmax(dim=-1))")
    _, ctx = _normalise(src)
    [refusal] = ctx.report.refusals
    assert "`bias`: the model does not build it with a known ALiBi slope formula" in refusal.why
    # an input added elsewhere (a residual) is no score bias
    src = _MIXER.replace("def forward(self, x, attention_mask=None):", "def forward(self, x, residual, attention_mask=None):") \
        .replace("return self.out(ctx), probs", "return self.out(ctx) + residual, probs")
    code, ctx = _normalise(src)
    assert not ctx.report.refusals and "return self.out(ctx) + residual, attn_weights" in code.replace("probs", "attn_weights")


# ---------------------------------------------------------------- helper normalisers
def _ctx(src):
    module = cst.parse_module(src)
    return module, Context(filename="s.py", report=Report("s.py"), lines=SourceLines(module), package=None)


def test_return_dict_is_true():
    module, ctx = _ctx('''
def forward(self, x, return_dict=None):
    return_dict = return_dict if return_dict is not None else self.config.return_dict
    if not return_dict:
        return (x,)
    return Out(last_hidden_state=x, return_dict=1)
''')
    code = normalise_return_dict(module, ctx).code
    assert "if not True:" in code and "return_dict = return_dict" not in code and "return_dict=1" in code


def test_lm_head_output_is_named_logits():
    module, ctx = _ctx('''
class LM(nn.Module):
    def __init__(self, config):
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h):
        lm_logits = self.lm_head(h)
        return Out(logits=lm_logits)
''')
    code = normalise_logits_name(module, ctx).code
    assert "logits = self.lm_head(h)" in code and "Out(logits=logits)" in code and "lm_logits" not in code


def test_dropout_in_module_helpers_is_the_identity():
    module, ctx = _ctx('''
def dropout_add(x, residual, prob, training):
    """x, residual, prob, training: ..."""
    out = F.dropout(x, p=prob, training=training)
    return residual + out

class Block(nn.Module):
    def forward(self, a, r):
        return dropout_add(a, r, self.p, training=self.training)
''')
    code = normalise_function_dropout(module, ctx).code
    assert "def dropout_add(x, residual):" in code and "out = x" in code
    assert "dropout_add(a, r)" in code and "training" not in code


# ---------------------------------------------------------------- a custom file end to end
_CUSTOM_BLOCK = '''class TokenMixer(nn.Module):
    """Grouped-query attention computed inline over a fused q/k/v projection split by offsets."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.width = config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv) * self.width, bias=False)
        self.wo = nn.Linear(self.n_head * self.width, config.hidden_size, bias=False)

    def _heads(self, fused):
        bsz, seqlen, _ = fused.shape
        fused = fused.view(bsz, seqlen, self.n_head + 2 * self.n_kv, self.width)
        q = fused[:, :, : self.n_head]
        k = fused[:, :, self.n_head : self.n_head + self.n_kv]
        v = fused[:, :, self.n_head + self.n_kv :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        bsz, seqlen, _ = hidden_states.shape
        q, k, v = self._heads(self.wqkv(hidden_states))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                           enable_gqa=True)
        y = y.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(y), None


'''


def test_custom_remote_code_file_with_inline_attention_matches_hf(tmp_path):
    """The Parallax fixture (a trust_remote_code model) with its attention block rewritten the old way:
    a custom-named block, grouped kv through SDPA, its own head split helper."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "custom_model"
    src = (fixture / "modeling_parallax.py").read_text()
    src = src[:src.index("def repeat_kv(")] + src[src.index("class ParallaxMLP"):]  # the interface helpers
    src = src[:src.index("class ParallaxAttention")] + _CUSTOM_BLOCK + src[src.index("class ParallaxDecoderLayer"):]
    src = src.replace("from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n",
                      "from torch.nn import functional as F\n")
    src = src.replace("ParallaxAttention(config, layer_idx)", "TokenMixer(config, layer_idx)")
    src = src.replace("if isinstance(module, ParallaxAttention):\n            init.ones_(module.head_scale)\n"
                      "        elif isinstance(module, ParallaxRotaryEmbedding):",
                      "if isinstance(module, ParallaxRotaryEmbedding):")
    assert "ALL_ATTENTION_FUNCTIONS" not in src and "head_scale" not in src
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "configuration_parallax.py"):
        shutil.copy(fixture / name, model_dir / name)
    (model_dir / "modeling_parallax.py").write_text(src)

    from porter.convert import convert_file

    result = convert_file(model_dir / "modeling_parallax.py")
    assert "self.attn(q, k, v)" in result.code and "scaled_dot_product_attention" not in result.code
    assert "num_kv_heads=(self.n_head + self.n_kv) - (self.n_head)" in result.code.replace("\n", " ").replace(
        "            ", "")
    out = tmp_path / "parallax_engine.py"
    out.write_text(result.code)
    _verify(str(model_dir), out)
