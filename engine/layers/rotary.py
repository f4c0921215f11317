"""Rotary position embedding over flat token batches (vLLM's `get_rope` shape).

Frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` for every non-default rope type, so
scaled variants match HF exactly. Static-cache notes (a cos/sin row per position):
- "dynamic" (dynamic NTK) is used in its static form: HF only rescales once a sequence exceeds
  max_position_embeddings, so positions below it are exact; beyond it we keep the base frequencies.
- "longrope" uses the short factors for positions < original_max_position_embeddings and the long
  factors beyond (per position, as vLLM does); HF switches all positions of a sequence to the long
  factors once the sequence is longer than that, so such long sequences differ from HF.

On CUDA tensors forward runs porter's fused Triton kernel over the same cos/sin cache, rotating q and
k IN PLACE wherever they are [T, heads*head_size] rows with a unit last stride (e.g. slices of a fused
qkv), else on contiguous copies: callers use the returned tensors and must not count on their inputs
staying unrotated. The torch path (CPU, and the reference) returns new tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from porter.engine.config import get_current_engine_config
from porter.engine.layers.kernel_dispatch import kernel_module, wants_kernel
from porter.engine.layers.layernorm import RMSNorm

_cache: dict[tuple, "RotaryEmbedding"] = {}

# see porter.engine.layers.kernel_dispatch
USE_KERNEL: bool | None = None



def _rows(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """x as [T, heads*head_size] rows with a unit last stride: a view where possible, else a copy."""
    if x.shape[0] != num_tokens:
        raise ValueError(f"rotary: {tuple(x.shape)} has {x.shape[0]} tokens but positions has {num_tokens}")
    rows = x.reshape(num_tokens, -1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base ** exps)


def _hf_rope_init(rope_type: str, head_size: int, max_position: int, params: dict, seq_len=None):
    """(inv_freq, attention_scaling) from transformers' init function for `rope_type`."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        known = ", ".join(["default", *sorted(ROPE_INIT_FUNCTIONS)])
        raise ValueError(f"unknown rope_type {rope_type!r}; transformers knows: {known}")
    config = PretrainedConfig(hidden_size=head_size, num_attention_heads=1, head_dim=head_size,
                              max_position_embeddings=max_position, rope_parameters=dict(params))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    return inv_freq.to(torch.float32), float(scaling)


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q, k) -> (q, k), q/k `[T, heads*head_size]` or `[T, heads, head_size]`.
    Only the first `rotary_dim` channels of each head rotate. neox style = HF rotate_half pairs
    (x[i], x[i + d/2]); otherwise GPT-J interleaved pairs (x[2i], x[2i+1])."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, is_neox_style: bool,
                 inv_freq: torch.Tensor, attention_scaling: float = 1.0, dtype: torch.dtype | None = None,
                 long_inv_freq: torch.Tensor | None = None, long_from: int | None = None):
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_size:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
        self.head_size, self.rotary_dim, self.max_position = head_size, rotary_dim, max_position
        self.is_neox_style, self.attention_scaling = is_neox_style, attention_scaling
        self.cache_dtype = dtype or torch.get_default_dtype()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        self.long_from = long_from
        self.register_buffer("cos_sin_cache", self._build(max_position), persistent=False)

    def _build(self, n: int) -> torch.Tensor:
        """[n, rotary_dim]: cos half | sin half per position, scaled, computed in fp32."""
        device = self.inv_freq.device
        pos = torch.arange(n, dtype=torch.float32, device=device)
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
        if self.long_inv_freq is not None:
            long = pos[:, None] * self.long_inv_freq.to(device)[None, :]
            freqs = torch.where(pos[:, None] >= self.long_from, long, freqs)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling
        return cache.to(self.cache_dtype)

    def _ensure(self, positions: torch.Tensor) -> None:
        # A device sync per call on GPU would be costly (and breaks CUDA graphs): there the cache is
        # sized up front (max_position, or the engine's max_model_len if larger) and not re-checked.
        if positions.device.type != "cpu" or positions.numel() == 0:
            return
        needed = int(positions.max()) + 1
        if needed > self.cos_sin_cache.shape[0]:
            size = max(needed, 2 * self.cos_sin_cache.shape[0])
            self.cos_sin_cache = self._build(size)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, self.head_size)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        if rest.shape[-1]:
            out = torch.cat([out, rest], dim=-1)
        return out.reshape(shape)

    def _use_kernel(self, query: torch.Tensor, key: torch.Tensor | None) -> bool:
        return wants_kernel(USE_KERNEL, query) if key is None else wants_kernel(USE_KERNEL, query, key)

    def _forward_kernel(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None):
        t = positions.numel()
        if t == 0:  # nothing to rotate (and [0, -1] cannot be reshaped)
            return query, key
        q = _rows(query, t)
        k = _rows(key, t) if key is not None else q[:, :0]  # no key heads: nothing to rotate
        kernel_module("rotary").apply_rotary(positions.contiguous(), q, k, self.cos_sin_cache, self.head_size,
                                   self.is_neox_style)
        return q.view(query.shape), (None if key is None else k.view(key.shape))

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        positions = positions.flatten()
        self._ensure(positions)
        if self._use_kernel(query, key):
            return self._forward_kernel(positions, query, key)
        cos_sin = self.cos_sin_cache.index_select(0, positions.to(self.cos_sin_cache.device))
        cos, sin = cos_sin.to(query.dtype)[:, None, :].chunk(2, dim=-1)  # [T, 1, rotary_dim/2]
        query = self._rotate(query, cos, sin)
        if key is not None:
            key = self._rotate(key, cos, sin)
        return query, key

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_position={self.max_position}, "
                f"neox={self.is_neox_style}, scaling={self.attention_scaling:g}")


