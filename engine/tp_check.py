"""Can a model be split N ways? Checked from its HF config before any worker process starts.

The parallel layers enforce the same rules when they are built (through `divide`), but only inside
the workers, after N processes have started and imported torch; checking the config first turns
the common mistakes into one clear error in the caller's process. The vocabulary needs no check:
the vocab-parallel layers pad it to a multiple of 64 and then of the rank count.
"""
from __future__ import annotations

from transformers import PretrainedConfig


def tp_split_problems(hf_config: PretrainedConfig, tp: int) -> list[str]:
    """Every reason `hf_config` cannot be sharded over `tp` ranks (empty when it can)."""
    if tp < 1:
        return [f"tensor_parallel_size must be >= 1, got {tp}"]
    if tp == 1:
        return []
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    problems = []
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is not None and heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by {tp}")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if kv_heads is not None:
        # Fewer KV heads than ranks: each KV head is replicated on tp // kv_heads consecutive ranks.
        if kv_heads >= tp and kv_heads % tp:
            problems.append(f"num_key_value_heads={kv_heads} is not divisible by {tp}")
        if kv_heads < tp and tp % kv_heads:
            problems.append(
                f"num_key_value_heads={kv_heads} is fewer than {tp} ranks and {tp} is not a multiple of it "
                "(KV heads can only be replicated a whole number of times)"
            )
    for name in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        size = getattr(cfg, name, None)
        if isinstance(size, int) and size % tp:
            problems.append(f"{name}={size} is not divisible by {tp}")
    return problems


def check_tp_splittable(hf_config: PretrainedConfig, tp: int) -> None:
    problems = tp_split_problems(hf_config, tp)
    if problems:
        name = getattr(hf_config, "model_type", None) or type(hf_config).__name__
        raise ValueError(
            f"model '{name}' cannot be split over tensor_parallel_size={tp}: " + "; ".join(problems)
        )
