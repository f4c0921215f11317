"""A model's own parameter split over the tensor-parallel ranks along one dim.

Converted blocks keep HF parameters that scale a column-parallel output per head or per channel
(`q * self.head_scale.repeat_interleave(head_dim)`, attention sinks): each rank holds the slice that
matches its heads, and its weight loader narrows the FULL checkpoint tensor to that slice, as the
parallel linear layers do.
"""
from __future__ import annotations

import torch
from torch import nn

from porter.engine.distributed import divide, get_tp_rank, get_tp_world_size
from porter.engine.weight_utils import check_shape


def shard_parameter(param: nn.Parameter, dim: int, name: str = "parameter") -> nn.Parameter:
    """This rank's contiguous slice of `param` along `dim` (rank r of N holds [r*n/N, (r+1)*n/N)), as a
    parameter whose `weight_loader(param, full)` copies the same slice of a full checkpoint tensor."""
    tp, rank = get_tp_world_size(), get_tp_rank()
    full_shape = tuple(param.shape)
    size = divide(full_shape[dim], tp, f"{name} dim {dim}")
    local = nn.Parameter(param.data.narrow(dim, rank * size, size).clone(), requires_grad=False)

    def weight_loader(p: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{name}: a rank-sharded parameter takes no shard id (got {shard_id!r})")
        check_shape(name, full_shape, loaded_weight, f"full tensor, split over {tp} ranks along dim {dim}")
        p.data.copy_(loaded_weight.narrow(dim, rank * size, size))

    local.weight_loader = weight_loader
    local.shard_dim = dim
    return local
