"""ALiBi slopes (Press et al., "Train Short, Test Long"), computed once when a model is built.

The engine's Attention takes per-head slopes and adds `slope * (key_pos - query_pos)` to the scores;
HF files add `slope * key_pos` (equal after softmax, which ignores a per-row constant).
"""
from __future__ import annotations

import math

import torch

from porter.engine.distributed import get_tp_rank, get_tp_world_size


def alibi_slopes(num_heads: int, round_to: torch.dtype | None = None) -> torch.Tensor:
    """[num_heads] fp32: the geometric sequence 2^(-8/n * i) for the largest power of two n <= heads,
    then every other slope of the sequence for 2n heads for the rest. `round_to` rounds the slopes
    through a dtype (files that build their bias from bfloat16 slopes)."""
    n = 2 ** math.floor(math.log2(num_heads))
    # powers of an fp32 base, as the reference implementations compute them (bit-equal slopes)
    base = torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float32, device="cpu")
    out = torch.pow(base, torch.arange(1, n + 1, dtype=torch.int32, device="cpu"))
    extra = min(n, num_heads - n)
    if extra:  # odd powers of the sequence for 2n heads
        base2 = torch.tensor(2.0 ** (-4.0 / n), dtype=torch.float32, device="cpu")
        out = torch.cat([out, torch.pow(base2, torch.arange(1, 2 * extra, 2, dtype=torch.int32, device="cpu"))])
    return out.to(round_to).float() if round_to is not None else out


def alibi_slopes_interleaved(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """[num_heads] fp32, the variant over the next power of two m >= heads: 2^(-max_bias/m * i) for
    i = 1..m, then (when m > heads) the even-i slopes before the odd-i ones, cut to `num_heads`."""
    m = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, m + 1, dtype=torch.int64, device="cpu").float() * (max_bias / m)
    slopes = 1.0 / torch.pow(2, base)
    if m != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def local_heads(per_head: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's slice of a per-head tensor (heads split evenly over the ranks)."""
    return per_head.chunk(get_tp_world_size())[get_tp_rank()]
