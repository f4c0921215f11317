"""engine_norms pass: HF RMSNorm classes whose code is the engine RMSNorm's math become the engine layer
(same eps, a prefix, same state-dict names); look-alikes with other numerics are kept and noted."""
from __future__ import annotations

import ast

import pytest
import torch
from transformers import AutoModelForCausalLM

from porter.convert import convert_file
from porter.convert.engine_norms import engine_norms
from porter.convert.source import resolve_source
from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.layers.layernorm import RMSNorm
from porter.engine.weight_utils import iterate_safetensors

from convert_pass_helpers import run_pass

from test_convert_models import PROMPT_LENS, load_module, tiny_config

LLAMA_NORM = '''class MyRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        """docstring"""
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return FINAL

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
'''

GEMMA_NORM = '''class MyRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)
'''

BLOCK = '''class Block(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        self.input_layernorm = MyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norms = nn.ModuleList([MyRMSNorm(config.hidden_size) for i in range(2)])
        self.o_proj = RowParallelLinear(4, 4, prefix=f"{prefix}.o_proj")

    def forward(self, x):
        return self.o_proj(self.input_layernorm(x))
'''

HEAD = "import torch\nfrom torch import nn\n\nfrom porter.engine.layers.linear import RowParallelLinear\n\n\n"


def run(source: str):
    return run_pass(engine_norms, source)


def llama(final: str = "self.weight * hidden_states.to(input_dtype)") -> str:
    return HEAD + LLAMA_NORM.replace("FINAL", final) + "\n\n" + BLOCK


def test_llama_form_becomes_engine_rmsnorm_with_eps_and_prefix():
    out, notes = run(llama())
    assert out == HEAD.replace(
        "from porter.engine.layers.linear", "from porter.engine.layers.layernorm import RMSNorm\n"
                                            "from porter.engine.layers.linear") + BLOCK.replace(
        "MyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)",
        'RMSNorm(config.hidden_size, eps=config.rms_norm_eps, prefix=f"{prefix}.input_layernorm")').replace(
        "MyRMSNorm(config.hidden_size)", 'RMSNorm(config.hidden_size, eps=1e-6, prefix=f"{prefix}.norms.{i}")')
    assert notes == ["MyRMSNorm -> engine RMSNorm in 2 construction(s); class dropped"]


def test_weight_on_either_side_of_the_cast_product_is_the_same_norm():
    out, _ = run(llama("hidden_states.to(input_dtype) * self.weight"))
    assert "class MyRMSNorm" not in out and "RMSNorm(config.hidden_size" in out


def test_unit_offset_form_maps_to_the_engine_offset_variant():
    out, notes = run(HEAD + GEMMA_NORM + "\n\n" + BLOCK)
    assert "class MyRMSNorm" not in out
    assert 'RMSNorm(config.hidden_size, eps=config.rms_norm_eps, unit_offset=True, ' \
           'prefix=f"{prefix}.input_layernorm")' in out
    assert "unit_offset" in notes[0]


@pytest.mark.parametrize("source, why", [
    (llama("(self.weight * hidden_states).to(input_dtype)"), "castx(mul("),  # weight applied in fp32
    (llama("self.weight.to(input_dtype) * hidden_states.to(input_dtype)"), "castx(w)"),  # weight cast first
    (llama("self.weight * hidden_states.to(input_dtype)").replace("mean(-1,", "mean(1,"), "last dim"),
    (llama().replace("hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
                     "hidden_states / torch.sqrt(variance + self.variance_epsilon)"), "torch.sqrt"),
    (llama().replace("variance = hidden_states.pow(2)",
                     "hidden_states = hidden_states - hidden_states.mean(-1, keepdim=True)\n"
                     "        variance = hidden_states.pow(2)"), "hidden_states - "),  # LayerNorm
    (HEAD + GEMMA_NORM.replace("torch.zeros(dim)", "torch.ones(dim)") + "\n\n" + BLOCK, "ones(hidden)"),
], ids=["weight-in-fp32", "weight-cast-first", "other-dim", "sqrt-division", "layernorm", "offset-with-ones"])
def test_look_alikes_are_kept_and_noted(source, why):
    out, notes = run(source)
    assert out == source
    assert len(notes) == 1 and notes[0].startswith("MyRMSNorm kept: normalises but is not the engine RMSNorm")
    assert why in notes[0]


