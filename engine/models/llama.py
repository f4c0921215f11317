"""Llama as an engine model (flat token batches, paged attention, tensor parallel), written by hand.

Module names equal HF's checkpoint names except the fused `qkv_proj` and `gate_up_proj`, which
`load_weights` fills from q/k/v_proj and gate/up_proj through `stacked_params_mapping`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from porter.engine.config import EngineConfig
from porter.engine.distributed import divide, get_tp_world_size
from porter.engine.layers.activation import get_act_and_mul_fn
from porter.engine.layers.attention import Attention
from porter.engine.layers.layernorm import RMSNorm
from porter.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from porter.engine.layers.logits_processor import LogitsProcessor
from porter.engine.layers.rotary import get_rope
from porter.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from porter.engine.weight_utils import (
    CheckpointKeyError,
    default_weight_loader,
    is_ignored_checkpoint_key,
    stacked_param_name,
)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False,
                 prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, prefix=f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class LlamaAttention(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        tp = get_tp_world_size()
        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.num_heads = divide(self.total_num_heads, tp, "num_attention_heads")
        # with more ranks than kv heads each rank keeps one (replicated) kv head
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.total_num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(self.hidden_size, self.head_dim, self.total_num_heads,
                                          self.total_num_kv_heads, bias=bias, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim, self.hidden_size, bias=bias,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=getattr(config, "rope_parameters", None))
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
                              prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        self.self_attn = LlamaAttention(config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bias=getattr(config, "mlp_bias", False), prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, prefix=f"{prefix}.input_layernorm")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                                prefix=f"{prefix}.post_attention_layernorm")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, *, engine_config: EngineConfig, prefix: str = ""):
        super().__init__()
        config = engine_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, prefix=f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, prefix=f"{prefix}.norm")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise NotImplementedError("pipeline parallelism is not supported")
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    # (fused parameter, checkpoint component, shard id)
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, *, engine_config: EngineConfig, prefix: str = ""):
        super().__init__()
        config = engine_config.hf_config
        self.config = config
        self.model = LlamaModel(engine_config=engine_config, prefix=f"{prefix}.model" if prefix else "model")
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if self.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unused: list[str] = []
        tied_head = None  # a tied checkpoint's own lm_head, checked against the embedding at the end
        for name, tensor in weights:
            if is_ignored_checkpoint_key(name):
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                tied_head = tensor
                continue
            stacked = stacked_param_name(name, self.stacked_params_mapping)
            if stacked is not None and stacked[0] in params:
                target, shard_id = stacked
                param = params[target]
                param.weight_loader(param, tensor, shard_id)
            elif name in params:
                target, param = name, params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            else:
                unused.append(name)
                continue
            loaded.add(target)
        if unused:
            raise CheckpointKeyError(unused, loaded, type(self).__name__)
        if tied_head is not None and "model.embed_tokens.weight" in loaded:
            self._check_tied_head(tied_head)
        return loaded

    def _check_tied_head(self, head: torch.Tensor) -> None:
        emb = self.model.embed_tokens
        end = min(emb.vocab_end_index, emb.org_vocab_size)
        rows = head[emb.vocab_start_index:end].to(emb.weight.dtype)
        if not torch.equal(rows.to(emb.weight.device), emb.weight[: rows.shape[0]]):
            raise ValueError("config.tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
                             "model.embed_tokens.weight; set tie_word_embeddings=false in config.json to use the "
                             "checkpoint's own head")
