"""porter convert on older-style files: GPT-2's Conv1D (transposed weights), fused c_attn split on the
last dim, eager-only attention branches, cross-attention branches, batch-shaped base-model input code,
multi-query attention, a pass-through base-model wrapper, learned position embeddings.

End to end per model type, as in test_convert6_moe: convert, tiny random checkpoint, porter verify's
prefill logits, greedy tokens over 12 new tokens for 4 prompts and logprobs within 2e-3 (fp32, CPU).
"""
from __future__ import annotations

import libcst as cst
import pytest

from porter.convert.context import Context, SourceLines
from porter.convert.normalise_constants import normalise_constants
from porter.convert.normalise_conv1d import normalise_conv1d
from porter.convert.normalise_positions import positions_given
from porter.convert.normalise_shapes import normalise_shapes
from porter.convert.normalise_wrapper import normalise_wrapper
from porter.convert.report import Report

from convert6_helpers import convert as _convert, verify_tiny as _verify

OLDER = [
    "gpt2",
    "gpt_bigcode",  # multi-query attention, fused c_attn
    "opt",  # nested base model, learned positions with an offset, [bsz, tgt_len] shape code
]


@pytest.mark.parametrize("model_type", OLDER)
def test_older_model_matches_hf(model_type, tmp_path):
    result, out = _convert(model_type, tmp_path)
    _verify(model_type, out)


def test_gpt_bigcode_per_head_fused_qkv(tmp_path):
    """multi_query=False: c_attn output viewed [.., heads, 3 * head_dim] and split per head."""
    from transformers import AutoConfig

    AutoConfig.for_model("gpt_bigcode", multi_query=False).save_pretrained(tmp_path / "cfg")
    result, out = _convert("gpt_bigcode", tmp_path)
    assert "num_kv_heads=self.kv_heads" in result.code
    _verify(str(tmp_path / "cfg"), out)


def test_gpt2_conversion_steps_are_reported(tmp_path):
    result, _ = _convert("gpt2", tmp_path)
    by_pass = result.report.by_pass()
    assert any("Conv1D" in c.message for c in by_pass["conv1d"])
    assert "Conv1D(" not in result.code and ".t()" in result.code  # load_weights transposes
    assert "_upcast_and_reordered_attn" not in result.code  # the eager-only branch folded away
    assert "self.crossattention =" not in result.code and "encoder_hidden_states" not in result.code


def _ctx(src):
    module = cst.parse_module(src)
    return module, Context(filename="s.py", report=Report("s.py"), lines=SourceLines(module), package=None)


def test_conv1d_becomes_linear_and_its_keys_are_transposed():
    module, ctx = _ctx('''
class Mlp(nn.Module):
    def __init__(self, n, config):
        self.c_fc = Conv1D(n, config.hidden_size)

class Block(nn.Module):
    def __init__(self, config):
        self.mlp = Mlp(4, config)
''')
    code = normalise_conv1d(module, ctx).code
    assert "self.c_fc = nn.Linear(config.hidden_size, n)" in code
    assert ctx.transposed_keys == r"\.mlp\.c_fc\.weight$"


def test_shape_idioms_on_the_last_dim():
    module, ctx = _ctx('''
class A(nn.Module):
    def forward(self, hidden_states):
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        out = out.reshape(*out.shape[:-2], -1)
        b, s, h = hidden_states.shape
        return out.view(b, s, h)
''')
    code = normalise_shapes(module, ctx).code
    assert "split(self.split_size, dim=-1)" in code
    assert "out.reshape(*hidden_states.shape[:-1], -1)" in code
    assert "*lead_shape, h = hidden_states.shape" in code and "out.view(*lead_shape, h)" in code


def test_four_d_head_splits_use_the_last_dim():
    module, ctx = _ctx('''
class A(nn.Module):
    def forward(self, hidden_states):
        q, k, v = self.c_attn(hidden_states).unsqueeze(1).split((a, b, b), dim=3)
        q2, k2, v2 = self.c_attn(hidden_states).view(*hidden_states.shape[:2], h, 3 * d).split(3 * [d], dim=3)
        return q
''')
    code = normalise_shapes(module, ctx).code
    assert "self.c_attn(hidden_states).split((a, b, b), dim=-1)" in code
    assert ".view(*hidden_states.shape[:-1], h, 3 * d).split(3 * [d], dim=-1)" in code


