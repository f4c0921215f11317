"""Models from model files run tensor parallel: TP=2 (gloo, two worker processes) generates what TP=1
does for files `porter convert` made from transformers' own modeling files, and for the custom
trust_remote_code fixture with its hand-written engine file (its config class must reach the workers)."""
from pathlib import Path

import pytest
import torch
import transformers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

from porter.convert.pipeline import convert_file
from test_tp_llama import assert_same_generation, run

TRANSFORMERS_MODELS = Path(transformers.__file__).parent / "models"
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
             max_position_embeddings=128, initializer_range=0.2)
PROMPTS = [[5, 17, 42, 99, 3, 50, 7], [11 + (i * 37) % 80 for i in range(21)]]


def _shapes(runner) -> dict:
    return {n: tuple(p.shape) for n, p in runner.model.named_parameters()}


def convert(model_type: str, out: Path) -> Path:
    result = convert_file(TRANSFORMERS_MODELS / model_type / f"modeling_{model_type}.py", model_type)
    out.write_text(result.code)
    return out


def start_converted(ckpt: Path, model_file: Path, tp: int):
    from porter.engine import LLM

    return LLM(ckpt, model_file=model_file, tensor_parallel_size=tp, device="cpu", skip_tokenizer_init=True,
               max_model_len=64, num_kv_blocks=16, max_num_seqs=4)


def tp2_matches_tp1(tmp_path, model_type, hf_class, config) -> tuple[dict, dict]:
    """Save a tiny HF model, convert its modeling file, generate at TP=1 and TP=2 and assert the same
    output. Returns the parameter shapes at TP=1 and on rank 0 at TP=2 (both ranks checked equal)."""
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    hf_class(config).save_pretrained(ckpt)
    model_file = convert(model_type, tmp_path / f"{model_type}_engine.py")
    tp1_llm = start_converted(ckpt, model_file, 1)
    tp1 = run(tp1_llm, PROMPTS)
    full = {n: tuple(p.shape) for n, p in tp1_llm.runner.model.named_parameters()}
    llm = start_converted(ckpt, model_file, 2)
    try:
        assert_same_generation(tp1, run(llm, PROMPTS))
        per_rank = llm.runner.executor.collective_rpc(_shapes)
    finally:
        llm.runner.shutdown()
    assert per_rank[0] == per_rank[1] and per_rank[0].keys() == full.keys()
    return full, per_rank[0]


@pytest.mark.parametrize("model_type, hf_class, config", [
    ("qwen2", Qwen2ForCausalLM, Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    ("gpt_neox", GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL, rotary_pct=0.5)),
])
def test_converted_model_tp2_matches_tp1(tmp_path, model_type, hf_class, config):
    full, rank0 = tp2_matches_tp1(tmp_path, model_type, hf_class, config)
    # something really is split: at least the vocabulary (128 padded rows -> 64 per rank)
    split = sorted(n for n in full if rank0[n] != full[n])
    assert split, f"no parameter of the converted {model_type} is sharded"
    if model_type == "qwen2":  # GQA: 4 q heads and 2 kv heads of 8 -> 2 q heads and 1 kv head per rank
        qkv = next(n for n in full if n.endswith("layers.0.self_attn.qkv_proj.weight"))
        assert full[qkv][0] == 8 * 8 and rank0[qkv][0] == 4 * 8


def test_custom_remote_code_model_tp2_matches_tp1():
    custom = Path(__file__).resolve().parent.parent / "fixtures" / "custom_model"
    from porter.engine import LLM

    def start_custom(tp):
        return LLM(custom, model_file=custom / "parallax_engine.py", tensor_parallel_size=tp, device="cpu",
                   trust_remote_code=True, skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=16)

    prompts = [[5, 17, 42, 99, 3, 50, 7], [11 + (i * 37) % 200 for i in range(21)]]
    tp1 = run(start_custom(1), prompts)
    llm = start_custom(2)
    try:
        assert_same_generation(tp1, run(llm, prompts))
    finally:
        llm.runner.shutdown()
