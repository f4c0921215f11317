"""Tensor-parallel linear layers (vLLM's API shape).

Weights are stored `[out, in]` per rank. Every parameter carries `weight_loader(param, loaded_weight,
shard_id=None)` that takes the FULL checkpoint tensor and copies this rank's slice, so a model's
`load_weights` never needs to know the TP layout. With one rank every layer is a plain linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from porter.engine.distributed import (
    divide,
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from porter.engine.layers.kernel_dispatch import kernel_module, wants_kernel
from porter.engine.weight_utils import WeightShapeError, check_shape

# see porter.engine.layers.kernel_dispatch
USE_KERNEL: bool | None = None
GEMV_MAX_ROWS = 4
GEMV_SHORT_K = 1024  # inputs this narrow take the GEMV up to GEMV_SHORT_K_MAX_ROWS rows
GEMV_SHORT_K_MAX_ROWS = 2
GEMV_WIDE = 65536  # an output this wide (an LM head) goes to cuBLAS past one row


def _gemv_wins(rows: int, out_features: int, in_features: int) -> bool:
    """Where porter's GEMV kernel beats cuBLAS (benchmarks/bench_gemv.py on an H200): one row always; up to
    4 rows for layer-sized outputs with K > 1024, 2 with shorter K (at 4 rows cuBLAS ties or wins there:
    qkv 5.7 vs 5.6 us, gate_up 6.6 vs 8.0); past one row an LM head's 150k columns favour cuBLAS."""
    if rows <= 1:
        return True
    if out_features >= GEMV_WIDE:
        return False
    return rows <= (GEMV_MAX_ROWS if in_features > GEMV_SHORT_K else GEMV_SHORT_K_MAX_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with decode-sized inputs (a few rows) on porter's bandwidth-bound GEMV kernel."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if _gemv_wins(rows, *weight.shape) and weight.stride(-1) == 1 and wants_kernel(USE_KERNEL, x, weight):
        return kernel_module("gemv").gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def make_param(shape, dtype, name: str, loader, **attrs) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.param_name = name  # names the parameter in shape-mismatch errors
    p.weight_loader = loader
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = True, skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None, prefix: str = "", *, return_bias: bool = True,
                 disable_tp: bool = False):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add, self.return_bias, self.prefix = skip_bias_add, return_bias, prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_rank = 0 if disable_tp else get_tp_rank()
        self.tp_size = 1 if disable_tp else get_tp_world_size()

    def _name(self, what: str) -> str:
        return f"{self.prefix}.{what}" if self.prefix else what

    def _finish(self, out: torch.Tensor, bias: torch.Tensor | None):
        if not self.return_bias:
            return out
        return out, (bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp_rank}/{self.tp_size}"


