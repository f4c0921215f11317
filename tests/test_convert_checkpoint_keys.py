"""Checkpoint keys that are not the module names: what transformers' conversion_mapping.py builds with
statements (`mapping["laguna"] = mapping["qwen2_moe"].copy()`, `mapping["laguna"] += [...]`), and
persistent buffers a checkpoint carries (the xIELU activation's constants), and unstacked layers that
share a member name of a stacking map. End to end per model type:
convert, tiny random checkpoint saved by HF, porter verify's logits, greedy tokens and logprobs."""
from __future__ import annotations

import pytest
import torch

from porter.convert.head import checkpoint_renames
from porter.convert.hf_conversion_mapping import conversion_entries
from porter.engine.weight_utils import persistent_buffers

from convert6_helpers import convert as _convert, verify_tiny as _verify


def test_mapping_statements_extend_the_copied_entry_in_source_order():
    entries, _ = conversion_entries()
    base = entries["qwen2_moe"]
    assert base and entries["laguna"][:len(base)] == base  # the copy comes first, then the += renames
    renames, others = checkpoint_renames("LagunaForCausalLM", "laguna")
    assert ("mlp.shared_expert.", "mlp.shared_experts.") in renames
    assert others  # qwen2_moe's expert WeightConverters came along with the copy


def test_persistent_buffers_are_the_saved_ones():
    m = torch.nn.Module()
    m.register_buffer("kept", torch.ones(2))
    m.register_buffer("scratch", torch.zeros(2), persistent=False)
    m.w = torch.nn.Parameter(torch.zeros(1))
    assert list(persistent_buffers(m)) == ["kept"] and persistent_buffers(m)["kept"] is m.kept


# ctrl: an LM head tied to the embedding that keeps its own bias (only the tied weight's key is skipped);
# minimax_m2: a router buffer; afmoe: an attention `gate_proj` beside the MLP's stacked gate/up (the stacking
# map must not rename it), an `attention_mask=` keyword and a router reading `_, _, d = x.shape`
@pytest.mark.parametrize("model_type", ["laguna", "apertus", "ctrl", "minimax_m2", "afmoe"])
def test_model_with_renamed_or_buffer_keys_matches_hf(model_type, tmp_path):
    result, out = _convert(model_type, tmp_path)
    _verify(model_type, out)
