"""EngineConfig: what every engine model and layer is constructed with (vLLM's VllmConfig, slimmed)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig


@dataclass
class EngineConfig:
    hf_config: PretrainedConfig
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensor_parallel_size: int = 1
    block_size: int = 16
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    attention_backend: str = "torch"  # "torch" (CPU, reference) or "triton" (CUDA)
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # None: sized from memory by the model runner
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # no CUDA graphs
    seed: int = 0
