"""Helpers written for [batch, seq] position ids (the classic rotary forward of older transformers and of
custom files) are called on a batch of one, and the converted model still matches HF exactly."""
from __future__ import annotations

import re

import libcst as cst
import pytest
import torch
from transformers import AutoModelForCausalLM

from porter.convert.pipeline import convert_source
from porter.convert.report import ConversionError
from porter.convert.source import resolve_source
from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.weight_utils import iterate_safetensors

from test_convert_models import PROMPT_LENS, load_module, tiny_config

# the rotary forward as transformers wrote it before 5.2x: batch-first position ids
CLASSIC_ROTARY_FORWARD = '''    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
'''


def classic_llama_source() -> str:
    path, _ = resolve_source("llama")
    src = path.read_text()
    new, n = re.subn(r"    def forward\(self, x, position_ids\):\n(?:        .*\n|\n)+?(?=\n\S|\ndef )",
                     CLASSIC_ROTARY_FORWARD, src, count=1)
    assert n == 1 and "position_ids[:, None, :]" in new
    return new


def test_batch_first_rotary_is_called_on_a_batch_of_one(tmp_path):
    result = convert_source(classic_llama_source(), "modeling_llama.py", package="transformers.models.llama")
    assert "positions[None]" in result.code and "[t[0] for t in self.rotary_emb(" in result.code
    assert any("batch of one" in c.message for c in result.report.changes)

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "engine.py").write_text(result.code)
    mod = load_module(tmp_path / "engine.py", "porter_test_classic_llama")
    ec = EngineConfig(hf_config=cfg)
    with set_current_engine_config(ec):
        model = getattr(mod, result.architecture)(engine_config=ec)
    model.load_weights(iterate_safetensors(tmp_path / "ckpt"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in PROMPT_LENS]
    with torch.no_grad(), set_forward_context(AttentionMetadata.for_prefill(PROMPT_LENS)):
        logits = model.compute_logits(model(torch.cat(prompts), torch.cat([torch.arange(n) for n in PROMPT_LENS])))
    start = 0
    with torch.no_grad():
        for p in prompts:
            torch.testing.assert_close(logits[start:start + len(p)], hf(p[None]).logits[0], atol=1e-4, rtol=1e-4)
            start += len(p)


def test_unrecognised_positions_argument_is_refused():
    src = classic_llama_source().replace("self.rotary_emb(hidden_states, position_ids=position_ids)",
                                         "self.rotary_emb(hidden_states, position_ids=position_ids + 0)")
    assert "position_ids + 0" in src
    with pytest.raises(ConversionError, match=r"expects \[batch, seq\] positions"):
        convert_source(src, "modeling_llama.py", package="transformers.models.llama")


# a module-level function of positions whose result is shaped for [batch, heads, seq, dim] (ministral3's
# and beam's query scaling): a flat [tokens] tensor cannot be indexed so, and the result would not broadcast
SCALING_HELPER = '''

def query_scale(position_ids: torch.Tensor, beta: float) -> torch.Tensor:
    scaling = 1 + beta * torch.log1p(position_ids.float())
    return scaling{index}
'''


@pytest.mark.parametrize("index,refused", [("[:, None, :, None]", True), ("[..., None, None]", False)])
def test_a_batch_first_function_of_positions_is_refused_where_called(index, refused):
    src = classic_llama_source().replace(CLASSIC_ROTARY_FORWARD, CLASSIC_ROTARY_FORWARD.replace(
        "        position_ids_expanded = position_ids[:, None, :].float()\n",
        "        position_ids_expanded = position_ids[:, None, :].float() * query_scale(position_ids, 0.1)[0, 0, 0]\n"))
    src = src.replace("\n\nclass LlamaRotaryEmbedding", SCALING_HELPER.format(index=index) + "\n\nclass LlamaRotaryEmbedding")
    assert "query_scale(position_ids, 0.1)" in src and f"scaling{index}" in src
    if refused:
        with pytest.raises(ConversionError, match=r"`query_scale` indexes `scaling\[:, None, :, None\]`: it shapes its "
                                                  r"result for batch-first"):
            convert_source(src, "modeling_llama.py", package="transformers.models.llama")
    else:
        result = convert_source(src, "modeling_llama.py", package="transformers.models.llama")
        assert "query_scale(" in result.code
