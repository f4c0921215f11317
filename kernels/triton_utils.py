"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import functools
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


# Programmatic dependent launch (Hopper and later). A kernel launched with `**pdl_launch(device)` may
# start while the kernel before it in the stream still runs, as soon as that one calls
# `let_next_start()`; it must call `wait_for_previous()` before it reads anything an earlier kernel
# wrote, and before it writes anything. Only constant data (weights) may be read before the wait, which
# is the point: a GEMV streams its weight slab while the norm before it finishes, and the launch gap
# between dependent kernels disappears. Both calls are no-ops in a kernel launched without PDL.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: kernels are never launched with PDL
    gdc_launch_dependents = gdc_wait = None
_HAS_GDC = not INTERPRETED and gdc_wait is not None
_PDL = tl.constexpr(_HAS_GDC)


@triton.jit
def wait_for_previous():
    if _PDL:
        gdc_wait()


@triton.jit
def let_next_start():
    if _PDL:
        gdc_launch_dependents()


@functools.cache
def _pdl_on(device_index: int) -> bool:
    if not _HAS_GDC or os.environ.get("PORTER_PDL", "1") == "0":
        return False
    from triton.backends.nvidia.compiler import CUDAOptions
    return ("launch_pdl" in CUDAOptions.__dataclass_fields__
            and torch.cuda.get_device_capability(device_index)[0] >= 9)


def pdl_launch(device: torch.device) -> dict:
    """Launch options for a kernel that calls wait_for_previous() before touching its inputs."""
    return {"launch_pdl": True} if device.type == "cuda" and _pdl_on(device.index or 0) else {}
