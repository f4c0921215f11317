"""Plant single faults in a correct engine Llama and check that verify fails and names the module.

Two correct files: the `porter convert` output of transformers' modeling_llama.py, and the hand-written
engine/models/llama.py (fused norms, per-attention rotary module). One tiny checkpoint (MHA so swapped
q/k shards still load, attention_bias so a dropped bias shows) and one HF reference run are shared by
every fault (module-scoped fixtures).
"""
from pathlib import Path

import pytest
from transformers import LlamaConfig

import porter.engine.models.llama as hand_written_llama
from porter.convert import convert_file
from porter.verify import checkpoint
from porter.verify.engine_side import resolve_model_class
from porter.verify.model_source import ModelSource
from porter.verify.run import VerifyOptions, check_engine, cpu_threads, reference_run
from porter.verify.tiny import make_tiny_checkpoint

HAND_WRITTEN = Path(hand_written_llama.__file__).read_text()

# name -> (text in the correct file, planted replacement, module verify must name)
HAND_WRITTEN_FAULTS = {
    "dropped_o_proj_bias": (
        "self.hidden_size, bias=bias,",
        "self.hidden_size, bias=False,",
        "model.layers.0.self_attn.o_proj",
    ),
    "swapped_qk_shard_ids": (
        '("qkv_proj", "q_proj", "q"),\n        ("qkv_proj", "k_proj", "k"),',
        '("qkv_proj", "q_proj", "k"),\n        ("qkv_proj", "k_proj", "q"),',
        "model.layers.0.self_attn.qkv_proj",
    ),
    "wrong_rope_base": (
        'rope_parameters=getattr(config, "rope_parameters", None)',
        'rope_parameters={**config.rope_parameters, "rope_theta": 10 * config.rope_parameters["rope_theta"]}',
        "model.layers.0.self_attn",
    ),
    "norm_unit_offset": (
        'eps=config.rms_norm_eps, prefix=f"{prefix}.input_layernorm"',
        'eps=config.rms_norm_eps, unit_offset=True, prefix=f"{prefix}.input_layernorm"',
        "model.layers.0.input_layernorm",
    ),
    "wrong_norm_eps": (
        'eps=config.rms_norm_eps,\n                                                prefix=f"{prefix}.post_attention_layernorm"',
        'eps=1e-2,\n                                                prefix=f"{prefix}.post_attention_layernorm"',
        "model.layers.0.post_attention_layernorm",
    ),
    "query_position_off_by_one": (
        "q, k = self.rotary_emb(positions, q, k)",
        "q, k = self.rotary_emb(positions + 1, q)[0], self.rotary_emb(positions, k)[0]",
        "model.layers.0.self_attn",
    ),
    "wrong_attention_scale": (
        "self.head_dim ** -0.5,",
        "self.hidden_size ** -0.5,",
        "model.layers.0.self_attn.attn",
    ),
}

CONVERTED_FAULTS = {
    "dropped_o_proj_bias": (
        'bias=config.attention_bias,\n            prefix=f"{prefix}.o_proj"',
        'bias=False,\n            prefix=f"{prefix}.o_proj"',
        "model.layers.0.self_attn.o_proj",
    ),
    "swapped_qk_shard_ids": (
        '("qkv_proj", "q_proj", "q"),\n            ("qkv_proj", "k_proj", "k"),',
        '("qkv_proj", "q_proj", "k"),\n            ("qkv_proj", "k_proj", "q"),',
        "model.layers.0.self_attn.qkv_proj",
    ),
    "wrong_rope_base": (  # the converted file keeps HF's shared rotary module, which HF also has
        'base = config.rope_parameters["rope_theta"]',
        'base = 10 * config.rope_parameters["rope_theta"]',
        "model.rotary_emb",
    ),
    "norm_unit_offset": (
        'eps=config.rms_norm_eps,\n            prefix=f"{prefix}.input_layernorm"',
        'eps=config.rms_norm_eps,\n            unit_offset=True,\n            prefix=f"{prefix}.input_layernorm"',
        "model.layers.0.input_layernorm",
    ),
    "wrong_norm_eps": (
        'eps=config.rms_norm_eps,\n            prefix=f"{prefix}.post_attention_layernorm"',
        'eps=1e-2,\n            prefix=f"{prefix}.post_attention_layernorm"',
        "model.layers.0.post_attention_layernorm",
    ),
    "query_position_off_by_one": (  # rope is relative: only a q/k offset shows
        "query_states, key_states = apply_rotary_cos_sin(query_states, key_states, cos, sin)",
        "query_states, _ = apply_rotary_cos_sin(query_states, key_states, cos.roll(-1, 0), sin.roll(-1, 0))\n"
        "        _, key_states = apply_rotary_cos_sin(key_states, key_states, cos, sin)",
        "model.layers.0.self_attn",
    ),
    "wrong_attention_scale": (
        "self.scaling = self.head_dim**-0.5",
        "self.scaling = config.hidden_size**-0.5",
        "model.layers.0.self_attn.attn",
    ),
}
SOURCES = {"hand_written": HAND_WRITTEN_FAULTS, "converted": CONVERTED_FAULTS}


