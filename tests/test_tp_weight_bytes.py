"""LLM.weight_bytes() / weight_bytes_per_rank(): the weight bytes benchmarks need, at TP=1 and under TP.

At TP=2 the total exceeds the TP=1 total by exactly the tensors every rank keeps whole (written out
here from the sharding rules, not measured): norm weights, row-parallel biases, and the K/V
projections when there are fewer KV heads than ranks. The split tensors sum to their TP=1 size.
"""
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from porter.engine import LLM

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
FP32 = 4


def start(path: Path, tp: int) -> LLM:
    return LLM(path, tensor_parallel_size=tp, device="cpu", dtype="float32", skip_tokenizer_init=True,
               max_model_len=32, num_kv_blocks=4, max_num_seqs=2)


def per_rank_bytes(path: Path, tp: int) -> list[int]:
    llm = start(path, tp)
    try:
        return llm.weight_bytes_per_rank()
    finally:
        llm.shutdown()


def replicated_bytes(cfg, tp: int) -> int:
    """Bytes each rank holds in full at tensor_parallel_size=tp (llama layout)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    whole = (2 * layers + 1) * h  # input/post-attention norms per layer, final norm
    if cfg.attention_bias:
        whole += layers * h  # o_proj bias (row parallel: added once, after the all-reduce)
    if cfg.mlp_bias:
        whole += layers * h  # down_proj bias
    if cfg.num_key_value_heads < tp:  # each rank holds its (shared) KV heads whole: k and v, weight and bias
        kv = 2 * layers * cfg.num_key_value_heads * head_dim * (h + (1 if cfg.attention_bias else 0))
        whole += kv
    return whole * FP32


def test_tp1_weight_bytes_is_the_parameter_bytes_with_the_tied_head_once():
    llm = start(FIXTURE, 1)
    params = list(llm.model_parameters())
    embed = llm.runner.model.model.embed_tokens.weight
    assert llm.runner.model.lm_head.weight.data_ptr() == embed.data_ptr()  # tied: one tensor
    assert llm.weight_bytes_per_rank() == [llm.weight_bytes()]
    assert llm.weight_bytes() == sum(p.numel() * p.element_size() for p in params)
    # the checkpoint stores the tied table once as well; the engine adds only vocab padding rows (750 -> 768)
    from safetensors.torch import load_file

    ckpt = load_file(str(FIXTURE / "model.safetensors"))
    padding = (768 - 750) * embed.shape[1] * FP32
    assert llm.weight_bytes() == sum(t.numel() * t.element_size() for t in ckpt.values()) + padding


def test_fixture_tp2_holds_the_tp1_bytes_plus_replicated_norms():
    cfg = LlamaConfig.from_pretrained(FIXTURE)
    tp1, tp2 = per_rank_bytes(FIXTURE, 1), per_rank_bytes(FIXTURE, 2)
    assert tp2[0] == tp2[1]  # an even split
    assert sum(tp2) - sum(tp1) == (2 - 1) * replicated_bytes(cfg, 2)  # the second rank's copy of the norms


def test_fewer_kv_heads_than_ranks_and_biases_are_replicated(tmp_path):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    HFLlama(cfg).save_pretrained(tmp_path)
    tp1, tp2 = per_rank_bytes(tmp_path, 1), per_rank_bytes(tmp_path, 2)
    assert tp2[0] == tp2[1]
    assert sum(tp2) - sum(tp1) == (2 - 1) * replicated_bytes(cfg, 2)
