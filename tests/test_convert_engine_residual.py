"""engine_residual pass: the HF residual-add-then-norm statements become the engine RMSNorm's fused
residual call, where that is exactly equivalent; anything else is left as written."""
from __future__ import annotations

import pytest
import torch

from porter.convert.engine_residual import engine_residual

from convert_pass_helpers import run_pass

LAYER = '''import torch
from torch import nn

from porter.engine.layers.layernorm import RMSNorm


class MyLayer(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps=1e-6)
        self.mlp_norm = RMSNorm(hidden, eps=1e-6)
        self.other = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.attn_norm(hidden_states)
        hidden_states = self.proj(hidden_states)
        hidden_states = ADD
        # Fully Connected
        residual = hidden_states
        hidden_states = self.mlp_norm(hidden_states)
        hidden_states = self.proj(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
'''
FUSED = '''        # Fully Connected
        hidden_states, residual = self.mlp_norm(hidden_states, residual)
'''


@pytest.mark.parametrize("add", ["residual + hidden_states", "hidden_states + residual"])
def test_add_copy_norm_becomes_the_fused_call(add):
    out, notes = run_pass(engine_residual, LAYER.replace("ADD", add))
    assert FUSED in out and "residual = hidden_states\n        hidden_states = self.mlp_norm" not in out
    assert out.count("residual + hidden_states") == 1  # the layer's last add has no norm after it: kept
    assert notes == ["MyLayer: `hidden_states = residual + hidden_states; residual = hidden_states; "
                     "hidden_states = self.mlp_norm(hidden_states)` -> fused residual add + norm "
                     "`self.mlp_norm(hidden_states, residual)`"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_code_computes_bit_identical_values(dtype):
    src = LAYER.replace("ADD", "residual + hidden_states")
    fused, _ = run_pass(engine_residual, src)
    outs = []
    for text in (src, fused):
        scope = {}
        exec(compile(text, "m.py", "exec"), scope)
        torch.manual_seed(0)
        layer = scope["MyLayer"](16).to(dtype)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
            outs.append(layer(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("edit", [
    ("self.mlp_norm(hidden_states)\n", "self.other(hidden_states)\n"),  # not the engine RMSNorm
    ("        residual = hidden_states\n        hidden_states = self.mlp_norm",
     "        residual = hidden_states\n        hidden_states = hidden_states * 2\n        hidden_states = self.mlp_norm"),
    ("        residual = hidden_states\n        hidden_states = self.mlp_norm",
     "        residual = hidden_states.clone()\n        hidden_states = self.mlp_norm"),
    ("self.mlp_norm(hidden_states)\n", "self.mlp_norm(residual)\n"),
    ("self.mlp_norm(hidden_states)\n", "self.mlp_norm(hidden_states, None)\n"),
    ("hidden_states = ADD", "hidden_states = residual - hidden_states"),
    ("from porter.engine.layers.layernorm import RMSNorm", "from mylib import RMSNorm"),
])
def test_anything_else_is_left_as_written(edit):
    src = LAYER.replace(*edit).replace("ADD", "residual + hidden_states")
    out, notes = run_pass(engine_residual, src)
    assert out == src and notes == []
