"""RMSNorm, activations, vocab-parallel embedding, LM head and LogitsProcessor."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as HFGemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from porter.engine.distributed import tp_override
from porter.engine.layers.activation import GeluAndMul, SiluAndMul, get_act_and_mul_fn, get_act_fn
from porter.engine.layers.layernorm import GemmaRMSNorm, RMSNorm
from porter.engine.layers.logits_processor import LogitsProcessor
from porter.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from porter.engine.weight_utils import WeightShapeError

torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_and_fused_residual(dtype):
    x, res, w = torch.randn(5, 32, dtype=dtype), torch.randn(5, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    hf = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    hf.weight.data.copy_(w)
    ours = RMSNorm(32, eps=1e-5, dtype=dtype)
    ours.weight.weight_loader(ours.weight, w)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=0)
    normed, new_res = ours(x, res)
    torch.testing.assert_close(new_res, res + x, rtol=0, atol=0)
    torch.testing.assert_close(normed, hf(res + x), rtol=0, atol=0)


def test_gemma_unit_offset_matches_hf():
    x, w = torch.randn(4, 16), torch.randn(16)
    hf = HFGemmaRMSNorm(16, eps=1e-6)
    hf.weight.data.copy_(w)
    ours = GemmaRMSNorm(16, eps=1e-6)
    torch.testing.assert_close(ours.weight, torch.zeros(16), rtol=0, atol=0)
    ours.weight.weight_loader(ours.weight, w)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=0)


def test_activations():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])
    torch.testing.assert_close(GeluAndMul("tanh")(x), F.gelu(x[:, :5], approximate="tanh") * x[:, 5:])
    assert isinstance(get_act_and_mul_fn("silu"), SiluAndMul)
    assert get_act_and_mul_fn("gelu_pytorch_tanh").approximate == "tanh"
    # no fused kernel: HF's own activation, exactly
    torch.testing.assert_close(get_act_and_mul_fn("relu")(x), F.relu(x[:, :5]) * x[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(get_act_fn("gelu_pytorch_tanh")(x), F.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        get_act_fn("nope")
    with pytest.raises(ValueError, match="approximate"):
        GeluAndMul("bad")


def test_embedding_pads_vocab_and_looks_up():
    w = torch.randn(100, 8)
    emb = VocabParallelEmbedding(100, 8, prefix="model.embed_tokens")
    assert emb.weight.shape == (128, 8)
    emb.weight.weight_loader(emb.weight, w)
    assert torch.count_nonzero(emb.weight[100:]) == 0
    ids = torch.tensor([0, 5, 99, 42])
    torch.testing.assert_close(emb(ids), w[ids], rtol=0, atol=0)
    with pytest.raises(WeightShapeError, match=r"model.embed_tokens.weight.*\[100, 8\].*\[101, 8\]"):
        emb.weight.weight_loader(emb.weight, torch.randn(101, 8))


def test_embedding_sharded_masked_lookup_sums_to_full():
    w = torch.randn(100, 8)
    ids = torch.tensor([0, 63, 64, 99, 10])
    total = 0
    for r in range(2):
        with tp_override(r, 2):
            emb = VocabParallelEmbedding(100, 8)
        assert emb.weight.shape == (64, 8)
        emb.weight.weight_loader(emb.weight, w)
        rows = w[r * 64:(r + 1) * 64]
        torch.testing.assert_close(emb.weight[: rows.shape[0]], rows, rtol=0, atol=0)
        total = total + emb(ids)  # the all-reduce's sum
    torch.testing.assert_close(total, w[ids], rtol=0, atol=0)


def test_lm_head_tie_and_logits_processor():
    w, h = torch.randn(100, 8), torch.randn(3, 8)
    emb = VocabParallelEmbedding(100, 8)
    emb.weight.weight_loader(emb.weight, w)
    head = ParallelLMHead(100, 8, prefix="lm_head").tie_weights(emb)
    assert head.weight is emb.weight
    with pytest.raises(RuntimeError, match="LogitsProcessor"):
        head(h)
    logits = LogitsProcessor(100)(head, h)
    assert logits.shape == (3, 100)
    torch.testing.assert_close(logits, h @ w.T)
    capped = LogitsProcessor(100, scale=0.5, soft_cap=2.0)(head, h)
    torch.testing.assert_close(capped, torch.tanh(h @ w.T / 2.0) * 2.0 * 0.5)


def test_untied_lm_head_with_bias():
    w, b, h = torch.randn(70, 8), torch.randn(70), torch.randn(2, 8)
    head = ParallelLMHead(70, 8, bias=True, prefix="lm_head")
    head.weight.weight_loader(head.weight, w)
    head.bias.weight_loader(head.bias, b)
    torch.testing.assert_close(LogitsProcessor(70)(head, h), h @ w.T + b)
