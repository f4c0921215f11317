"""Torch references of the Triton kernels (exact math in fp32; slow, for tests and the CPU).

Attention semantics (shared with engine/backends/torch_backend.py, see the preamble's contract):
scores s = (q . k) * scale; soft cap s = cap * tanh(s / cap); ALiBi s += slope_h * (key_pos - query_pos);
key j is visible from query i iff j <= i and (no window or i - j < window); a sink is one extra
softmax column per head with logit sinks[h] and no value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping):
    """k, v [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at slot_mapping (-1 = skip)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def _attend(q, k, v, q_pos, k_pos, scale, sliding_window, soft_cap, alibi_slopes, sinks):
    """q [M, Hq, D], k/v [N, Hkv, D], positions [M], [N] -> [M, Hq, D] in fp32."""
    hq, hkv = q.shape[1], k.shape[1]
    q, k, v = q.float(), k.float(), v.float()
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, k) * scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    rel = (k_pos[None, :] - q_pos[:, None]).float()  # [M, N]
    if alibi_slopes is not None:
        s = s + alibi_slopes.float().view(-1, 1, 1) * rel
    visible = rel <= 0
    if sliding_window:
        visible &= -rel < sliding_window
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink_col = sinks.float().view(-1, 1, 1).expand(hq, s.shape[1], 1)
        p = torch.softmax(torch.cat([s, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    return torch.einsum("hmn,nhd->mhd", p, v)


def paged_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, *, scale,
                        sliding_window=None, logits_soft_cap=None, alibi_slopes=None, sinks=None):
    """Varlen attention over a paged cache: sequence i's queries are its last q_len_i positions."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    block_size = k_cache.shape[1]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        a, b = starts[i], starts[i + 1]
        if b == a:
            continue
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_tables[i, pos // block_size].long()
        k = k_cache[blocks, pos % block_size]
        v = v_cache[blocks, pos % block_size]
        q_pos = torch.arange(seq_len - (b - a), seq_len, device=q.device)
        out[a:b] = _attend(q[a:b], k, v, q_pos, pos, scale, sliding_window, logits_soft_cap,
                           alibi_slopes, sinks)
    return out.to(q.dtype)


def attention_no_cache_ref(q, k, v, query_start_loc, *, scale, sliding_window=None,
                           logits_soft_cap=None, alibi_slopes=None, sinks=None):
    """Causal attention of each sequence over its own tokens (q [T, Hq, D], k/v [T, Hkv, D])."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for a, b in zip(starts[:-1], starts[1:]):
        if b == a:
            continue
        pos = torch.arange(b - a, device=q.device)
        out[a:b] = _attend(q[a:b], k[a:b], v[a:b], pos, pos, scale, sliding_window,
                           logits_soft_cap, alibi_slopes, sinks)
    return out.to(q.dtype)


def rotary_ref(positions, q, k, cos_sin_cache, head_size, is_neox):
    """Returns rotated copies of q [T, Hq*D], k [T, Hk*D]. cos_sin_cache [max_pos, rot_dim] holds
    cos in its first rot_dim/2 columns and sin in the rest; the first rot_dim dims of a head rotate."""
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, rot/2]

    def apply(x):
        t = x.shape[0]
        x = x.float().view(t, -1, head_size).clone()
        r = x[..., :rot]
        if is_neox:
            x1, x2 = r[..., : rot // 2], r[..., rot // 2:]
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        if is_neox:
            x[..., :rot] = torch.cat([o1, o2], dim=-1)
        else:
            x[..., :rot] = torch.stack([o1, o2], dim=-1).flatten(-2)
        return x.view(t, -1)

    return apply(q).to(q.dtype), apply(k).to(k.dtype)


def rms_norm_ref(x, weight, eps):
    """HF Llama RMSNorm: normalise in fp32, cast back, then scale by the weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def fused_add_rms_norm_ref(x, residual, weight, eps):
    """(x, residual) -> (rms_norm(x + residual), x + residual), the sum rounded to x's dtype."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual


def silu_and_mul_ref(x):
    a, b = x.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(x.dtype)


def gelu_and_mul_ref(x, approximate="none"):
    a, b = x.float().chunk(2, dim=-1)
    return (F.gelu(a, approximate=approximate) * b).to(x.dtype)
