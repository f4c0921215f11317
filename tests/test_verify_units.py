"""Pieces of porter verify: tiny configs, perturbation, prompts, comparison rules, weight report, blame."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaConfig

import porter.engine.models.llama as hand_written_llama
from porter.verify import checkpoint, engine_side
from porter.verify.compare import check_greedy, check_prefill
from porter.verify.engine_side import EngineGreedy
from porter.verify.errors import VerifyInputError
from porter.verify.localise import blame
from porter.verify.prompts import make_prompts
from porter.verify.reference import Greedy
from porter.verify.tiny import make_tiny_checkpoint, shrink_config
from porter.verify.weights import load_with_report


# ---------------------------------------------------------------- tiny checkpoints


@pytest.mark.parametrize("model_type, orig_kv_heads, kv_heads", [("llama", 32, 4), ("mistral", 8, 2), ("llama", 1, 1)])
def test_shrink_keeps_attention_kind(model_type, orig_kv_heads, kv_heads):
    config = AutoConfig.for_model(model_type, num_attention_heads=32, num_key_value_heads=orig_kv_heads)
    shrink_config(config)
    assert config.hidden_size == 64 and config.num_hidden_layers >= 2 and config.vocab_size == 256
    assert config.num_key_value_heads == kv_heads


def test_shrink_keeps_sliding_window_layer_types_and_experts():
    gemma2 = shrink_config(AutoConfig.for_model("gemma2"))
    assert gemma2.sliding_window == 8
    assert set(gemma2.layer_types) == {"sliding_attention", "full_attention"}
    assert len(gemma2.layer_types) == gemma2.num_hidden_layers
    moe = shrink_config(AutoConfig.for_model("qwen3_moe"))
    assert moe.num_experts == 4 and moe.num_experts_per_tok == 2
    qwen = shrink_config(AutoConfig.for_model("qwen2", eos_token_id=151643, bos_token_id=151643))
    assert qwen.eos_token_id < qwen.vocab_size and qwen.bos_token_id < qwen.vocab_size


def test_tiny_checkpoint_has_no_identity_norms_or_zero_biases(tmp_path):
    ckpt = make_tiny_checkpoint("qwen2", tmp_path)  # qwen2 has q/k/v biases
    tensors = load_file(str(ckpt / "model.safetensors"))
    vectors = {k: v for k, v in tensors.items() if v.dim() == 1}
    assert any(k.endswith("q_proj.bias") for k in vectors) and any(k.endswith("norm.weight") for k in vectors)
    for name, v in vectors.items():
        assert not torch.all(v == 1) and not torch.all(v == 0), name
        assert (v - v.mean()).abs().max() > 0.1, name  # spread, not a constant offset


def test_tiny_rejects_unknown_model_type(tmp_path):
    with pytest.raises(VerifyInputError, match="neither a path nor a transformers model type"):
        make_tiny_checkpoint("no_such_model", tmp_path)


def test_index_naming_a_missing_shard_is_an_input_error(tmp_path):
    ckpt = make_tiny_checkpoint("llama", tmp_path / "c", max_shard_size="40KB")
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(VerifyInputError, match="names shard files that do not exist"):
        checkpoint.check_dir(ckpt)


# ---------------------------------------------------------------- prompts


def test_prompts_are_seeded_ragged_and_in_vocab():
    a, b = make_prompts(5, 100, seed=1), make_prompts(5, 100, seed=1)
    assert a == b and a != make_prompts(5, 100, seed=2)
    lengths = [len(p) for p in a]
    assert len(set(lengths)) == 5 and max(lengths) == 24
    assert all(0 <= t < 100 for p in a for t in p)
    with pytest.raises(ValueError):
        make_prompts(0, 100)


# ---------------------------------------------------------------- comparison rules


def _hf(tokens, logits):
    return Greedy(tokens, [torch.log_softmax(torch.tensor(row), -1) for row in logits])


def _engine(tokens, hf: Greedy, k=3, shift=0.0):
    steps = [{int(t): float(lp[t]) + shift for t in torch.topk(lp, k).indices} for lp in hf.logprobs]
    return EngineGreedy(tokens, steps)


def test_fp32_identical_tokens_and_close_logprobs_pass():
    hf = _hf([2, 0], [[0.0, 1.0, 5.0, 0.5], [4.0, 1.0, 0.0, 0.5]])
    greedy, logprobs = check_greedy([_engine([2, 0], hf)], [hf], low_precision=False, atol=2e-3, num_logprobs=3)
    assert greedy.passed and logprobs.passed and logprobs.metrics["max_abs"] < 1e-6


def test_fp32_divergence_at_a_tie_passes_but_not_elsewhere():
    tie = _hf([2, 0], [[0.0, 5.0 - 1e-5, 5.0, 0.5], [4.0, 1.0, 0.0, 0.5]])
    greedy, _ = check_greedy([_engine([1, 0], tie)], [tie], low_precision=False, atol=2e-3, num_logprobs=3)
    assert greedy.passed and greedy.metrics["first_divergence"] == [0]
    clear = _hf([2, 0], [[0.0, 3.0, 5.0, 0.5], [4.0, 1.0, 0.0, 0.5]])
    greedy, _ = check_greedy([_engine([1, 0], clear)], [clear], low_precision=False, atol=2e-3, num_logprobs=3)
    assert not greedy.passed and "prompt 0 step 0" in greedy.detail


def test_fp32_logprob_error_beyond_atol_fails():
    hf = _hf([2], [[0.0, 1.0, 5.0, 0.5]])
    _, logprobs = check_greedy([_engine([2], hf, shift=0.01)], [hf], low_precision=False, atol=2e-3, num_logprobs=3)
    assert not logprobs.passed and logprobs.metrics["max_abs"] == pytest.approx(0.01, abs=1e-4)


def test_low_precision_uses_top_k_membership():
    hf = _hf([2, 0], [[0.0, 3.0, 5.0, -9.0], [4.0, 1.0, 0.0, 0.5]])
    near = _engine([1, 0], hf, k=2)  # engine picked HF's second choice: inside both top-2
    greedy, logprobs = check_greedy([near], [hf], low_precision=True, atol=2e-3, num_logprobs=2)
    assert greedy.passed and logprobs.passed
    far = _engine([3, 0], hf, k=2)  # HF's last choice: outside HF's top-2
    far.logprobs[0] = {3: -0.1, 2: -1.0}
    greedy, logprobs = check_greedy([far], [hf], low_precision=True, atol=2e-3, num_logprobs=2)
    assert not greedy.passed and not logprobs.passed


def test_error_ratio():
    hf32 = torch.randn(10, 50)
    hf_low = hf32 + 0.01 * torch.randn(10, 50)
    good = hf32 + 0.01 * torch.randn(10, 50)
    bad = hf32 + 0.05 * torch.randn(10, 50)
    assert check_prefill(good, hf_low, low_precision=True, atol=0, hf_fp32=hf32).metrics["error_ratio"] < 1.2
    result = check_prefill(bad, hf_low, low_precision=True, atol=0, hf_fp32=hf32)
    assert not result.passed and result.metrics["error_ratio"] > 3


def test_nan_logits_fail():
    ref = torch.randn(4, 8)
    assert not check_prefill(torch.full_like(ref, float("nan")), ref, low_precision=False, atol=1.0).passed


# ---------------------------------------------------------------- blame rules


def _point(name, order, ok, input_ok=True, matched=True):
    return {"module": name, "order": order, "matched": matched, "ok": ok, "input_ok": input_ok,
            "max_abs": 0.0 if ok else 0.5, "max_rel": 0.0 if ok else 0.1}


def test_blame_inputs_agree_names_the_module_itself():
    points = [_point("m.a", 1, True), _point("m.b", 2, False), _point("m", 3, False)]
    assert blame(points)["module"] == "m.b"


def test_blame_inputs_differ_names_the_enclosing_module_and_suspects():
    points = [
        _point("m.l.attn.qkv", 1, True),
        _point("m.l.attn.rot", 2, None, matched=False),
        _point("m.l.attn.core", 3, False, input_ok=False),
        _point("m.l.attn", 4, False, input_ok=True),
    ]
    d = blame(points)
    assert d["module"] == "m.l.attn" and d["first_differing_point"] == "m.l.attn.core"
    assert d["suspects"] == ["m.l.attn.rot"]
    assert blame([_point("x", 1, True)]) is None


# ---------------------------------------------------------------- weight report


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    cfg_dir = tmp_path_factory.mktemp("gqa_cfg")
    LlamaConfig(num_attention_heads=32, num_key_value_heads=8, architectures=["LlamaForCausalLM"]).save_pretrained(cfg_dir)
    ckpt = make_tiny_checkpoint(str(cfg_dir), tmp_path_factory.mktemp("gqa"))
    hf_config = checkpoint.load_config(ckpt)
    assert hf_config.num_key_value_heads < hf_config.num_attention_heads
    return ckpt, hf_config


def _report_for(source: str, path: Path, ckpt, hf_config):
    path.write_text(source)
    cls = engine_side.resolve_model_class(hf_config, path)
    model = engine_side.build_model(cls, hf_config, torch.float32, "cpu")
    return load_with_report(model, ckpt)


def test_weight_report_clean_for_the_correct_model(gqa_llama, tmp_path):
    ckpt, hf_config = gqa_llama
    report = _report_for(Path(hand_written_llama.__file__).read_text(), tmp_path / "ok.py", ckpt, hf_config)
    assert report.ok, report.problems()


def test_weight_report_names_a_partly_filled_fused_parameter(gqa_llama, tmp_path):
    ckpt, hf_config = gqa_llama
    source = Path(hand_written_llama.__file__).read_text()
    line = '        ("qkv_proj", "v_proj", "v"),\n'
    assert source.count(line) == 1
    report = _report_for(source.replace(line, ""), tmp_path / "no_v.py", ckpt, hf_config)
    assert "model.layers.0.self_attn.qkv_proj.weight" in report.partial_params
    assert "model.layers.0.self_attn.v_proj.weight" in report.unused_keys
    assert not report.ok


def test_weight_report_shape_mismatch_with_gqa_qk_swap(gqa_llama, tmp_path):
    ckpt, hf_config = gqa_llama
    source = Path(hand_written_llama.__file__).read_text()
    swapped = source.replace('("qkv_proj", "q_proj", "q")', '("qkv_proj", "q_proj", "K")').replace(
        '("qkv_proj", "k_proj", "k")', '("qkv_proj", "k_proj", "q")').replace('"K")', '"k")')
    report = _report_for(swapped, tmp_path / "swap.py", ckpt, hf_config)
    assert any("model.layers.0.self_attn.q_proj.weight" in s for s in report.shape_errors), report.problems()


def test_tied_checkpoint_with_its_own_head(tmp_path):
    """A tied config whose checkpoint still stores lm_head.weight: fine when it equals the embedding,
    an error (the head would be silently discarded) when it does not."""
    cfg_dir = tmp_path / "cfg"
    LlamaConfig(tie_word_embeddings=True, architectures=["LlamaForCausalLM"]).save_pretrained(cfg_dir)
    ckpt = make_tiny_checkpoint(str(cfg_dir), tmp_path / "tied")
    hf_config = checkpoint.load_config(ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert hf_config.tie_word_embeddings and "lm_head.weight" not in tensors
    embedding = tensors["model.embed_tokens.weight"]
    for head, ok in ((embedding.clone(), True), (torch.randn_like(embedding), False)):
        save_file({**tensors, "lm_head.weight": head}, str(ckpt / "model.safetensors"))
        report = _report_for(Path(hand_written_llama.__file__).read_text(), tmp_path / "llama.py", ckpt, hf_config)
        assert report.ok is ok, report.problems()
        assert "lm_head.weight" in report.ignored_keys