def test_shape_unpack_used_otherwise_is_left_alone():
    module, ctx = _ctx('''
def f(self, x):
    b, s, h = x.shape
    return x.view(b * s, h)
''')
    assert "b, s, h = x.shape" in normalise_shapes(module, ctx).code


def test_shape_unpack_reading_only_the_last_dim_keeps_only_it():
    module, ctx = _ctx('''
class Router(nn.Module):
    def forward(self, hidden_states, y):
        _, _, hidden_dim = hidden_states.shape
        _, _, width = y.size()
        return hidden_states.view(-1, hidden_dim), y.view(-1, width)
''')
    code = normalise_shapes(module, ctx).code
    assert "hidden_dim = hidden_states.shape[-1]" in code and "width = y.size(-1)" in code
    assert "_, _," not in code


def test_eager_branch_and_cross_attention_fold():
    module, ctx = _ctx('''
class Attn(nn.Module):
    def __init__(self, config, is_cross_attention=False):
        self.is_cross_attention = is_cross_attention
        if self.is_cross_attention:
            self.q_attn = Conv1D(1, 2)
        if config.add_cross_attention:
            self.cross = 1

    def forward(self, x):
        using_eager = self.config._attn_implementation == "eager"
        if using_eager and self.reorder:
            out = self._slow(x)
        else:
            out = fast(x)
        return out
''')
    code = normalise_constants(module, ctx).code
    assert "q_attn" not in code and "self.cross" not in code and "using_eager" not in code
    assert "out = fast(x)" in code and "_slow" not in code


def test_default_fill_local_folds():
    """`m = None; if m is None: m = ...` (OPT's position mask): the test folds, the fill is then dead."""
    module, ctx = _ctx('''
def forward(self, x, position_ids):
    m = None
    if m is None:
        m = torch.ones(3)
    if position_ids is None:
        position_ids = torch.cumsum(m, dim=1)
    return self.emb(m, position_ids=position_ids)
''')
    code = normalise_constants(module, ctx, facts=[positions_given]).code
    assert "if m is None" not in code and "m = torch.ones(3)" in code
    assert "cumsum" not in code  # positions are always given


def test_pass_through_wrapper_collapses_with_a_checkpoint_rename():
    module, ctx = _ctx('''
class Decoder(nn.Module):
    def __init__(self, config):
        self.layers = nn.ModuleList([Layer(config) for _ in range(2)])

class Model(nn.Module):
    def __init__(self, config):
        self.decoder = Decoder(config)

    def forward(self, x):
        return self.decoder(x)

class ForCausalLM(nn.Module):
    def __init__(self, config):
        self.model = Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x):
        return self.lm_head(self.model.decoder(x))
''')
    code = normalise_wrapper(module, ctx).code
    assert "self.model = Decoder(config)" in code and "self.lm_head(self.model(x))" in code
    assert ctx.checkpoint_renames == [(r"^model\.decoder\.", "model.")]


def test_hf_only_input_traces_are_dropped():
    from porter.convert.normalise_inputs import normalise_inputs

    module, ctx = _ctx('''
class Base(nn.Module):
    def __init__(self, config):
        self.wte = nn.Embedding(config.vocab_size, 8)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """input_ids: ids; attention_mask: which tokens to attend to."""
        kwargs.pop("output_attentions", None)
        kwargs.pop("my_key", None)
        if input_ids is not None:
            self.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
            input_ids = input_ids.view(-1, input_shape[-1])
        return self.wte(input_ids)
''')
    ctx.roles.base = "Base"
    code = normalise_inputs(module, ctx).code
    assert '"""input_ids' not in code and "output_attentions" not in code
    assert 'kwargs.pop("my_key", None)' in code  # not an inference flag: kept
    assert "warn_if_padding" not in code and "view(-1" not in code and "if input_ids is not None" not in code
