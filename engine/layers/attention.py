"""The Attention layer models call as `self.attn(q, k, v)` (vLLM's shape, our own runtime).

Head counts are per TP rank. The layer writes the new k/v into its paged cache (`k_cache`/`v_cache`,
bound by the model runner; None before) and runs the backend chosen from the current engine config's
`attention_backend` at construction ("torch" reference, or "triton" on CUDA, imported lazily).
Metadata comes from the forward context; with no cache bound (or no block tables, e.g.
`AttentionMetadata.for_prefill`) each sequence attends over its own new tokens.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from porter.engine.config import get_current_engine_config
from porter.engine.forward_context import get_forward_context

_BACKENDS = {"torch": "porter.engine.backends.torch_backend", "triton": "porter.engine.backends.triton_backend"}


def get_attention_backend(name: str | None = None):
    """The backend module for `name` (default: the current engine config's choice, else "torch")."""
    if name is None:
        config = get_current_engine_config()
        name = config.attention_backend if config is not None else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[name])


def _per_head(values, num_heads: int, what: str, prefix: str) -> torch.Tensor | None:
    if values is None:
        return None
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float32)
    if t.numel() != num_heads:
        raise ValueError(f"{prefix or 'Attention'}: {what} has {t.numel()} values for {num_heads} (local) heads")
    return t


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 alibi_slopes=None, sinks=None, prefix: str = "", *, per_layer_sliding_window: int | None = None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"{prefix or 'Attention'}: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if sliding_window is None:  # vLLM's keyword, accepted as an alias
            sliding_window = per_layer_sliding_window
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"{prefix or 'Attention'}: sliding_window must be >= 1, got {sliding_window}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale, self.sliding_window, self.logits_soft_cap = scale, sliding_window, logits_soft_cap or None
        self.layer_name = prefix
        alibi = _per_head(alibi_slopes, num_heads, "alibi_slopes", prefix)
        self.register_buffer("alibi_slopes", None if alibi is None else alibi.float(), persistent=False)
        sinks = _per_head(sinks, num_heads, "sinks", prefix)
        if isinstance(sinks, nn.Parameter):
            # the model owns (and loads) its sinks parameter; keep a reference, not a second registration
            object.__setattr__(self, "_sinks_owner", [sinks])
            self.register_buffer("_sinks_buf", None, persistent=False)
        else:
            object.__setattr__(self, "_sinks_owner", None)
            self.register_buffer("_sinks_buf", sinks, persistent=False)
        self.backend = get_attention_backend()
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    @property
    def sinks(self) -> torch.Tensor | None:
        return self._sinks_owner[0] if self._sinks_owner else self._sinks_buf

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        t = query.shape[0]
        q = query.reshape(t, self.num_heads, self.head_size)
        k = key.reshape(t, self.num_kv_heads, self.head_size)
        v = value.reshape(t, self.num_kv_heads, self.head_size)
        meta = get_forward_context().attn_metadata
        if meta is None:
            raise RuntimeError(f"{self.layer_name or 'Attention'}: the forward context carries no attention metadata")
        opts = dict(scale=self.scale, sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap,
                    alibi_slopes=self.alibi_slopes, sinks=self.sinks)
        if self.k_cache is not None and meta.block_tables is not None:
            out = self.backend.write_and_attend(q, k, v, self.k_cache, self.v_cache, meta, **opts)
        else:
            out = self.backend.attention_no_cache(q, k, v, meta, **opts)
        return out.reshape(t, self.num_heads * self.head_size)

    def extra_repr(self) -> str:
        extras = [f"heads={self.num_heads}", f"kv_heads={self.num_kv_heads}", f"head_size={self.head_size}",
                  f"scale={self.scale:g}", f"backend={self.backend.__name__.rsplit('.', 1)[-1]}"]
        if self.sliding_window:
            extras.append(f"sliding_window={self.sliding_window}")
        if self.logits_soft_cap:
            extras.append(f"soft_cap={self.logits_soft_cap}")
        return ", ".join(extras)
