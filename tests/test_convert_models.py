"""porter convert on the dev set: each converted transformers file must reproduce HF exactly (fp32, CPU).

Per model type: convert the installed modeling file, save a tiny random HF model with save_pretrained,
then (1) prefill logits on a ragged flat batch equal HF's per-sequence logits, and (2) the engine (LLM
with model_file=converted file) decodes the same greedy tokens as HF for 4 prompts of lengths 5..23
over 12 new tokens, logprobs within 2e-3, with a sliding window shorter than the prompts where the
architecture has one.
"""
from __future__ import annotations

import ast
import importlib.util
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from porter.convert import convert_file
from porter.convert.pipeline import FORBIDDEN, leftover_names
from porter.convert.source import resolve_source
from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.weight_utils import iterate_safetensors

DEV_SET = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt_neox"]
WINDOW = 6  # shorter than every prompt below
PROMPT_LENS = [5, 11, 17, 23]
NEW_TOKENS = 12
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)


def tiny_config(model_type: str):
    cfg = AutoConfig.for_model(model_type, **TINY)
    if hasattr(cfg, "sliding_window"):
        cfg.sliding_window = WINDOW
        if getattr(cfg, "layer_types", None) is not None:
            # interleave full and sliding layers so both paths run
            cfg.layer_types = ["full_attention", "sliding_attention"]
            if hasattr(cfg, "use_sliding_window"):
                cfg.use_sliding_window = True
    return cfg


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", params=DEV_SET)
def case(request, tmp_path_factory):
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    cfg = tiny_config(model_type)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    ckpt = root / "ckpt"
    hf.save_pretrained(ckpt)
    src, _ = resolve_source(model_type)
    result = convert_file(src, model_type=model_type)
    path = root / f"{model_type}_engine.py"
    path.write_text(result.code)
    return model_type, cfg, hf, ckpt, path, result


def test_prefill_logits_match_hf_on_a_ragged_batch(case):
    model_type, cfg, hf, ckpt, path, result = case
    mod = load_module(path, f"porter_test_{model_type}")
    ec = EngineConfig(hf_config=cfg)
    with set_current_engine_config(ec):
        model = getattr(mod, result.architecture)(engine_config=ec)
    loaded = model.load_weights(iterate_safetensors(ckpt))
    assert loaded == set(dict(model.named_parameters())), "every parameter filled from the checkpoint"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in PROMPT_LENS]
    with torch.no_grad(), set_forward_context(AttentionMetadata.for_prefill(PROMPT_LENS)):
        hidden = model(torch.cat(prompts), torch.cat([torch.arange(n) for n in PROMPT_LENS]))
        logits = model.compute_logits(hidden)
    start = 0
    with torch.no_grad():
        for p in prompts:
            ref = hf(p[None]).logits[0]
            torch.testing.assert_close(logits[start:start + len(p)], ref, atol=1e-4, rtol=1e-4)
            start += len(p)


def hf_greedy(hf, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            t = int(lp.argmax())
            tokens.append(t)
            logprobs.append(float(lp[t]))
            ids.append(t)
    return tokens, logprobs


def test_engine_greedy_tokens_and_logprobs_match_hf(case):
    from porter.engine import LLM, SamplingParams

    model_type, cfg, hf, ckpt, path, _ = case
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]
    llm = LLM(model=ckpt, model_file=path, dtype="float32", device="cpu", skip_tokenizer_init=True,
              max_model_len=64, num_kv_blocks=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0))
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = hf_greedy(hf, prompt)
        got = out.outputs[0]
        assert got.token_ids == tokens, f"{model_type}: prompt of {len(prompt)} tokens"
        engine_lp = [step[t] for step, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - b) for a, b in zip(engine_lp, logprobs)) < 2e-3


def test_generated_code_is_clean(case):
    model_type, *_, path, result = case
    code = path.read_text()
    tree = ast.parse(code)
    for word in FORBIDDEN:
        assert not re.search(rf"\b{word}\b", code), f"{model_type}: leftover `{word}`"
    assert not leftover_names(code), f"{model_type}: leftover names {leftover_names(code)}"
    # no unused imports
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
           {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assert imported <= used, f"{model_type}: unused imports {imported - used}"
    # no constant branches, no relative imports, the config class imported not copied
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp)):
            assert not isinstance(node.test, ast.Constant), f"{model_type}: dead branch at line {node.lineno}"
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0
    assert not any(isinstance(n, ast.ClassDef) and n.name.endswith("Config") for n in tree.body)
    long = [line for line in code.splitlines() if len(line) > 120 and not line.strip().startswith("#")]
    assert not long or all('"""' not in line and "=" not in line for line in long), long  # only HF docstrings
    # every change and refusal is reported with a source line
    assert result.report.changes and all(c.line for c in result.report.changes if c.pass_name != "tidy")


def test_converted_llama_has_the_handwritten_llama_structure(tmp_path):
    from porter.engine.models.llama import LlamaForCausalLM as HandWritten

    cfg = tiny_config("llama")
    result = convert_file(resolve_source("llama")[0], model_type="llama")
    path = tmp_path / "llama_engine.py"
    path.write_text(result.code)
    mod = load_module(path, "porter_test_llama_structure")
    ec = EngineConfig(hf_config=cfg)
    with set_current_engine_config(ec):
        converted = mod.LlamaForCausalLM(engine_config=ec)
        written = HandWritten(engine_config=ec)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(converted) == shapes(written)
    assert mod.LlamaForCausalLM.packed_modules_mapping == HandWritten.packed_modules_mapping
    attn = {n for n, m in converted.named_modules() if type(m).__name__ == "Attention"}
    assert attn == {f"model.layers.{i}.self_attn.attn" for i in range(cfg.num_hidden_layers)}
    assert {m.layer_name for m in converted.modules() if type(m).__name__ == "Attention"} == attn
