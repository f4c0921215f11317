"""Torch reference for the fused mixture-of-experts computation: a plain loop over the experts.

    out[t] = sum_k  topk_weights[t, k] * down_e( act(gate_e(x[t])) * up_e(x[t]) ),   e = topk_ids[t, k]

with stacked expert weights `w13 [E, 2*I, H]` (gate rows first, then up rows) and `w2 [E, H, I]`.
It is exact (ordinary matmuls, fp32 accumulation of the weighted sum) and is both the CPU path of
`FusedMoE` and the baseline the Triton kernel is tested and benchmarked against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def apply_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu":
        return F.gelu(gate)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"unsupported MoE activation {activation!r}; expected one of {ACTIVATIONS}")


def check_moe_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> None:
    """Shared argument checks of the reference and the Triton path, with messages that say what is wrong."""
    if x.dim() != 2:
        raise ValueError(f"hidden_states must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expert weights must be 3-D, got w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)}")
    num_experts, two_i, hidden = w13.shape
    if two_i % 2 or w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match [E, 2I, H] / [E, H, I]")
    if x.shape[1] != hidden:
        raise ValueError(f"hidden_states has hidden size {x.shape[1]}, expert weights expect {hidden}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [num_tokens={x.shape[0]}, top_k]")


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """[T, H] -> [T, H]; every id in topk_ids must lie in [0, E)."""
    check_moe_shapes(x, w13, w2, topk_weights, topk_ids)
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    # One host sync to find the experts in use; each expert then runs on its tokens only.
    for e in torch.unique(topk_ids).tolist():
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} out of range for {num_experts} experts")
        token_idx, slot = torch.where(topk_ids == e)
        h = x[token_idx] @ w13[e].t()
        h = apply_activation(h[:, :inter], activation) * h[:, inter:]
        y = h @ w2[e].t()
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, slot, None].float())
    return out.to(x.dtype)
