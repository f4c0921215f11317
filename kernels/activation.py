"""Gated activations on x [..., 2*I] = [gate | up] -> act(gate) * up, computed in fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from porter.kernels.triton_utils import INTERPRETED, let_next_start, pdl_launch, tanh, wait_for_previous

_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, ACT: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    wait_for_previous()
    let_next_start()
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        g = a * tl.sigmoid(a)
    elif ACT == 1:
        g = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        g = 0.5 * a * (1.0 + tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
    tl.store(out_ptr + row * stride_o + cols, (g * b).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"{act}_and_mul: last dim must be even and contiguous, got {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    block = 128 if INTERPRETED else 1024
    if x2.shape[0]:
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, ACT=_ACTS[act], BLOCK=block,
            num_warps=1 if INTERPRETED else 4, **pdl_launch(x.device),
        )
    return out.view(x.shape[:-1] + (inter,))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(x, "silu")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """approximate: "none" (erf) or "tanh", as torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_and_mul: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act_and_mul(x, "gelu" if approximate == "none" else "gelu_tanh")
