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


_current: EngineConfig | None = None


def get_current_engine_config() -> EngineConfig | None:
    """The config of the model being constructed (layers that take no config argument read it)."""
    return _current


class set_current_engine_config:
    """Context manager the model loader enters around model construction."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def __enter__(self):
        global _current
        self._previous, _current = _current, self.config
        return self.config

    def __exit__(self, *exc):
        global _current
        _current = self._previous
