"""When a layer runs porter's Triton kernel instead of its torch path (the reference and the CPU path).

Each layer module keeps its own `USE_KERNEL` switch: None picks the kernel for CUDA tensors and torch
otherwise; tests set True (the kernel on CPU tensors under TRITON_INTERPRET=1) or False (torch everywhere).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def wants_kernel(switch: bool | None, *tensors: torch.Tensor) -> bool:
    on = tensors[0].is_cuda if switch is None else switch
    if not on or any(t.dtype not in KERNEL_DTYPES for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # kernels have no backward


def kernel_module(name: str) -> ModuleType:
    """porter.kernels.<name>, imported on first use so the CPU path never needs triton."""
    return importlib.import_module(f"porter.kernels.{name}")
