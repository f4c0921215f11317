"""ModelRegistry: built-in, lazy string registration, resolve order, errors, entry points, model files."""
import textwrap
from pathlib import Path
from importlib.metadata import EntryPoint

import pytest
from torch import nn

from porter.engine.models import registry as reg
from porter.engine.models.llama import LlamaForCausalLM
from porter.engine.models.registry import UnknownArchitectureError, _ModelRegistry


@pytest.fixture
def registry():
    return _ModelRegistry()


def test_builtin_llama_resolves_lazily(registry):
    assert isinstance(registry._models["LlamaForCausalLM"], str)
    assert registry.resolve(["LlamaForCausalLM"]) is LlamaForCausalLM
    assert reg.ModelRegistry.resolve("LlamaForCausalLM") is LlamaForCausalLM


def test_register_string_and_class_and_resolve_order(registry):
    registry.register_model("MyLlama", "porter.engine.models.llama:LlamaForCausalLM")
    assert registry.resolve(["Unknown", "MyLlama"]) is LlamaForCausalLM

    class Foo(nn.Module):
        pass

    registry.register_model("FooForCausalLM", Foo)
    assert registry.resolve(["FooForCausalLM", "MyLlama"]) is Foo
    with pytest.raises(ValueError, match="module:Class"):
        registry.register_model("Bad", "no_colon")
    with pytest.raises(TypeError, match="nn.Module"):
        registry.register_model("Bad", int)
    registry.register_model("Broken", "porter.engine.models.llama:Nope")
    with pytest.raises(ImportError, match="'Broken' is registered as 'porter.engine.models.llama:Nope'"):
        registry.resolve(["Broken"])


def test_unknown_architecture_message(registry):
    with pytest.raises(UnknownArchitectureError) as e:
        registry.resolve(["GPTBigCodeForCausalLM"])
    msg = str(e.value)
    assert "GPTBigCodeForCausalLM" in msg and "LlamaForCausalLM" in msg
    assert "porter convert" in msg and "--model-file" in msg and "model_file=" in msg


def test_entry_points_override_builtins_not_explicit(registry, monkeypatch):
    eps = [EntryPoint("LlamaForCausalLM", "plugin.mod:PluginLlama", reg.ENTRY_POINT_GROUP),
           EntryPoint("Mine", "plugin.mod:PluginMine", reg.ENTRY_POINT_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [e for e in eps if e.group == group])
    registry.register_model("Mine", LlamaForCausalLM)
    assert registry.get_supported_archs() == ["LlamaForCausalLM", "Mine"]
    assert registry._models["LlamaForCausalLM"] == "plugin.mod:PluginLlama"
    assert registry.resolve(["Mine"]) is LlamaForCausalLM


MODEL_FILE = textwrap.dedent('''
    from dataclasses import dataclass
    from torch import nn
    from porter.engine.models.llama import LlamaForCausalLM as _Imported  # imported: not registered

    @dataclass
    class Options:
        x: int = 1

    class Helper(nn.Module):
        def forward(self, x):
            return x

    class TinyForCausalLM(nn.Module):
        def __init__(self, *, engine_config, prefix=""):
            super().__init__()
        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
            return input_ids
        def compute_logits(self, h):
            return h
        def load_weights(self, weights):
            return set()
''')


def test_load_model_file_registers_engine_classes(registry, tmp_path):
    f = tmp_path / "tiny_engine.py"
    f.write_text(MODEL_FILE)
    assert registry.load_model_file(f) == ["TinyForCausalLM"]
    cls = registry.resolve(["TinyForCausalLM"])
    assert cls.__name__ == "TinyForCausalLM" and cls.__module__.startswith("porter_model_file_tiny_engine")
    other = tmp_path / "sub"
    other.mkdir()
    (other / "tiny_engine.py").write_text(MODEL_FILE)  # same stem, different file: its own module
    registry.load_model_file(other / "tiny_engine.py")
    assert registry.resolve(["TinyForCausalLM"]) is not cls


def test_load_model_file_errors(registry, tmp_path):
    with pytest.raises(FileNotFoundError):
        registry.load_model_file(tmp_path / "missing.py")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines no engine model class"):
        registry.load_model_file(empty)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ImportError, match="broken.py failed: RuntimeError: boom"):
        registry.load_model_file(broken)


def test_model_file_is_used_for_its_run_without_replacing_the_builtin(tmp_path):
    """LLM(model_file=converted llama) must not change what a later LLM without model_file resolves to."""
    import porter.engine.models.llama as hand_written

    path = tmp_path / "my_llama.py"
    path.write_text(Path(hand_written.__file__).read_text())
    from_file = reg.ModelRegistry.resolve(["LlamaForCausalLM"], model_file=path)
    assert from_file is not LlamaForCausalLM and from_file.__name__ == "LlamaForCausalLM"
    assert reg.ModelRegistry.resolve(["LlamaForCausalLM"]) is LlamaForCausalLM
    assert reg.ModelRegistry.resolve(["LlamaForCausalLM"], model_file=path) is from_file  # imported once
    with pytest.raises(reg.UnknownArchitectureError, match="defines LlamaForCausalLM, but config.json's"):
        reg.ModelRegistry.resolve(["Qwen3ForCausalLM"], model_file=path)
