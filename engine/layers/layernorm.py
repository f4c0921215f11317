"""RMSNorm with vLLM's fused residual form: norm(x, residual) -> (normed(x + residual), x + residual).

Math follows HF: the residual add happens in the input dtype (as HF's `residual + hidden_states`),
the normalisation in fp32. `unit_offset=True` is the Gemma form: weight stored as w, applied as
(1 + w) in fp32 before the cast (weights initialise to zero then).

On CUDA tensors the weighted, non-offset form runs porter's Triton kernel (one launch instead of ~6
torch ops); the torch code below stays the reference and the CPU path. The Gemma offset form keeps the
torch path (the kernel rounds the normalised value before the weight, not the offset form's
numerics), as does the weightless form (no weight tensor to hand the kernel)."""
from __future__ import annotations

import torch
from torch import nn

from porter.engine.layers.kernel_dispatch import kernel_module, wants_kernel
from porter.engine.layers.linear import make_param
from porter.engine.weight_utils import default_weight_loader

# see porter.engine.layers.kernel_dispatch
USE_KERNEL: bool | None = None



class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, *, unit_offset: bool = False,
                 has_weight: bool = True, dtype: torch.dtype | None = None, prefix: str = ""):
        super().__init__()
        self.hidden_size, self.eps, self.unit_offset = hidden_size, eps, unit_offset
        self.weight = None
        if has_weight:
            self.weight = make_param((hidden_size,), dtype or torch.get_default_dtype(),
                                     f"{prefix}.weight" if prefix else "weight", default_weight_loader)
            with torch.no_grad():
                self.weight.fill_(0.0 if unit_offset else 1.0)  # identity norm until loaded

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return h.to(dtype)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)

    def _use_kernel(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        if self.weight is None or self.unit_offset or not wants_kernel(USE_KERNEL, x):
            return False
        # the kernel adds same-shape, same-dtype residuals only (torch broadcasts and promotes)
        return residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self._use_kernel(x, residual):
            ops = kernel_module("rmsnorm")
            x = x if x.stride(-1) == 1 else x.contiguous()  # 3-D per-head views reshape to rows inside
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            residual = residual if residual.stride(-1) == 1 else residual.contiguous()
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (", unit_offset" if self.unit_offset else "")


class GemmaRMSNorm(RMSNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-6, prefix: str = ""):
        super().__init__(hidden_size, eps, unit_offset=True, prefix=prefix)
