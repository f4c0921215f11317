"""Engine layers (vLLM's API shape): parallel linears, vocab embedding, rotary, norms, activations, attention."""
from porter.engine.layers.activation import GeluAndMul, SiluAndMul, get_act_and_mul_fn, get_act_fn
from porter.engine.layers.attention import Attention
from porter.engine.layers.layernorm import GemmaRMSNorm, RMSNorm
from porter.engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from porter.engine.layers.logits_processor import LogitsProcessor
from porter.engine.layers.rotary import RotaryEmbedding, get_rope
from porter.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

__all__ = [
    "Attention", "ColumnParallelLinear", "GeluAndMul", "GemmaRMSNorm", "LogitsProcessor",
    "MergedColumnParallelLinear", "ParallelLMHead", "QKVParallelLinear", "RMSNorm", "ReplicatedLinear",
    "RotaryEmbedding", "RowParallelLinear", "SiluAndMul", "VocabParallelEmbedding", "get_act_and_mul_fn",
    "get_act_fn", "get_rope",
]
