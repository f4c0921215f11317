"""residual_stream pass: pre-norm decoder layers return (h, residual) and the add between two layers
runs inside the next layer's fused norm; the model's loop and final norm follow. Anything not of that
exact shape is left as written."""
from __future__ import annotations

import pytest
import torch

from porter.convert.residual_stream import residual_stream

from convert_pass_helpers import run_pass

MODEL = '''import torch
from torch import nn

from porter.engine.layers.layernorm import RMSNorm


class MyLayer(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.input_norm = RMSNorm(hidden, eps=1e-6)
        self.post_norm = RMSNorm(hidden, eps=1e-6)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.res = 1.0  # an attribute named like the layer's residual local: not renamed with it

    def forward(
        self,
        hidden_states: torch.Tensor,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """One layer."""
        res = hidden_states
        hidden_states = self.input_norm(hidden_states)
        hidden_states = self.proj(hidden_states) * scale * self.res
        hidden_states, res = self.post_norm(hidden_states, res)
        hidden_states = self.mlp(hidden_states)
        hidden_states = res + hidden_states
        return hidden_states


class MyModel(nn.Module):
    def __init__(self, hidden, layers):
        super().__init__()
        self.embed = nn.Embedding(10, hidden)
        self.layers = nn.ModuleList([MyLayer(hidden) for _ in range(layers)])
        self.norm = RMSNorm(hidden, eps=1e-6)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers[:3]):
            h = layer(h, scale=0.5)
        h = self.norm(h)
        return h
'''

THREADED_LAYER = '''    def forward(
        self,
        hidden_states: torch.Tensor,
        scale: float = 1.0,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_norm(hidden_states)
        else:
            hidden_states, residual = self.input_norm(hidden_states, residual)
        hidden_states = self.proj(hidden_states) * scale * self.res
        hidden_states, residual = self.post_norm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual
'''

THREADED_LOOP = '''        h = self.embed(input_ids)
        residual = None
        for i, layer in enumerate(self.layers[:3]):
            h, residual = layer(h, scale=0.5, residual=residual)
        h, _ = self.norm(h, residual)
        return h
'''


def test_layers_and_loop_thread_the_residual():
    out, notes = run_pass(residual_stream, MODEL)
    assert THREADED_LAYER in out and THREADED_LOOP in out
    assert notes == ["MyLayer: the residual add moves into the next layer's `input_norm` (layers return "
                     "(h, residual); MyModel ends with `self.norm(h, residual)`)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_model_computes_bit_identical_values(dtype):
    threaded, _ = run_pass(residual_stream, MODEL)
    outs = []
    for text in (MODEL, threaded):
        scope = {}
        exec(compile(text, "m.py", "exec"), scope)
        torch.manual_seed(0)
        model = scope["MyModel"](16, 3).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
            outs.append(model(torch.tensor([1, 4, 7, 2])))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("edit", [
    # the layer
    ("        hidden_states = res + hidden_states\n        return hidden_states",
     "        hidden_states = res + hidden_states * 2\n        return hidden_states"),  # not a plain add
    ("        hidden_states = res + hidden_states\n        return hidden_states",
     "        hidden_states = res + hidden_states\n        return hidden_states, res"),
    ("        res = hidden_states\n        hidden_states = self.input_norm(hidden_states)",
     "        hidden_states = self.input_norm(hidden_states)\n        res = hidden_states"),  # post-norm
    ("        hidden_states = self.input_norm(hidden_states)\n",
     "        hidden_states = self.mlp(hidden_states)\n"),  # no norm at the start
    ("        self.input_norm = RMSNorm(hidden, eps=1e-6)", "        self.input_norm = nn.LayerNorm(hidden)"),
    ("        hidden_states = self.proj(hidden_states) * scale * self.res\n",
     "        residual = 3\n        hidden_states = self.proj(hidden_states) * scale * self.res\n"),  # name taken
    # the model
    ("            h = layer(h, scale=0.5)\n", "            h = layer(h, scale=0.5)\n            h = h * 2\n"),
    ("        h = self.norm(h)\n", "        h = h * 2\n"),  # no final norm
    ("        h = self.norm(h)\n        return h", "        out = self.norm(h)\n        return out"),
    ("        self.norm = RMSNorm(hidden, eps=1e-6)", "        self.norm = nn.LayerNorm(hidden)"),
    ("        h = self.embed(input_ids)\n", "        h = self.embed(input_ids)\n        residual = h\n"),
    ("        self.norm = RMSNorm(hidden, eps=1e-6)",
     "        self.norm = RMSNorm(hidden, eps=1e-6)\n        self.extra = MyLayer(hidden)"),  # built twice
])
def test_anything_else_is_left_as_written(edit):
    assert edit[0] in MODEL
    src = MODEL.replace(*edit)
    out, notes = run_pass(residual_stream, src)
    assert out == src and notes == []
