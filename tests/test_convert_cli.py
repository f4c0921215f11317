"""`porter convert` as a new user runs it: by model type or path, --report JSON, refusals, then `porter run`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from porter.cli import app

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
runner = CliRunner()


def test_convert_by_model_type_then_run(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    out = tmp_path / "q.py"
    report = tmp_path / "q.json"
    res = runner.invoke(app, ["convert", "qwen3", "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "Qwen3ForCausalLM" in res.output
    assert "attention" in res.output and "parallel" in res.output  # per-pass summary
    data = json.loads(report.read_text())
    assert data["ok"] and not data["refusals"]
    passes = {c["pass_name"] for c in data["changes"]}
    assert {"analyse", "specialise", "flatten", "parallel", "attention", "prefix", "head", "tidy"} <= passes
    assert all(isinstance(c["line"], int) and c["line"] > 0 for c in data["changes"])

    # a tiny random qwen3 checkpoint that reuses the fixture's tokenizer
    vocab = json.loads((FIXTURE / "config.json").read_text())["vocab_size"]
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny-qwen3"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, ckpt / f)
    res = runner.invoke(app, ["run", str(ckpt), "--model-file", str(out), "-p", "The cat", "--max-tokens", "5",
                              "--ignore-eos", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "The cat" in res.output


def test_convert_a_file_path(tmp_path):
    import transformers

    src = Path(transformers.__file__).parent / "models" / "mistral" / "modeling_mistral.py"
    res = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "m.py"), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.py").read_text().count("class MistralForCausalLM(nn.Module)") == 1


def test_refusal_exits_nonzero_and_names_the_construct(tmp_path):
    src = tmp_path / "modeling_oldstyle.py"
    src.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class OldAttention(nn.Module):\n"
        "    def __init__(self, config):\n"
        "        super().__init__()\n"
        "        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)\n\n"
        "    def forward(self, hidden_states):\n"
        "        q = self.q_proj(hidden_states)\n"
        "        w = torch.softmax(q @ q.transpose(-1, -2), dim=-1)\n"
        "        return w @ q\n"
    )
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "x.py"), "--report", str(report)])
    assert res.exit_code == 1
    assert "OldAttention" in res.output and "modeling_oldstyle.py:5" in res.output
    assert "attention interface" in res.output
    data = json.loads(report.read_text())
    assert not data["ok"] and data["refusals"][0]["line"] == 5
    assert not (tmp_path / "x.py").exists()


@pytest.mark.parametrize("src,message", [("not_a_model_type", "neither a file nor a transformers model type"),
                                         ("missing/modeling_x.py", "no such file")])
def test_bad_source_is_a_usage_error(tmp_path, src, message):
    res = runner.invoke(app, ["convert", src, "-o", str(tmp_path / "x.py")])
    assert res.exit_code == 2
    assert message in res.output


def test_custom_remote_code_file_converts_and_matches_hf(tmp_path):
    """A trust_remote_code modeling file outside transformers (the fixture's Parallax): its relative
    config import becomes PretrainedConfig annotations, and the engine decodes what HF decodes."""
    from transformers import AutoModelForCausalLM

    from porter.engine import LLM, SamplingParams

    ckpt = FIXTURE.parent / "custom_model"
    out = tmp_path / "parallax.py"
    res = runner.invoke(app, ["convert", str(ckpt / "modeling_parallax.py"), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    llm = LLM(model=ckpt, model_file=out, dtype="float32", device="cpu", skip_tokenizer_init=True,
              trust_remote_code=True, max_model_len=64, num_kv_blocks=16)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, torch_dtype=torch.float32).eval()
    prompts = [[3, 4, 5, 6, 7], list(range(10, 29))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, o in zip(prompts, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert o.outputs[0].token_ids == ids[len(prompt):]