def test_other_uses_of_the_class_or_its_attributes_keep_it():
    isinstance_use = llama() + "\n\ndef is_norm(m):\n    return isinstance(m, MyRMSNorm)\n"
    out, notes = run(isinstance_use)
    assert out == isinstance_use and "used other than as a constructor" in notes[0]
    attr_read = llama().replace("return self.o_proj(self.input_layernorm(x))",
                                "return self.o_proj(x * self.input_layernorm.variance_epsilon)")
    out, notes = run(attr_read)
    assert out == attr_read and "variance_epsilon" in notes[0]


def test_a_module_level_rmsnorm_name_gets_an_aliased_engine_import():
    other = "class RMSNorm(nn.Module):\n    pass\n\n\n"
    out, _ = run(llama().replace("class MyRMSNorm", other + "class MyRMSNorm"))
    assert "from porter.engine.layers.layernorm import RMSNorm as EngineRMSNorm" in out
    assert "EngineRMSNorm(config.hidden_size, eps=config.rms_norm_eps" in out
    assert "class RMSNorm(nn.Module)" in out


@pytest.mark.parametrize("name, unit_offset", [("LlamaRMSNorm", False), ("Qwen3RMSNorm", False),
                                               ("Gemma2RMSNorm", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_norm_equals_hf_norm_bit_for_bit_on_cpu(name, unit_offset, dtype):
    import importlib

    module = importlib.import_module(f"transformers.models.{name[:-7].lower()}.modeling_{name[:-7].lower()}")
    torch.manual_seed(0)
    hf = getattr(module, name)(48, eps=1e-5).to(dtype)
    engine = RMSNorm(48, eps=1e-5, unit_offset=unit_offset, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(48) * 0.5)
        engine.weight.copy_(hf.weight)
    x = (torch.randn(5, 3, 48) * 3).to(dtype)
    with torch.no_grad():
        assert torch.equal(engine(x), hf(x))


def convert_with_engine_norms(model_type: str, path) -> tuple[object, str]:
    """The converted file (the pipeline runs engine_norms)."""
    result = convert_file(resolve_source(model_type)[0], model_type=model_type)
    path.write_text(result.code)
    return load_module(path, f"porter_test_norms_{model_type}"), result.architecture


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_converted_files_use_the_engine_rmsnorm_under_hf_names(model_type, tmp_path):
    mod, arch = convert_with_engine_norms(model_type, tmp_path / "engine.py")
    code = (tmp_path / "engine.py").read_text()
    tree = ast.parse(code)
    assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef) and "rsqrt" in ast.unparse(n)]
    assert "from porter.engine.layers.layernorm import RMSNorm" in code
    cfg = tiny_config(model_type)
    ec = EngineConfig(hf_config=cfg)
    with set_current_engine_config(ec):
        model = getattr(mod, arch)(engine_config=ec)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    per_layer = 4 if model_type == "qwen3" else 2
    assert len(norms) == per_layer * cfg.num_hidden_layers + 1
    assert "model.norm" in norms and "model.layers.0.input_layernorm" in norms
    for name, norm in norms.items():
        assert norm.weight.param_name == f"{name}.weight"  # prefix threaded to the state-dict name
        assert norm.eps == cfg.rms_norm_eps


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_converted_model_with_engine_norms_matches_hf(model_type, tmp_path):
    cfg = tiny_config(model_type)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # norm weights away from their ones/zeros init, so a wrong offset shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path / "ckpt")
    mod, arch = convert_with_engine_norms(model_type, tmp_path / "engine.py")
    ec = EngineConfig(hf_config=cfg)
    with set_current_engine_config(ec):
        model = getattr(mod, arch)(engine_config=ec)
    model.load_weights(iterate_safetensors(tmp_path / "ckpt"))
    assert any(isinstance(m, RMSNorm) for m in model.modules())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in PROMPT_LENS]
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENS])
    with torch.no_grad(), set_forward_context(AttentionMetadata.for_prefill(PROMPT_LENS)):
        logits = model.compute_logits(model(torch.cat(prompts), positions))
    start = 0
    with torch.no_grad():
        for p in prompts:
            torch.testing.assert_close(logits[start:start + len(p)], hf(p[None]).logits[0], atol=1e-4, rtol=1e-4)
            start += len(p)
