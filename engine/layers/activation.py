"""Activations. `*AndMul` take [.., 2d] = [gate | up] (gate first: shard 0 of gate_up_proj) -> [.., d].

On CUDA tensors the `*AndMul` modules run porter's Triton kernel (one launch, fp32 math); the torch
code stays the reference and the CPU path."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from porter.engine.layers.kernel_dispatch import kernel_module, wants_kernel

# None: the Triton kernels for CUDA tensors, torch otherwise. Tests set True (kernels on CPU tensors,
# under TRITON_INTERPRET=1) or False (torch everywhere).
USE_KERNEL: bool | None = None


def _kernel_input(x: torch.Tensor) -> torch.Tensor | None:
    """x laid out for the kernel, or None where the torch path runs."""
    if not wants_kernel(USE_KERNEL, x):
        return None
    return x if x.stride(-1) == 1 else x.contiguous()



class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = _kernel_input(x)
        if xk is not None:
            return kernel_module("activation").silu_and_mul(xk)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GeluAndMul approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = _kernel_input(x)
        if xk is not None:
            return kernel_module("activation").gelu_and_mul(xk, self.approximate)
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


class ActAndMul(nn.Module):
    """`act(gate) * up` over a merged [gate | up] input with HF's own activation module: the exact (unfused)
    path for activations that have no fused kernel."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]


def has_fused_act_and_mul(name: str) -> bool:
    return name in _AND_MUL


def get_act_and_mul_fn(name: str) -> nn.Module:
    """`act(gate) * up` over a merged [gate | up] input for any HF activation name: one fused kernel on
    CUDA for the common gated activations, HF's activation module otherwise (so the choice is made when
    the model is built, from the checkpoint's config, and a converted model need not know it)."""
    if name in _AND_MUL:
        return _AND_MUL[name]()
    return ActAndMul(get_act_fn(name))
