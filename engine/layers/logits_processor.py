"""hidden states -> logits: LM head matmul, TP gather, padding slice, soft cap and scale (vLLM's order)."""
from __future__ import annotations

import torch
from torch import nn

from porter.engine.distributed import tensor_model_parallel_all_gather
from porter.engine.layers.linear import linear


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, org_vocab_size: int | None = None, scale: float = 1.0,
                 soft_cap: float | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.org_vocab_size = org_vocab_size or vocab_size
        self.scale, self.soft_cap = scale, soft_cap

    def forward(self, lm_head: nn.Module, hidden_states: torch.Tensor,
                embedding_bias: torch.Tensor | None = None) -> torch.Tensor:
        bias = embedding_bias if embedding_bias is not None else getattr(lm_head, "bias", None)
        logits = linear(hidden_states, lm_head.weight, bias)
        if getattr(lm_head, "tp_size", 1) > 1:
            logits = tensor_model_parallel_all_gather(logits, dim=-1)
        logits = logits[..., : self.org_vocab_size]
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits

    def extra_repr(self) -> str:
        return f"vocab={self.org_vocab_size}, scale={self.scale}, soft_cap={self.soft_cap}"
