"""Attention whose head transpose comes after per-head norms on names (`q = q_proj(x).view(shape)`,
`if use_qk_norm: q = q_norm(q)`, `q = q.transpose(1, 2)`), end to end: convert the installed file, tiny
random checkpoint, porter verify's prefill logits, greedy tokens and logprobs against HF (fp32, CPU).
cohere: dense, optional q/k norm; glm4_moe: the same attention with a routed MoE and partial rotary."""
from __future__ import annotations

import pytest

from convert6_helpers import convert as _convert, verify_tiny as _verify


@pytest.mark.parametrize("model_type", ["cohere", "glm4_moe"])
def test_late_transpose_model_matches_hf(model_type, tmp_path):
    result, out = _convert(model_type, tmp_path)
    attention = next(c for c in out.read_text().split("\nclass ") if c.split("(")[0].endswith("Attention"))
    assert "transpose(1, 2)" not in attention and "query_states = query_states\n" not in attention
    _verify(model_type, out)
