"""Before/after golden tests of the converter's passes, one concept per snippet.

Each tests/golden/convert/NAME.before.py starts with `# golden: passes=A,B role=Class ...`; the passes
run in that order over the snippet (with the given class roles) and the result must equal
NAME.after.py exactly. Refusals are tested on snippets below.
"""
from __future__ import annotations

from pathlib import Path

import libcst as cst
import pytest

from porter.convert import ConversionError, convert_source
from porter.convert.attention import AttentionCall
from porter.convert.context import Context, SourceLines
from porter.convert.flatten import FlattenForward
from porter.convert.imports import ResolveRelativeImports
from porter.convert.parallel import ParallelLinears
from porter.convert.prefix import ThreadPrefix
from porter.convert.report import Report
from porter.convert.specialise import DropDropout, InferenceFacts, prune, signatures

GOLDEN = Path(__file__).parent / "golden" / "convert"
PASSES = {p.__name__: p for p in (ResolveRelativeImports, InferenceFacts, DropDropout, FlattenForward,
                                   ParallelLinears, AttentionCall, ThreadPrefix)}


def run_golden(before: str, filename: str = "snippet.py") -> tuple[str, Context]:
    header, _, body = before.partition("\n")
    fields = dict(f.split("=", 1) for f in header.removeprefix("# golden:").split())
    module = cst.parse_module(body)
    ctx = Context(filename, Report(filename), SourceLines(module), package="transformers.models.foo")
    for role in ("attention", "mlp"):
        setattr(ctx.roles, role, set(fields.get(role, "").split(",")) - {""})
    for role in ("decoder", "base", "causal_lm"):
        setattr(ctx.roles, role, fields.get(role))
    for cls in ctx.roles.attention:
        ctx.attn_heads.setdefault(cls, ("config.num_attention_heads", "config.num_key_value_heads", "self.head_dim"))
    assumed = signatures(module)
    for name in fields["passes"].split(","):
        if name == "prune":
            module, assumed = prune(module, ctx, assumed)
        else:
            module = module.visit(PASSES[name](ctx))
    return module.code, ctx


CASES = sorted(p.name.removesuffix(".before.py") for p in GOLDEN.glob("*.before.py"))


@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    out, ctx = run_golden((GOLDEN / f"{name}.before.py").read_text())
    assert not ctx.report.refusals, ctx.report.refusals
    assert out == (GOLDEN / f"{name}.after.py").read_text()
    assert ctx.report.changes and all(c.line for c in ctx.report.changes)


def test_changes_carry_source_lines():
    _, ctx = run_golden((GOLDEN / "specialise_facts.before.py").read_text())
    folded = [c for c in ctx.report.changes if "folded" in c.message]
    # header line is dropped before parsing: line 4 of the snippet is the `if past_key_values` branch
    assert [c.line for c in folded][:2] == [3, 5]


def refusal(src: str) -> str:
    with pytest.raises(ConversionError) as e:
        convert_source(src, "modeling_snippet.py", package="transformers.models.snippet")
    return str(e.value)


ATTENTION = '''
from torch import nn
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS


class SnipAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        {init}

    def forward(self, hidden_states):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface("eager", None)
        return attention_interface(self, hidden_states, hidden_states, hidden_states, None)
'''


def test_refuses_mla_naming_class_and_line():
    msg = refusal(ATTENTION.format(init="self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, config.kv_lora_rank)"))
    assert "modeling_snippet.py:6" in msg and "multi-head latent attention `SnipAttention`" in msg


def test_refuses_a_file_with_no_model_structure():
    msg = refusal(ATTENTION.format(init="self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)"))
    assert "model structure" in msg and "decoder layer" in msg


def test_refuses_attention_keywords_it_does_not_know():
    src = (GOLDEN / "attention.before.py").read_text().replace("dropout=0.0,", "dropout=0.0,\n            rope_fn=1,")
    out, ctx = run_golden(src)
    assert any(r.construct == "attention keyword `rope_fn`" for r in ctx.report.refusals)


def test_refuses_two_attention_calls_that_both_run():
    """Two interface calls in one block (differential attention) would write the layer's cache twice;
    two calls in the branches of an `if` are alternatives and convert."""
    src = (GOLDEN / "attention.before.py").read_text()
    call = src[src.index("        attn_output, attn_weights = attention_interface("):src.index("        return self.o_proj")]
    twice = src.replace(call, call + call.replace("attn_output, attn_weights", "attn_output2, attn_weights2"))
    _, ctx = run_golden(twice)
    assert [r.why for r in ctx.report.refusals] == [
        "it calls the attention interface 2 times in one pass; the engine's paged cache holds one key/value per "
        "layer and token"]
    indented = "".join("    " + line if line.strip() else line for line in call.splitlines(keepends=True))
    branches = src.replace(call, "        if self.sliding_window:\n" + indented + "        else:\n" + indented)
    _, ctx = run_golden(branches)
    assert not ctx.report.refusals


def test_refuses_forward_time_attention_arguments():
    src = (GOLDEN / "attention.before.py").read_text().replace("sliding_window=self.sliding_window",
                                                                 "sliding_window=q.shape[0]")
    _, ctx = run_golden(src)
    assert any("forward-time values (q)" in r.why for r in ctx.report.refusals)


def test_refuses_a_bare_batch_transpose():
    src = (GOLDEN / "flatten.before.py").read_text().replace("return query_states, value_states",
                                                             "return query_states.transpose(1, 2)")
    _, ctx = run_golden(src)
    assert any("batch-first transpose" in r.why for r in ctx.report.refusals)


