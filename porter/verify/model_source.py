"""Where the engine model under test comes from: a given file, a fresh conversion, or the registry.

By default verify converts the architecture's HF modeling file (the checkpoint's own auto_map code, or
the transformers module of its model type) with porter convert, so a verify run checks the converter.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from porter.verify.errors import VerifyInputError


class ConversionFailed(Exception):
    """The converter refused or crashed: verify reports it as a failure of the architecture (exit 1)."""


@dataclass
class ModelSource:
    model_file: Path | None  # None: the registry's built-in class
    label: str  # for the report: "file:...", "converted:...", "registry"


def hf_modeling_file(ckpt: Path, hf_config: PretrainedConfig) -> Path:
    """The HF modeling file that defines the checkpoint's architecture."""
    auto_map = json.loads((ckpt / "config.json").read_text()).get("auto_map", {})
    if "AutoModelForCausalLM" in auto_map:
        ref = auto_map["AutoModelForCausalLM"]
        ref = ref[0] if isinstance(ref, list) else ref
        if "--" in ref:
            raise VerifyInputError(f"auto_map points at another repository ({ref}); verify reads local code only")
        path = ckpt / f"{ref.rsplit('.', 1)[0]}.py"
        if not path.is_file():
            raise VerifyInputError(f"config.json auto_map names {ref} but {path} does not exist")
        return path
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    model_type = hf_config.model_type
    module = model_type_to_module_name(model_type)  # e.g. "kosmos-2" lives in transformers.models.kosmos2
    spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
    if spec is None or spec.origin is None:
        raise VerifyInputError(f"transformers has no modeling file for model type {model_type!r}")
    return Path(spec.origin)


def converted_model_file(ckpt: Path, hf_config: PretrainedConfig, work_dir: Path) -> Path:
    """Convert the architecture's modeling file into `work_dir` and return the engine model file."""
    from porter.convert import convert_file, convert_source  # late: the converter is optional for verify

    source = hf_modeling_file(ckpt, hf_config)
    work_dir.mkdir(parents=True, exist_ok=True)
    dest = work_dir / f"{source.stem.replace('modeling_', '')}_engine.py"
    try:
        if source.parent == ckpt.resolve() or source.parent == ckpt:
            # auto_map code: transformers imported it as package transformers_modules.<dir>, so its
            # relative imports (`from .configuration_foo import FooConfig`) resolve against that package
            package = type(hf_config).__module__.rpartition(".")[0]
            result = convert_source(source.read_text(), str(source), package=package, model_type=hf_config.model_type)
        else:
            result = convert_file(source, model_type=hf_config.model_type)
    except Exception as exc:  # noqa: BLE001 - a conversion failure is the verdict on this architecture
        raise ConversionFailed(f"porter convert failed on {source}: {type(exc).__name__}: {exc}") from exc
    dest.write_text(result.code)
    return dest


def choose(ckpt: Path, hf_config: PretrainedConfig, model_file: Path | None, builtin: bool, work_dir: Path,
           notes: list[str]) -> ModelSource:
    if model_file is not None:
        return ModelSource(model_file, f"file:{model_file}")
    if builtin:
        return ModelSource(None, "registry")
    dest = converted_model_file(ckpt, hf_config, work_dir)
    return ModelSource(dest, f"converted:{hf_modeling_file(ckpt, hf_config).name}")
