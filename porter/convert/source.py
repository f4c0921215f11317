"""What `porter convert SRC` reads: a modeling file path, or a transformers model type whose installed
modeling file is used; plus the model type from --config (a config.json or a checkpoint directory)."""
from __future__ import annotations

import json
from pathlib import Path


class SourceError(ValueError):
    pass


def resolve_source(src: str) -> tuple[Path, str | None]:
    """(modeling file, model type if SRC named one)."""
    path = Path(src)
    if path.is_file():
        return path, None
    if path.suffix == ".py" or "/" in src:
        raise SourceError(f"{src}: no such file")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    if src not in CONFIG_MAPPING_NAMES:
        close = sorted(t for t in CONFIG_MAPPING_NAMES if src.replace("-", "_") in t)[:8]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SourceError(f"{src!r} is neither a file nor a transformers model type{hint}")
    module = model_type_to_module_name(src)
    modeling = Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    if not modeling.is_file():
        raise SourceError(f"model type {src!r} has no modeling file in the installed transformers ({modeling})")
    return modeling, src


def model_type_from_config(config: str) -> str:
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SourceError(f"--config {config}: no config.json there")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"--config {path}: not valid JSON ({e})") from None
    if "model_type" not in data:
        raise SourceError(f"--config {path}: has no model_type")
    return data["model_type"]

