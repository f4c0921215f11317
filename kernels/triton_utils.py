"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16/fp16 wrongly unless loads are cast to fp32 straight away, and it is
# slow per tile, so kernels use small tiles and fp32 math when interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel may read


@triton.jit
def tanh(x):
    # tl.math has no tanh on every Triton version we support; exp of -2|x| never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(dtype) -> str:
    """fp32 inputs get exact fp32 dots (Triton's default for them is tf32, ~1e-3 off)."""
    return "ieee" if dtype == torch.float32 else "tf32"
