"""Checkpoint loading from safetensors: single file, sharded, and every error path."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

from porter.engine.config import EngineConfig
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.loader import load_model
from porter.engine.models.llama import LlamaForCausalLM
from porter.engine.weight_utils import CheckpointFormatError, CheckpointMismatchError, iterate_safetensors


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, attn_implementation="eager")
    return HFLlama(config).eval()


def state(hf):
    return {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}


def write_sharded(path, tensors, n_shards=2):
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n_shards]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def logits(model, ids):
    with torch.no_grad(), set_forward_context(AttentionMetadata.for_prefill([len(ids)])):
        return model.compute_logits(model(ids, torch.arange(len(ids))))


@pytest.mark.parametrize("sharded", [False, True])
def test_load_matches_hf(tmp_path, hf_model, sharded):
    tensors = state(hf_model)
    if sharded:
        write_sharded(tmp_path, tensors, 3)
    else:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    assert {k for k, _ in iterate_safetensors(tmp_path, progress=sharded)} == set(tensors)
    model = load_model(EngineConfig(hf_config=hf_model.config), LlamaForCausalLM, tmp_path)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    torch.testing.assert_close(logits(model, ids), hf_model(ids[None]).logits[0].detach(), atol=1e-5, rtol=1e-5)
    assert not model.training


def test_dtype_and_default_dtype_restored(tmp_path, hf_model):
    save_file(state(hf_model), str(tmp_path / "model.safetensors"))
    model = load_model(EngineConfig(hf_config=hf_model.config, dtype=torch.bfloat16), LlamaForCausalLM, tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_missing_shard_named(tmp_path, hf_model):
    write_sharded(tmp_path, state(hf_model), 2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00002.safetensors"):
        list(iterate_safetensors(tmp_path))


def test_corrupt_file_named(tmp_path, hf_model):
    f = tmp_path / "model.safetensors"
    save_file(state(hf_model), str(f))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match="model.safetensors"):
        list(iterate_safetensors(tmp_path))


def test_pickles_refused_without_loading(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointFormatError, match="safetensors checkpoints only") as e:
        list(iterate_safetensors(tmp_path))
    assert "pytorch_model.bin" in str(e.value)
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        list(iterate_safetensors(tmp_path / "nowhere"))


def test_one_error_lists_missing_unused_and_shapes(tmp_path, hf_model):
    tensors = state(hf_model)
    del tensors["model.norm.weight"]
    del tensors["lm_head.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)  # expected [16, 32]
    tensors["model.layers.0.post_attention_layernorm.weight"] = torch.zeros(31)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        load_model(EngineConfig(hf_config=hf_model.config), LlamaForCausalLM, tmp_path)
    err = e.value
    assert err.missing == ["lm_head.weight", "model.norm.weight"]
    assert err.unused == ["model.layers.0.mlp.extra.weight"]
    assert len(err.shape_errors) == 2
    msg = str(err)
    assert "model.layers.0.self_attn.qkv_proj.weight" in msg and "[16, 32]" in msg and "[8, 32]" in msg
    assert "model.layers.0.post_attention_layernorm.weight" in msg and "[31]" in msg


def test_bad_index_file(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not a valid safetensors index"):
        list(iterate_safetensors(tmp_path))


def test_progress_bar_for_sharded_or_large(tmp_path, hf_model, monkeypatch):
    import rich.progress

    from porter.engine import weight_utils

    seen = []

    class Recorder(rich.progress.Progress):
        def advance(self, task, advance=1):
            seen.append(advance)
            super().advance(task, advance)

    monkeypatch.setattr(rich.progress, "Progress", Recorder)
    tensors = state(hf_model)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    list(iterate_safetensors(tmp_path))  # small single file: no bar
    assert seen == []
    monkeypatch.setattr(weight_utils, "PROGRESS_MIN_BYTES", 1)
    list(iterate_safetensors(tmp_path))
    assert seen == [(tmp_path / "model.safetensors").stat().st_size]
    seen.clear()
    monkeypatch.setattr(weight_utils, "PROGRESS_MIN_BYTES", 10 ** 12)
    shards = tmp_path / "sharded"
    shards.mkdir()
    write_sharded(shards, tensors, 2)
    list(iterate_safetensors(shards))  # several shards: a bar, advanced per shard
    assert len(seen) == 2


def test_consolidated_duplicate_skipped(tmp_path, hf_model):
    tensors = state(hf_model)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    save_file({"layers.0.attention.wq.weight": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    assert {k for k, _ in iterate_safetensors(tmp_path)} == set(tensors)
