"""Reading a checkpoint directory: its config and its safetensors tensors (single file or sharded)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from porter.verify.errors import VerifyInputError

INDEX = "model.safetensors.index.json"


def check_dir(path: str | Path) -> Path:
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise VerifyInputError(f"{ckpt} is not a checkpoint directory (use --tiny for a model type or config)")
    if not (ckpt / "config.json").is_file():
        raise VerifyInputError(f"{ckpt} has no config.json")
    safetensors_files(ckpt)
    return ckpt


def is_custom(ckpt: Path) -> bool:
    """Whether the checkpoint brings its own modeling code (config.json `auto_map`)."""
    return "auto_map" in json.loads((ckpt / "config.json").read_text())


def load_config(ckpt: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(ckpt), trust_remote_code=is_custom(ckpt), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a user-facing message beats a stack trace
        raise VerifyInputError(f"cannot read {ckpt / 'config.json'}: {exc}") from exc


def safetensors_files(ckpt: Path) -> list[Path]:
    """The shard files named by the index, or the directory's *.safetensors. Never pickles."""
    index = ckpt / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise VerifyInputError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [ckpt / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise VerifyInputError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise VerifyInputError(f"{ckpt} holds no *.safetensors weights (pickled .bin checkpoints are not read)")
    return files


def iter_tensors(ckpt: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name as stored on disk, tensor) for every tensor of the checkpoint."""
    for file in safetensors_files(ckpt):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - corrupt file
            if isinstance(exc, VerifyInputError):
                raise
            raise VerifyInputError(f"cannot read {file}: {exc}") from exc
