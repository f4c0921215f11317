"""A tiny random checkpoint from any causal-LM config class, for `porter verify --tiny`.

The config keeps the architecture's features (GQA or MHA, sliding windows, mixed layer types, MoE,
biases, tying) at toy sizes. Every parameter is then perturbed away from its initial value: HF inits
norm weights to 1 and biases to 0, which would hide a dropped bias or a wrong `1 + w` norm offset.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from porter.verify.errors import VerifyInputError

HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB, MAX_POS = 64, 4, 16, 2, 256, 512
SLIDING_WINDOW = 8  # shorter than the verify prompts, so the window is exercised

# attribute -> tiny value; only attributes the config already has are touched
_SIZES = {
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POS,
    "moe_intermediate_size": HIDDEN // 2,
    "shared_expert_intermediate_size": HIDDEN,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    # latent attention (low-rank q/kv, rope/nope split heads)
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}
# routed-expert counts: a config that has one routes, so its top-k must be set even where the
# default config leaves it None (HF then cannot run its own model)
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def load_config(spec: str) -> tuple[PretrainedConfig, Path | None]:
    """A model type (`llama`) or a config path (config.json or a directory holding one).
    Returns the config and, for custom `auto_map` configs, the directory holding their code."""
    path = Path(spec)
    if path.exists():
        config_dir = path if path.is_dir() else path.parent
        if path.is_dir() and not (path / "config.json").is_file():
            raise VerifyInputError(f"{path} has no config.json")
        raw = json.loads((config_dir / "config.json" if path.is_dir() else path).read_text())
        custom = "auto_map" in raw
        # custom code is found next to config.json, so read a custom config through its directory
        source = config_dir if path.is_dir() or custom else path
        try:
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=custom, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - surface the config error to the user
            raise VerifyInputError(f"cannot read the config at {path}: {exc}") from exc
        return config, (config_dir if custom else None)
    try:
        return AutoConfig.for_model(spec), None
    except ValueError as exc:
        raise VerifyInputError(
            f"{spec!r} is neither a path nor a transformers model type (e.g. llama, qwen3, mistral)"
        ) from exc


def shrink_config(config: PretrainedConfig) -> PretrainedConfig:
    """Toy sizes, same features. Mutates and returns `config`."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    layers_before = getattr(config, "num_hidden_layers", None)
    if hasattr(config, "head_dim") and config.head_dim is None and heads:
        try:  # left None by some defaults for the modeling code to derive, which not every file does
            config.head_dim = HEAD_DIM
        except AttributeError:
            pass
    for name, value in _SIZES.items():
        if getattr(config, name, None) is not None:
            try:
                setattr(config, name, value)
            except AttributeError:  # a derived, read-only property (e.g. head_dim of some configs)
                pass
    if getattr(config, "moe_intermediate_size", None) and hasattr(config, "n_routed_experts") and \
            not any(getattr(config, n, None) for n in _EXPERT_COUNTS):
        # an MoE config whose defaults leave the expert counts None (real checkpoints set them)
        config.n_routed_experts = 4
        if hasattr(config, "n_shared_experts") and config.n_shared_experts is None:
            config.n_shared_experts = 1
    if any(getattr(config, n, None) for n in _EXPERT_COUNTS):
        for name, value in (("num_experts_per_tok", 2), ("n_group", 1), ("topk_group", 1)):
            if hasattr(config, name) and getattr(config, name) is None:
                setattr(config, name, value)
        if getattr(config, "n_group", None):  # expert groups must divide the 4 experts
            config.n_group = min(config.n_group, 2)
            config.topk_group = min(getattr(config, "topk_group", None) or 1, config.n_group)
        if getattr(config, "first_k_dense_replace", None):  # leading dense layers: keep one MoE layer
            config.first_k_dense_replace = min(config.first_k_dense_replace, LAYERS - 1)
    if getattr(config, "qk_rope_head_dim", None) and hasattr(config, "head_dim"):
        try:  # latent-attention configs keep head_dim = the rope part's width
            config.head_dim = config.qk_rope_head_dim
        except AttributeError:
            pass
    if kv_heads is not None and heads:
        # keep the attention kind: MHA stays MHA, MQA stays MQA, GQA becomes 2 groups of 2
        setattr(config, "num_key_value_heads", HEADS if kv_heads == heads else 1 if kv_heads == 1 else HEADS // 2)
    elif heads and hasattr(config, "num_key_value_heads"):
        # left None by a default that some modeling files divide by (real checkpoints set it): plain MHA
        config.num_key_value_heads = HEADS
    if getattr(config, "sliding_window", None):
        config.sliding_window = SLIDING_WINDOW
    # per-layer lists (layer_types, mlp_layer_types, ...): every kind kept once, in order of first appearance
    per_layer = {name: value for name, value in vars(config).items()
                 if "layer" in name and isinstance(value, list) and value and len(value) == layers_before}
    if per_layer:
        kinds = {name: list(dict.fromkeys(value)) for name, value in per_layer.items()}
        n = max(LAYERS, *(len(k) for k in kinds.values()))
        config.num_hidden_layers = n
        for name, k in kinds.items():
            setattr(config, name, (k * n)[:n])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(config, name, None)
        if isinstance(ids, int) and ids >= VOCAB:
            setattr(config, name, VOCAB - 1)
        elif isinstance(ids, list):
            setattr(config, name, [i if i < VOCAB else VOCAB - 1 for i in ids])
    config.use_cache = True
    return config


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Matrices get fresh N(0, 1/fan_in) values (activations keep unit scale); vectors and scalars
    (norm weights, biases, per-head scales) move by N(0, 0.3) off their init, so 1s and 0s vanish."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.dim() >= 2:
            param.copy_(noise / param.shape[-1] ** 0.5)
        else:
            param.add_(0.3 * noise.to(param.dtype))


def make_tiny_checkpoint(spec: str, out_dir: str | Path, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Write a tiny perturbed fp32 checkpoint for `spec` (model type or config path) to `out_dir`."""
    config, code_dir = load_config(spec)
    shrink_config(config)
    config.dtype = "float32"
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=code_dir is not None, dtype=torch.float32)
    except ValueError as exc:
        raise VerifyInputError(f"{spec!r} has no causal-LM model class: {exc}") from exc
    perturb_(model, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if code_dir is not None:  # custom code travels with the checkpoint (auto_map points at it)
        for src in code_dir.glob("*.py"):
            if not (out / src.name).exists():
                shutil.copy(src, out / src.name)
    return out
