"""Vocabulary-parallel embedding and LM head (vLLM's API shape).

The vocab is padded up to a multiple of `padding_size` (64) so it splits evenly over ranks; rank r holds
the contiguous rows [r*V/tp, (r+1)*V/tp) of the padded table. Padding rows are zero and
LogitsProcessor slices their logits off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from porter.engine.distributed import get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce
from porter.engine.layers.linear import make_param
from porter.engine.weight_utils import check_shape

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, pad_to: int = DEFAULT_VOCAB_PADDING_SIZE) -> int:
    return ((vocab_size + pad_to - 1) // pad_to) * pad_to


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 org_num_embeddings: int | None = None, padding_size: int = DEFAULT_VOCAB_PADDING_SIZE,
                 prefix: str = "", *, disable_tp: bool = False):
        super().__init__()
        self.tp_rank = 0 if disable_tp else get_tp_rank()
        self.tp_size = 1 if disable_tp else get_tp_world_size()
        self.num_embeddings, self.embedding_dim, self.prefix = num_embeddings, embedding_dim, prefix
        # rows the checkpoint holds; rows beyond it (added tokens, padding) are zero-filled
        self.org_vocab_size = org_num_embeddings or num_embeddings
        padded = pad_vocab_size(num_embeddings, padding_size)
        padded = -(-padded // self.tp_size) * self.tp_size  # also divisible by tp
        self.num_embeddings_padded = padded
        self.num_embeddings_per_partition = padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        name = f"{prefix}.weight" if prefix else "weight"
        self.weight = make_param((self.num_embeddings_per_partition, embedding_dim),
                                 params_dtype or torch.get_default_dtype(), name, self.weight_loader, output_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{param.param_name}: an embedding takes no shard id (got {shard_id!r})")
        check_shape(param.param_name, (self.org_vocab_size, self.embedding_dim), loaded_weight,
                    "checkpoint vocab rows must equal the config's vocab_size")
        start = min(self.vocab_start_index, self.org_vocab_size)
        end = min(self.vocab_end_index, self.org_vocab_size)
        param.data[: end - start].copy_(loaded_weight[start:end])
        param.data[end - start:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local = torch.where(mine, input_ids - self.vocab_start_index, torch.zeros_like(input_ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings} (padded {self.num_embeddings_padded}, rank rows "
                f"{self.vocab_start_index}..{self.vocab_end_index}), dim={self.embedding_dim}")


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection with the embedding's sharding; applied only through LogitsProcessor."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None, org_num_embeddings: int | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE, prefix: str = "", *, disable_tp: bool = False):
        super().__init__(num_embeddings, embedding_dim, params_dtype, org_num_embeddings, padding_size, prefix,
                         disable_tp=disable_tp)
        self.bias = None
        if bias:
            self.bias = make_param((self.num_embeddings_per_partition,), self.weight.dtype,
                                   f"{prefix}.bias" if prefix else "bias", self._bias_loader, output_dim=0)

    def _bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        check_shape(param.param_name, (self.org_vocab_size,), loaded_weight)
        start = min(self.vocab_start_index, self.org_vocab_size)
        end = min(self.vocab_end_index, self.org_vocab_size)
        param.data[: end - start].copy_(loaded_weight[start:end])
        param.data[end - start:].zero_()

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share the embedding's weight (tied word embeddings); assign the return value."""
        if embed_tokens.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie {self.prefix} {tuple(self.weight.shape)} to "
                             f"{embed_tokens.prefix} {tuple(embed_tokens.weight.shape)}")
        self.weight = embed_tokens.weight
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError("ParallelLMHead is applied through LogitsProcessor(lm_head, hidden_states)")
