"""Activations. `*AndMul` take [.., 2d] = [gate | up] (gate first: shard 0 of gate_up_proj) -> [.., d]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluAndMul approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def get_act_fn(name: str) -> nn.Module:
    """The activation module HF uses for `hidden_act` = name (transformers' ACT2FN table)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACT2FN))}")
    return ACT2FN[name]


_AND_MUL = {
    "silu": SiluAndMul, "swish": SiluAndMul,
    "gelu": lambda: GeluAndMul("none"),
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"), "gelu_new": lambda: GeluAndMul("tanh"),
    "gelu_fast": lambda: GeluAndMul("tanh"),
}


def get_act_and_mul_fn(name: str) -> nn.Module:
    """Fused `act(gate) * up` over a merged [gate | up] input, for the gated MLP activations."""
    if name not in _AND_MUL:
        raise ValueError(f"no fused act-and-mul for {name!r}; known: {', '.join(sorted(_AND_MUL))}")
    return _AND_MUL[name]()
