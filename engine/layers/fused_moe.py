"""FusedMoE: the routed experts of a mixture-of-experts block, with stacked expert weights.

Shaped like vLLM's FusedMoE so converted models read the same:
- parameters `w13_weight [E, 2*I_local, H]` (gate rows, then up rows) and `w2_weight [E, H, I_local]`;
  tensor parallelism shards the intermediate dim I over the ranks and all-reduces the output;
- `forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]` routes with softmax (or sigmoid)
  top-k, optionally grouped (DeepSeek) and renormalised; precomputed `topk_weights`/`topk_ids` or a
  `custom_routing_function` cover other routers;
- `weight_loader(param, loaded_weight, weight_name, shard_id, expert_id)` takes one expert's 2-D
  checkpoint tensor (shard_id "w1" gate, "w3" up, "w2" down) or, with expert_id=None, all experts
  stacked in 3-D (also "w13": transformers 5's in-memory `gate_up_proj [E, 2I, H]`).
Shared experts and the router's linear stay in the model: they are ordinary dense layers.
On CUDA the experts run as a Triton grouped GEMM (kernels/moe.py); elsewhere a torch loop.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from porter.engine.distributed import divide, get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce
from porter.kernels.moe_reference import ACTIVATIONS, moe_reference

RoutingFunction = Callable[[torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]
_BACKENDS = ("torch", "triton")


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
               scoring_func: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token: (weights fp32 [T, K], ids int32 [T, K])."""
    scores = _score(router_logits, scoring_func)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def grouped_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool, num_expert_group: int,
                 topk_group: int, scoring_func: str = "softmax",
                 e_score_correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing: keep the `topk_group` best of `num_expert_group` expert groups, top-k inside them.

    A group scores as its best expert, or with a correction bias (DeepSeek-V3) as the sum of its two
    best biased scores; the bias steers the choice only, the weights are the unbiased scores.
    """
    num_tokens, num_experts = router_logits.shape
    per_group = divide(num_experts, num_expert_group, "number of experts")
    scores = _score(router_logits, scoring_func)
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    grouped = choice.view(num_tokens, num_expert_group, per_group)
    if e_score_correction_bias is None:
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    group_idx = torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids.to(torch.int32)


def _score(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func == "softmax":
        return torch.softmax(router_logits.float(), dim=-1)
    if scoring_func == "sigmoid":
        return torch.sigmoid(router_logits.float())
    raise ValueError(f"unsupported scoring_func {scoring_func!r}; expected 'softmax' or 'sigmoid'")


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        renormalize: bool = True,
        activation: str = "silu",
        prefix: str = "",
        *,
        use_grouped_topk: bool = False,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        e_score_correction_bias: torch.Tensor | None = None,
        custom_routing_function: RoutingFunction | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported MoE activation {activation!r}; expected one of {ACTIVATIONS}")
        if use_grouped_topk and (num_expert_group is None or topk_group is None):
            raise ValueError("use_grouped_topk needs num_expert_group and topk_group")
        if backend not in (None, *_BACKENDS):
            raise ValueError(f"unknown MoE backend {backend!r}; expected one of {_BACKENDS} or None (auto)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_world_size()
        self.intermediate_size = intermediate_size
        self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size, "MoE intermediate size")
        self.reduce_results = reduce_results
        self.renormalize = renormalize
        self.activation = activation
        self.prefix = prefix
        self.use_grouped_topk = use_grouped_topk
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        # The bias is the router's parameter (loaded under the router's name): hold it without
        # registering it here, or it would appear twice in the state dict.
        self.__dict__["e_score_correction_bias"] = e_score_correction_bias
        self.custom_routing_function = custom_routing_function
        self.backend = backend

        dtype = params_dtype or torch.get_default_dtype()
        inter = self.intermediate_size_per_partition
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter, dtype=dtype),
                                      requires_grad=False)
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
                f"intermediate_size_per_partition={self.intermediate_size_per_partition}, "
                f"tp={self.tp_rank}/{self.tp_size}, activation={self.activation}")

    # ---- routing and forward ----

    def select_experts(self, hidden_states: torch.Tensor,
                       router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if router_logits.shape != (hidden_states.shape[0], self.num_experts):
            raise ValueError(f"router_logits must be [num_tokens={hidden_states.shape[0]}, "
                             f"num_experts={self.num_experts}], got {tuple(router_logits.shape)}")
        if self.custom_routing_function is not None:
            weights, ids = self.custom_routing_function(hidden_states, router_logits, self.top_k, self.renormalize)
        elif self.use_grouped_topk:
            weights, ids = grouped_topk(router_logits, self.top_k, self.renormalize, self.num_expert_group,
                                        self.topk_group, self.scoring_func, self.e_score_correction_bias)
        else:
            weights, ids = fused_topk(router_logits, self.top_k, self.renormalize, self.scoring_func)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return weights, ids

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                topk_weights: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if (topk_weights is None) != (topk_ids is None):
            raise ValueError("pass topk_weights and topk_ids together")
        if topk_ids is None:
            if router_logits is None:
                raise ValueError("FusedMoE.forward needs router_logits or precomputed topk_weights/topk_ids")
            topk_weights, topk_ids = self.select_experts(x, router_logits.reshape(x.shape[0], -1))
        else:
            topk_weights = topk_weights.reshape(x.shape[0], -1)
            topk_ids = topk_ids.reshape(x.shape[0], -1)
        out = self._experts(x, topk_weights, topk_ids)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out.view(shape)

    def _experts(self, x, topk_weights, topk_ids) -> torch.Tensor:
        backend = self.backend or ("triton" if x.is_cuda else "torch")
        if backend == "triton":
            from porter.kernels.moe import fused_moe  # imports triton: only on this path

            return fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation)
        return moe_reference(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.activation)

    # ---- weight loading ----

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, weight_name: str,
                      shard_id: str, expert_id: int | None = None) -> None:
        """Copy one checkpoint tensor (this rank's slice of it) into w13_weight or w2_weight.

        expert_id=int: one expert's 2-D tensor, gate/up `[I, H]` (w1/w3) or down `[H, I]` (w2).
        expert_id=None: the same stacked over all experts `[E, ...]`; "w13" is gate and up fused `[E, 2I, H]`.
        """
        expected = {"w1": self.w13_weight, "w3": self.w13_weight, "w13": self.w13_weight, "w2": self.w2_weight}
        if shard_id not in expected:
            raise ValueError(f"{weight_name}: shard_id must be one of {sorted(expected)}, got {shard_id!r}")
        if param is not expected[shard_id]:
            raise ValueError(f"{weight_name}: shard_id {shard_id!r} does not belong to this parameter")
        if expert_id is None:
            dst, want_dims = param.data, 3
        else:
            if not 0 <= expert_id < self.num_experts:
                raise ValueError(f"{weight_name}: expert_id {expert_id} out of range for {self.num_experts} experts")
            dst, want_dims = param.data[expert_id], 2
        if loaded_weight.dim() != want_dims:
            raise ValueError(f"{weight_name}: expected a {want_dims}-D tensor "
                             f"({'stacked experts' if expert_id is None else 'one expert'}), "
                             f"got shape {tuple(loaded_weight.shape)}")
        inter = self.intermediate_size_per_partition
        if shard_id == "w13":
            gate, up = self._split_gate_up(loaded_weight, weight_name)
            self._copy(dst.narrow(-2, 0, inter), self._shard(gate, -2, weight_name), weight_name)
            self._copy(dst.narrow(-2, inter, inter), self._shard(up, -2, weight_name), weight_name)
        elif shard_id == "w2":
            self._copy(dst, self._shard(loaded_weight, -1, weight_name), weight_name)
        else:
            offset = 0 if shard_id == "w1" else inter
            self._copy(dst.narrow(-2, offset, inter), self._shard(loaded_weight, -2, weight_name), weight_name)

    def _split_gate_up(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if weight.shape[-2] != 2 * self.intermediate_size:
            raise ValueError(f"{name}: fused gate_up has {weight.shape[-2]} rows, expected "
                             f"2 * intermediate_size = {2 * self.intermediate_size}")
        return weight.narrow(-2, 0, self.intermediate_size), weight.narrow(-2, self.intermediate_size,
                                                                            self.intermediate_size)

    def _shard(self, weight: torch.Tensor, dim: int, name: str) -> torch.Tensor:
        if weight.shape[dim] != self.intermediate_size:
            raise ValueError(f"{name}: intermediate dim {dim} has size {weight.shape[dim]}, expected "
                             f"intermediate_size = {self.intermediate_size} (shape {tuple(weight.shape)})")
        size = self.intermediate_size_per_partition
        return weight.narrow(dim, self.tp_rank * size, size)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not match the "
                             f"parameter slice {tuple(dst.shape)}")
        dst.copy_(src)

    @classmethod
    def make_expert_params_mapping(cls, ckpt_gate_proj_name: str, ckpt_down_proj_name: str,
                                   ckpt_up_proj_name: str, num_experts: int) -> list[tuple[str, str, int, str]]:
        """(param_name, weight_name, expert_id, shard_id) for per-expert checkpoint keys.

        A key containing weight_name (e.g. "experts.3.gate_proj.") loads into the parameter named by
        replacing weight_name with param_name ("experts.w13_"), giving "...experts.w13_weight".
        """
        shards = (("w1", ckpt_gate_proj_name), ("w2", ckpt_down_proj_name), ("w3", ckpt_up_proj_name))
        return [("experts.w2_" if shard == "w2" else "experts.w13_", f"experts.{e}.{name}.", e, shard)
                for e in range(num_experts) for shard, name in shards]

    @classmethod
    def make_stacked_params_mapping(cls, ckpt_gate_up_name: str = "gate_up_proj",
                                    ckpt_down_name: str = "down_proj") -> list[tuple[str, str, None, str]]:
        """Same tuples for transformers 5's in-memory stacked `experts.gate_up_proj` / `experts.down_proj`."""
        return [("experts.w13_weight", f"experts.{ckpt_gate_up_name}", None, "w13"),
                ("experts.w2_weight", f"experts.{ckpt_down_name}", None, "w2")]


def load_expert_weight(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
                       mapping: Iterable[tuple[str, str, int | None, str]]) -> str | None:
    """The body of a model's load_weights loop for expert keys: load `name` through the first mapping
    entry it matches and return the parameter name loaded, or None when no entry matches."""
    for param_name, weight_name, expert_id, shard_id in mapping:
        if weight_name not in name:
            continue
        target = name.replace(weight_name, param_name)
        if target not in params:
            raise KeyError(f"checkpoint key {name} maps to {target}, which the model does not have")
        param = params[target]
        param.weight_loader(param, tensor, name, shard_id=shard_id, expert_id=expert_id)
        return target
    return None