def get_rope(head_size: int, max_position: int, is_neox_style: bool = True, rope_parameters: dict | None = None,
             dtype: torch.dtype | None = None) -> RotaryEmbedding:
    """A (shared, cached) rotary module. `rope_parameters` is transformers 5's dict: rope_type,
    rope_theta, partial_rotary_factor and the type's scaling keys."""
    params = dict(rope_parameters or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters is nested by layer type ({', '.join(params)}); pass the entry for this "
                         "layer, e.g. config.rope_parameters[config.layer_types[layer_idx]]")
    rope_type = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_type", rope_type)
    params.setdefault("rope_theta", 10000.0)
    factor = params.get("partial_rotary_factor", 1.0)
    if not 0 < factor <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}")
    rotary_dim = int(params.get("rope_dim") or head_size * factor)
    dtype = dtype or torch.get_default_dtype()
    engine_config = get_current_engine_config()
    cache_len = max(max_position, engine_config.max_model_len if engine_config else 0)
    device = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
    key = (head_size, rotary_dim, max_position, cache_len, is_neox_style, repr(sorted(params.items())), dtype,
           str(device))
    if key in _cache:
        return _cache[key]

    long_inv_freq = long_from = None
    if rope_type == "default":
        inv_freq, scaling = _default_inv_freq(rotary_dim, float(params["rope_theta"])), 1.0
    else:
        inv_freq, scaling = _hf_rope_init(rope_type, head_size, max_position, params)
        if not params.get("rope_dim"):  # trust HF's width: "proportional" rotates all dims, some at frequency 0
            rotary_dim = 2 * inv_freq.numel()
        if rope_type == "longrope":
            long_from = int(params["original_max_position_embeddings"])
            long_inv_freq, _ = _hf_rope_init(rope_type, head_size, max_position, params, seq_len=long_from + 1)
    if inv_freq.numel() * 2 != rotary_dim:
        raise ValueError(f"rope init for {rope_type!r} gave {inv_freq.numel()} frequencies for rotary_dim {rotary_dim}")
    rope = RotaryEmbedding(head_size, rotary_dim, cache_len, is_neox_style, inv_freq.to(device), scaling, dtype,
                           None if long_inv_freq is None else long_inv_freq.to(device), long_from)
    rope.max_position = max_position
    _cache[key] = rope
    return rope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fusable_norms(q_norm: nn.Module, k_norm: nn.Module, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Both are the engine's weighted RMSNorm over the head dim, whose kernel numerics the fused launch
    reproduces (a Gemma offset norm or any other module runs on its own first)."""
    return all(type(n) is RMSNorm and n.weight is not None and not n.unit_offset and n.hidden_size == q.shape[-1]
               and n.weight.dtype == q_norm.weight.dtype for n in (q_norm, k_norm)) and \
        q.dtype == k.dtype and q.stride(-1) == 1 and k.stride(-1) == 1


def apply_rotary_cos_sin(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
    """HF's rotate-half apply (`q * cos + rotate_half(q) * sin`, cos/sin unsqueezed at dim 1) over flat
    batches: q/k [T, heads, head_dim], cos/sin [T, rot_dim]; only the first rot_dim dims rotate. Returns new
    tensors. On CUDA one Triton launch rotates q and k; on CPU it is HF's torch expression (bit-exact).

    q_norm / k_norm (both or neither): per-head norms applied to q and k first, exactly `q_norm(q)` and
    `k_norm(k)`; engine RMSNorms over the head dim run inside the same launch on CUDA."""
    if (q_norm is None) != (k_norm is None):
        raise ValueError("apply_rotary_cos_sin: pass both q_norm and k_norm, or neither")
    if q.dim() != 3 or k.dim() != 3 or cos.dim() != 2 or sin.shape != cos.shape or \
            not q.shape[0] == k.shape[0] == cos.shape[0] or q.shape[-1] != k.shape[-1] or \
            cos.shape[-1] > q.shape[-1] or cos.shape[-1] % 2:
        raise ValueError(f"apply_rotary_cos_sin: expected q/k [T, heads, D] and cos/sin [T, R<=D, R even], got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    norms = None  # (weights, eps) the kernel applies itself
    if q_norm is not None:
        if wants_kernel(USE_KERNEL, q, k, cos, sin) and _fusable_norms(q_norm, k_norm, q, k):
            norms = (q_norm.weight, q_norm.eps, k_norm.weight, k_norm.eps)
        else:
            q, k = q_norm(q), k_norm(k)
    if wants_kernel(USE_KERNEL, q, k, cos, sin):
        return kernel_module("rotary_cos_sin").rotary_cos_sin(q, k, cos, sin, norms)
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if rot == q.shape[-1]:  # HF's exact expression
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)

    def partial(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass.to(torch.result_type(x_rot, cos))),
                         dim=-1)

    return partial(q), partial(k)
