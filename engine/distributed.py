"""Tensor-parallel group state. One rank (the default) makes every collective a no-op.

Layers read `get_tp_rank()` / `get_tp_world_size()` when they are constructed. Multi-rank runs
initialise torch.distributed (NCCL on CUDA, gloo on CPU) through `init_tensor_parallel`;
`tp_override` lets unit tests build one rank's shard of a layer without a process group.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

_override: tuple[int, int] | None = None


def get_tp_world_size() -> int:
    if _override is not None:
        return _override[1]
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_tp_rank() -> int:
    if _override is not None:
        return _override[0]
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextmanager
def tp_override(rank: int, world_size: int):
    """Construct layers as rank `rank` of `world_size` (collectives stay no-ops): shard tests."""
    global _override
    previous, _override = _override, (rank, world_size)
    try:
        yield
    finally:
        _override = previous


def init_tensor_parallel(
    rank: int, world_size: int, store_host: str, store_port: int, backend: str, timeout_s: float = 600.0
) -> None:
    """Join the tensor-parallel group of `world_size` worker processes (one call per process).

    Rendezvous goes through a TCPStore the executor already serves on `store_host:store_port`, so
    no port has to be guessed free and no rank has to start first.
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def destroy_tensor_parallel() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collectives_live() -> bool:
    return _override is None and get_tp_world_size() > 1


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if not _collectives_live():
        return x
    dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if not _collectives_live():
        return x
    parts = [torch.empty_like(x) for _ in range(get_tp_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str = "value") -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