class ReplicatedLinear(LinearBase):
    """The full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, skip_bias_add: bool = False,
                 params_dtype: torch.dtype | None = None, prefix: str = "", *, return_bias: bool = True,
                 disable_tp: bool = False):
        super().__init__(input_size, output_size, bias, skip_bias_add, params_dtype, prefix,
                         return_bias=return_bias, disable_tp=disable_tp)
        self.weight = make_param((output_size, input_size), self.params_dtype, self._name("weight"),
                                 self.weight_loader)
        self.bias = (make_param((output_size,), self.params_dtype, self._name("bias"), self.weight_loader)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{param.param_name}: ReplicatedLinear takes no shard id (got {shard_id!r})")
        check_shape(param.param_name, param.shape, loaded_weight)
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor):
        bias = None if self.skip_bias_add else self.bias
        return self._finish(linear(x, self.weight, bias), self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = XA with A split along its output dim: rank r holds output rows [r*n/tp, (r+1)*n/tp)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 skip_bias_add: bool = False, params_dtype: torch.dtype | None = None, prefix: str = "", *,
                 return_bias: bool = True, disable_tp: bool = False, output_sizes: list[int] | None = None):
        super().__init__(input_size, output_size, bias, skip_bias_add, params_dtype, prefix,
                         return_bias=return_bias, disable_tp=disable_tp)
        self.gather_output = gather_output
        # logical outputs fused into this layer (one for a plain column layer)
        self.output_sizes = list(output_sizes or [output_size])
        self.output_partition_sizes = [divide(n, self.tp_size, f"{prefix or 'layer'} output size")
                                       for n in self.output_sizes]
        self.output_size_per_partition = sum(self.output_partition_sizes)
        self._create_params(bias)

    def _create_params(self, bias: bool) -> None:
        out = self.output_size_per_partition
        self.weight = make_param((out, self.input_size), self.params_dtype, self._name("weight"),
                                 self.weight_loader, output_dim=0, input_dim=1)
        self.bias = (make_param((out,), self.params_dtype, self._name("bias"), self.weight_loader, output_dim=0)
                     if bias else None)

    def _load_rows(self, param, loaded_weight, dst_offset: int, size: int, src_start: int,
                   full_rows: int, what: str) -> None:
        """Copy loaded_weight[src_start:src_start+size] into param rows [dst_offset, dst_offset+size)."""
        expected = (full_rows, *param.shape[1:])
        check_shape(param.param_name, expected, loaded_weight, what)
        param.data.narrow(0, dst_offset, size).copy_(loaded_weight.narrow(0, src_start, size))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{param.param_name}: ColumnParallelLinear takes no shard id (got {shard_id!r})")
        size = self.output_size_per_partition
        self._load_rows(param, loaded_weight, 0, size, self.tp_rank * size, self.output_size, "full weight")

    def forward(self, x: torch.Tensor):
        bias = None if self.skip_bias_add else self.bias
        out = linear(x, self.weight, bias)
        if self.gather_output and self.tp_size > 1:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        return self._finish(out, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size_per_partition} (of {self.output_size}), tp={self.tp_rank}/{self.tp_size}"


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers sharing one input, fused (gate_up_proj). Rank r holds [out0_r | out1_r | ...],
    each logical output's own rank slice, so SiluAndMul sees [gate, up] halves on every rank.
    Shard ids: int i (checkpoint holds logical output i), a tuple of consecutive ints (several), or
    None (the checkpoint is already fused)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True, gather_output: bool = False,
                 skip_bias_add: bool = False, params_dtype: torch.dtype | None = None, prefix: str = "", *,
                 return_bias: bool = True, disable_tp: bool = False):
        super().__init__(input_size, sum(output_sizes), bias, gather_output, skip_bias_add, params_dtype, prefix,
                         return_bias=return_bias, disable_tp=disable_tp, output_sizes=output_sizes)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        n = len(self.output_sizes)
        if shard_id is None:
            shard_id = tuple(range(n))
        ids = (shard_id,) if isinstance(shard_id, int) else tuple(shard_id)
        if not ids or any(not isinstance(i, int) or not 0 <= i < n for i in ids) or \
                list(ids) != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"{param.param_name}: invalid shard id {shard_id!r}; expected an int in 0..{n - 1}, "
                             "a tuple of consecutive ints, or None for an already fused tensor")
        rows = [self.output_sizes[i] for i in ids]
        check_shape(param.param_name, (sum(rows), *param.shape[1:]), loaded_weight,
                    f"shard {shard_id!r} of output sizes {self.output_sizes}")
        src = 0
        for i, full in zip(ids, rows):
            size = self.output_partition_sizes[i]
            dst = sum(self.output_partition_sizes[:i])
            part = loaded_weight.narrow(0, src, full)
            param.data.narrow(0, dst, size).copy_(part.narrow(0, self.tp_rank * size, size))
            src += full


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection sharded by heads. Rank r holds [q_r | k_r | v_r]. When tp > num_kv_heads
    each rank keeps one kv head and consecutive ranks replicate it (rank r takes kv head r // (tp/kv))."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int | None = None,
                 bias: bool = True, skip_bias_add: bool = False, params_dtype: torch.dtype | None = None,
                 prefix: str = "", *, return_bias: bool = True, disable_tp: bool = False,
                 v_head_size: int | None = None):
        tp = 1 if disable_tp else get_tp_world_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.hidden_size, self.head_size = hidden_size, head_size
        self.v_head_size = v_head_size or head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp, f"{prefix or 'qkv'} number of attention heads")
        if tp >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp, total_num_kv_heads,
                                               f"tensor-parallel size vs kv heads of {prefix or 'qkv'}; kv heads")
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp, f"{prefix or 'qkv'} number of kv heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        self.v_size = self.num_kv_heads * self.v_head_size
        # output_sizes are "global" sizes whose tp-th part is the rank's slice (kv replicated: tp * local)
        super().__init__(hidden_size, (self.q_size + self.kv_size + self.v_size) * tp, bias, False, skip_bias_add,
                         params_dtype, prefix, return_bias=return_bias, disable_tp=disable_tp,
                         output_sizes=[self.q_size * tp, self.kv_size * tp, self.v_size * tp])

    def _shard(self, shard_id: str) -> tuple[int, int, int, int]:
        """(dst offset, rank size, source start, full checkpoint rows) of one of q/k/v."""
        if shard_id == "q":
            return 0, self.q_size, self.tp_rank * self.q_size, self.total_num_heads * self.head_size
        head_rank = self.tp_rank // self.num_kv_head_replicas
        if shard_id == "k":
            return (self.q_size, self.kv_size, head_rank * self.kv_size,
                    self.total_num_kv_heads * self.head_size)
        if shard_id == "v":
            return (self.q_size + self.kv_size, self.v_size, head_rank * self.v_size,
                    self.total_num_kv_heads * self.v_head_size)
        raise ValueError(f"invalid shard id {shard_id!r} for a QKV layer; expected 'q', 'k', 'v' or None")

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # checkpoint stores a fused, contiguous [Q | K | V]
            sizes = [self._shard(s)[3] for s in "qkv"]
            check_shape(param.param_name, (sum(sizes), *param.shape[1:]), loaded_weight, "fused [q|k|v]")
            for s, part in zip("qkv", loaded_weight.split(sizes, dim=0)):
                self.weight_loader(param, part, s)
            return
        try:
            dst, size, src, full = self._shard(shard_id)
        except ValueError as e:
            raise ValueError(f"{param.param_name}: {e}") from None
        self._load_rows(param, loaded_weight, dst, size, src, full, f"shard {shard_id!r}")


class RowParallelLinear(LinearBase):
    """Y = XA with A split along its input dim; partial outputs are all-reduced. The bias is not
    sharded and is added on rank 0 only, so the reduction adds it once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 skip_bias_add: bool = False, params_dtype: torch.dtype | None = None, reduce_results: bool = True,
                 prefix: str = "", *, return_bias: bool = True, disable_tp: bool = False):
        super().__init__(input_size, output_size, bias, skip_bias_add, params_dtype, prefix,
                         return_bias=return_bias, disable_tp=disable_tp)
        self.input_is_parallel, self.reduce_results = input_is_parallel, reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size, f"{prefix or 'layer'} input size")
        if bias and not reduce_results and not skip_bias_add and self.tp_size > 1:
            raise ValueError(f"{prefix}: reduce_results=False with a bias needs skip_bias_add=True "
                             "(the bias would be added once per rank)")
        self.weight = make_param((output_size, self.input_size_per_partition), self.params_dtype, self._name("weight"),
                                 self.weight_loader, input_dim=1, output_dim=0)
        self.bias = (make_param((output_size,), self.params_dtype, self._name("bias"), self.weight_loader)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{param.param_name}: RowParallelLinear takes no shard id (got {shard_id!r})")
        if getattr(param, "input_dim", None) is None:  # bias: replicated
            check_shape(param.param_name, param.shape, loaded_weight)
            param.data.copy_(loaded_weight)
            return
        size = self.input_size_per_partition
        check_shape(param.param_name, (self.output_size, self.input_size), loaded_weight, "full weight")
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.narrow(-1, self.tp_rank * self.input_size_per_partition, self.input_size_per_partition)
        add_bias = self.bias is not None and not self.skip_bias_add and self.tp_rank == 0
        out = linear(x, self.weight, self.bias if add_bias else None)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return self._finish(out, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size_per_partition} (of {self.input_size}), out={self.output_size}, tp={self.tp_rank}/{self.tp_size}"


__all__ = ["ColumnParallelLinear", "LinearBase", "MergedColumnParallelLinear", "QKVParallelLinear",
           "ReplicatedLinear", "RowParallelLinear", "WeightShapeError", "linear"]