@pytest.fixture(scope="module")
def converted_llama() -> str:
    import transformers.models.llama.modeling_llama as hf_llama

    return convert_file(hf_llama.__file__, model_type="llama").code


@pytest.fixture
def correct_source(request, converted_llama) -> str:
    return converted_llama if request.param == "converted" else HAND_WRITTEN


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    cfg_dir = tmp_path_factory.mktemp("cfg")
    config = LlamaConfig(attention_bias=True, num_attention_heads=4, num_key_value_heads=4)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(cfg_dir)
    ckpt = make_tiny_checkpoint(str(cfg_dir), tmp_path_factory.mktemp("ckpt"))
    opts = VerifyOptions(target=str(ckpt), prompts=3, max_tokens=4)
    hf_config = checkpoint.load_config(ckpt)
    with cpu_threads("cpu", ckpt):
        ref = reference_run(opts, ckpt, hf_config)
    return opts, ckpt, hf_config, ref


def _verify_source(shared, text: str, path: Path):
    opts, ckpt, hf_config, ref = shared
    path.write_text(text)
    with cpu_threads("cpu", ckpt):
        cls = resolve_model_class(hf_config, path)
        return check_engine(opts, ckpt, hf_config, cls, ModelSource(path, f"file:{path}"), ref)


@pytest.mark.parametrize("correct_source", sorted(SOURCES), indirect=True)
def test_correct_file_passes(shared, tmp_path, correct_source):
    report = _verify_source(shared, correct_source, tmp_path / "llama_ok.py")
    assert report.passed, report.to_dict()
    assert report.localisation is None


@pytest.mark.parametrize("correct_source, fault", [(src, f) for src in sorted(SOURCES) for f in sorted(SOURCES[src])],
                         indirect=["correct_source"])
def test_planted_fault_is_caught_and_located(shared, tmp_path, correct_source, fault):
    faults = HAND_WRITTEN_FAULTS if correct_source is HAND_WRITTEN else CONVERTED_FAULTS
    old, new, module = faults[fault]
    assert correct_source.count(old) == 1, f"the correct file changed: cannot plant {fault}"
    report = _verify_source(shared, correct_source.replace(old, new), tmp_path / f"llama_{fault}.py")
    assert not report.passed
    divergence = report.divergence
    assert divergence is not None, report.to_dict()
    assert divergence["module"] == module, divergence
    assert divergence["summary"].startswith(f"{module}: max abs ")
    if module == "model.layers.0.self_attn" and correct_source is HAND_WRITTEN:
        # a fault between submodules: the engine-only rotary module is the suspect
        assert "model.layers.0.self_attn.rotary_emb" in divergence["suspects"]
    if fault == "dropped_o_proj_bias":
        assert "model.layers.0.self_attn.o_proj.bias" in report.weights.unused_keys


@pytest.fixture(scope="module")
def shared_bf16(shared):
    opts, ckpt, hf_config, _ = shared
    low = VerifyOptions(target=str(ckpt), prompts=3, max_tokens=4, dtype="bfloat16")
    with cpu_threads("cpu", ckpt):
        ref = reference_run(low, ckpt, hf_config)
    return low, ckpt, hf_config, ref


@pytest.mark.parametrize("fault", ["wrong_norm_eps", "wrong_attention_scale"])
def test_bf16_fault_is_located_by_error_ratio(shared_bf16, tmp_path, fault):
    """In bf16 the correct file passes; a planted fault fails and is located by per-module error ratios
    against HF fp32 (the eps fault is below bf16's plain relative tolerance)."""
    old, new, module = HAND_WRITTEN_FAULTS[fault]
    report = _verify_source(shared_bf16, HAND_WRITTEN.replace(old, new), tmp_path / f"llama_{fault}.py")
    assert not report.passed
    prefill = next(c for c in report.checks if c.name == "prefill_logits")
    assert prefill.metrics["error_ratio"] > 1.2
    assert report.divergence["module"] == module, report.localisation
    assert report.localisation["rule"].startswith("error ratio")


def test_bf16_correct_file_passes(shared_bf16, tmp_path):
    report = _verify_source(shared_bf16, HAND_WRITTEN, tmp_path / "llama_ok.py")
    assert report.passed, report.to_dict()


def test_decode_only_fault_points_at_the_decode_path(shared, tmp_path):
    """A fault that only shows with a KV cache (decode steps): prefill and every module agree on the
    full sequences, so the report says the decode path is at fault."""
    old = "        residual = None\n"
    assert HAND_WRITTEN.count(old) == 1
    new = ("        from porter.engine.forward_context import get_forward_context\n"
           "        if get_forward_context().attn_metadata.max_query_len == 1:\n"
           "            hidden_states = hidden_states * 1.5\n" + old)
    report = _verify_source(shared, HAND_WRITTEN.replace(old, new), tmp_path / "llama_decode_fault.py")
    checks = {c.name: c.passed for c in report.checks}
    assert checks["prefill_logits"] and not checks["logprobs"]
    assert report.divergence is None
    assert "decode path" in report.localisation["hint"]
