"""engine_activation: a converted gated MLP's `self.act_fn(gate) * up` becomes the engine's fused
act-and-mul on gate_up (fused kernel where the engine has one, HF's activation otherwise, chosen at build
time); look-alikes and other uses keep HF's code, noted. The swapped MLP equals HF's."""
import pytest
import torch

from porter.convert.engine_activation import engine_activation
from porter.engine.config import EngineConfig, set_current_engine_config

from convert_pass_helpers import run_pass

HEAD = '''import torch
from torch import nn

from transformers.activations import ACT2FN

from porter.engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear


'''

MLP = '''class MyMLP(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size, config.intermediate_size],
            bias=False,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = ACT2FN[KEY]

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.split(self.gate_up_proj.output_partition_sizes, dim=-1)
        down_proj, _ = self.down_proj(self.act_fn(gate) * up)
        return down_proj
'''

SWAPPED_HEAD = HEAD.replace("from transformers.activations import ACT2FN\n\n", "").replace(
    "from porter.engine.layers.linear", "from porter.engine.layers.activation import get_act_and_mul_fn\n"
                                        "from porter.engine.layers.linear")


def run(source: str, filename: str = "m.py"):
    return run_pass(engine_activation, source, filename)


def swapped(key: str) -> str:
    return SWAPPED_HEAD + MLP.replace("self.act_fn = ACT2FN[KEY]", f"self.act_and_mul = get_act_and_mul_fn({key})") \
        .replace("        gate, up = gate_up.split(self.gate_up_proj.output_partition_sizes, dim=-1)\n", "") \
        .replace("self.act_fn(gate) * up", "self.act_and_mul(gate_up)")


def model_dir(tmp_path, annotation: str):
    (tmp_path / "configuration_my.py").write_text(
        f"from typing import Literal\n\n\nclass MyConfig:\n    hidden_act: {annotation} = 'silu'\n")
    return str(tmp_path / "modeling_my.py")


def test_literal_key_with_a_kernel_is_swapped():
    out, notes = run(HEAD + MLP.replace("KEY", '"silu"'))
    assert out == swapped('"silu"')
    assert notes == ['MyMLP: `self.act_fn(gate) * up` -> engine get_act_and_mul_fn("silu") on gate_up']


def test_chunk_form_is_swapped_too():
    src = HEAD + MLP.replace("KEY", '"gelu"').replace("split(self.gate_up_proj.output_partition_sizes, dim=-1)",
                                                       "chunk(2, dim=-1)")
    out, _ = run(src)
    assert "self.act_and_mul(gate_up)" in out and "chunk" not in out


def test_config_field_typed_literal_of_fused_names_is_swapped(tmp_path):
    out, _ = run(HEAD + MLP.replace("KEY", "config.hidden_act"),
                 model_dir(tmp_path, 'Literal["silu", "gelu_pytorch_tanh"]'))
    assert out == swapped("config.hidden_act")


@pytest.mark.parametrize("annotation", ["str", 'Literal["silu", "relu"]'])
def test_config_field_activation_is_swapped_whatever_it_allows(tmp_path, annotation):
    # get_act_and_mul_fn takes any HF activation name (fused where a kernel exists): no value check needed
    out, notes = run(HEAD + MLP.replace("KEY", "config.hidden_act"), model_dir(tmp_path, annotation))
    assert out == swapped("config.hidden_act") and notes[0].endswith("get_act_and_mul_fn(config.hidden_act) on gate_up")


@pytest.mark.parametrize("edit, why", [
    (('"silu"', '"no_such_act"'), "is not one HF's ACT2FN knows"),
    (("[config.intermediate_size, config.intermediate_size]", "[config.intermediate_size, 2 * config.hidden_size]"),
     "not the same expression"),
    (("return down_proj", "return down_proj + self.act_fn(x)"), "used elsewhere"),
    (('prefix=f"{prefix}.down_proj")', 'prefix=f"{prefix}.down_proj")\n        self.act_and_mul = None'),
     "already has an attribute `act_and_mul`"),
])
def test_look_alikes_are_kept_and_noted(edit, why):
    src = HEAD + MLP.replace("KEY", '"silu"').replace(*edit)
    out, notes = run(src)
    assert out == src
    assert len(notes) == 1 and why in notes[0]


@pytest.mark.parametrize("edit", [
    ("self.act_fn(gate) * up", "up * self.act_fn(gate)"),  # not the `act(gate) * up` idiom as written
    ("self.act_fn(gate) * up", "self.act_fn(up) * gate"),  # gate and up swapped
    ("return down_proj", "return down_proj + gate.sum()"),  # gate used again
    ("gate_up.split(", "x.split("),  # not the projection's output
])
def test_other_dataflow_is_left_alone_silently(edit):
    src = HEAD + MLP.replace("KEY", '"silu"').replace(*edit)
    out, notes = run(src)
    assert out == src and notes == []


def test_act_fn_read_from_outside_keeps_it():
    src = HEAD + MLP.replace("KEY", '"silu"') + "\n\ndef act_of(mlp):\n    return mlp.act_fn\n"
    out, notes = run(src)
    assert out == src and "read from outside" in notes[0]


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_swapped_mlp_equals_the_hf_form_bit_for_bit_on_cpu(act, tmp_path):
    from types import SimpleNamespace

    hf_src, engine_src = HEAD + MLP.replace("KEY", f'"{act}"'), swapped(f'"{act}"')
    config = SimpleNamespace(hidden_size=32, intermediate_size=48)
    mlps = []
    for i, src in enumerate((hf_src, engine_src)):
        path = tmp_path / f"m{i}.py"
        path.write_text(src)
        ns: dict = {}
        exec(compile(src, str(path), "exec"), ns)  # our own generated test module, not a checkpoint
        with set_current_engine_config(EngineConfig(hf_config=None)):
            torch.manual_seed(0)
            mlps.append(ns["MyMLP"](config, prefix="mlp"))
    state = {k: torch.randn_like(v) * 0.3 for k, v in mlps[0].state_dict().items()}
    for m in mlps:
        m.load_state_dict(state)
    x = torch.randn(7, 32)
    with torch.no_grad():
        assert torch.equal(mlps[0](x), mlps[1](x))


def test_converted_qwen3_mlp_uses_the_engine_act_and_mul():
    from porter.convert import convert_file
    from porter.convert.source import resolve_source

    result = convert_file(resolve_source("qwen3")[0], model_type="qwen3")
    assert "self.act_and_mul = get_act_and_mul_fn(config.hidden_act)" in result.code
    assert "self.act_and_mul(gate_up)" in result.code and "self.act_fn(gate) * up" not in result.code