@pytest.mark.parametrize("change", [
    # one path leaves query_states a transposed tensor: the later transpose would be a second one
    ("        if self.use_qk_norm:\n            query_states = self.q_norm(query_states)\n",
     "        if self.use_qk_norm:\n            query_states = self.q_norm(query_states)\n"
     "        else:\n            query_states = query_states.transpose(1, 2)\n"),
    # not a head view: the projection's output before .view()
    ("        query_states = self.q_proj(hidden_states).view(hidden_shape)\n",
     "        query_states = self.q_proj(hidden_states)\n"),
    # reassigned in a loop: not trusted
    ("        if self.use_qk_norm:\n",
     "        for _ in range(2):\n            query_states = self.q_norm(query_states)\n        if self.use_qk_norm:\n"),
], ids=["transposed-on-one-path", "no-head-view", "loop"])
def test_refuses_a_late_transpose_unless_every_reaching_definition_is_a_head_view(change):
    src = (GOLDEN / "flatten_late_transpose.before.py").read_text()
    assert change[0] in src
    _, ctx = run_golden(src.replace(change[0], change[1]))
    assert [r.construct for r in ctx.report.refusals] == ["`query_states.transpose(1, 2)`"]


def test_relative_import_outside_transformers_is_refused_when_used_in_code():
    module = cst.parse_module("from .configuration_foo import FooConfig\n\nDEFAULT = FooConfig()\n")
    ctx = Context("x.py", Report("x.py"), SourceLines(module), package=None)
    module.visit(ResolveRelativeImports(ctx))
    assert ctx.report.refusals and ctx.report.refusals[0].line == 1


def test_remote_code_config_class_in_annotations_becomes_pretrained_config():
    src = "from torch import nn\nfrom .configuration_foo import FooConfig\n\n\ndef make(config: FooConfig):\n    pass\n"
    module = cst.parse_module(src)
    ctx = Context("x.py", Report("x.py"), SourceLines(module), package=None)
    out = module.visit(ResolveRelativeImports(ctx)).code
    assert not ctx.report.refusals
    assert out == ("from transformers import PretrainedConfig\nfrom torch import nn\n\n\n"
                   "def make(config: PretrainedConfig):\n    pass\n")


def test_dataflow_is_checked_against_the_config_tp_plan(tmp_path):
    """A plan that contradicts the dataflow (down_proj column-parallel) is refused; an agreeing one is not."""
    before = (GOLDEN / "parallel_attention.before.py").read_text()
    decoder = ("\n\nclass FooDecoderLayer(nn.Module):\n    def __init__(self, config):\n        super().__init__()\n"
               "        self.self_attn = FooAttention(config)\n        self.mlp = FooMLP(config)\n")
    before = before.replace("mlp=FooMLP", "mlp=FooMLP decoder=FooDecoderLayer") + decoder
    for style, refused in (("rowwise", False), ("colwise", True)):
        (tmp_path / "configuration_foo.py").write_text(
            "class FooConfig:\n    base_model_tp_plan = {\n        'layers.*.mlp.gate_proj': 'colwise',\n"
            f"        'layers.*.mlp.down_proj': '{style}',\n    }}\n")
        _, ctx = run_golden(before, str(tmp_path / "modeling_foo.py"))
        assert bool(ctx.report.refusals) == refused
        if refused:
            assert "base_model_tp_plan says colwise" in ctx.report.refusals[0].why


def test_replicated_attention_takes_the_classs_own_head_count():
    """A class built with its own head count (per-layer heads) must not get the config's."""
    src = '''# golden: passes=ParallelLinears attention=FooAttention
class FooAttention(nn.Module):
    def __init__(self, config, layer_idx, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    def forward(self, hidden_states):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape)
        out = attention_interface(self, q, k, v)
        out = out.reshape(*input_shape, -1) * self.g_proj(hidden_states).sum()  # whole data: replicated
        return self.o_proj(out)
'''
    code, ctx = run_golden(src)
    assert "self.q_proj = ReplicatedLinear(" in code and not ctx.report.refusals
    assert ctx.attn_heads["FooAttention"] == ("self.num_heads", "config.num_key_value_heads", "self.head_dim")


def _mimo_source(v_head: str, v_bias: str) -> str:
    from porter.convert.source import resolve_source

    src = resolve_source("mimo_v2_flash")[0].read_text()
    assert "num_key_value_heads = config.num_key_value_heads * 2 if is_swa" in src  # kv heads: a local
    i = src.index("self.v_proj = nn.Linear(")
    j = src.index("\n        self.o_proj", i)
    return src[:i] + src[i:j].replace("config.v_head_dim", v_head).replace("bias=config.attention_bias", v_bias) + \
        src[j:].replace("num_attention_heads * config.v_head_dim", f"num_attention_heads * {v_head}", 1)


def test_unfused_attention_takes_its_head_counts_from_its_projections():
    """q/k/v that do not fuse (v without the bias) and are built as `count * self.head_dim` from locals: the
    engine Attention gets those counts (kv heads doubled on sliding layers), not the config's."""
    result = convert_source(_mimo_source("self.head_dim", "bias=False"), "modeling_mimo_v2_flash.py",
                            package="transformers.models.mimo_v2_flash")
    attn = result.code[result.code.index("self.attn = Attention("):]
    assert attn.startswith("self.attn = Attention(\n            num_attention_heads,\n            self.head_dim,")
    assert "num_kv_heads=num_key_value_heads," in attn[:300]


def test_refuses_a_value_head_size_other_than_the_key_head_size():
    msg = refusal(_mimo_source("config.v_head_dim", "bias=False"))
    assert "value head size `config.v_head_dim` is not its key head size `self.head_dim`" in msg
