"""Checkpoint reading (safetensors only) and the errors weight loading raises.

Error classes live here so layers, models and the loader share them without import cycles:
- `WeightShapeError`: one checkpoint tensor does not fit the parameter it was routed to.
- `CheckpointKeyError`: a model's `load_weights` found checkpoint keys that no parameter takes.
- `CheckpointMismatchError`: the loader's single summary (unfilled parameters, unused keys, shapes).
- `CheckpointFormatError`: the checkpoint directory is missing, incomplete, corrupt or pickled.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# Above this much data (or with several shards) loading shows a progress bar.
PROGRESS_MIN_BYTES = 200 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointFormatError(ValueError):
    pass


class WeightShapeError(ValueError):
    def __init__(self, name: str, expected: tuple, got: tuple, detail: str = ""):
        self.name, self.expected, self.got = name, tuple(expected), tuple(got)
        msg = f"shape mismatch for '{name}': expected {list(self.expected)}, got {list(self.got)}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class CheckpointKeyError(KeyError):
    """Checkpoint keys that no model parameter takes, collected over one whole `load_weights` call."""

    def __init__(self, unused: Iterable[str], loaded: set[str] | None = None, model: str = "model"):
        self.unused = sorted(unused)
        self.loaded = set(loaded or ())
        self.model = model
        super().__init__(self.__str__())

    def __str__(self) -> str:
        shown = "\n  ".join(self.unused[:50])
        more = f"\n  ... and {len(self.unused) - 50} more" if len(self.unused) > 50 else ""
        return (
            f"{len(self.unused)} checkpoint key(s) match no parameter of {self.model}:\n  {shown}{more}\n"
            "Rename them in load_weights (stacked_params_mapping / a name mapping) or skip them explicitly."
        )


class CheckpointMismatchError(ValueError):
    def __init__(self, missing: Iterable[str] = (), unused: Iterable[str] = (), shape_errors: Iterable[str] = ()):
        self.missing, self.unused, self.shape_errors = sorted(missing), sorted(unused), list(shape_errors)
        parts = ["the checkpoint does not match the model:"]
        for title, items in (
            ("parameters never filled from the checkpoint", self.missing),
            ("checkpoint keys no parameter takes", self.unused),
            ("shape mismatches", self.shape_errors),
        ):
            if items:
                listed = "\n    ".join(items[:50]) + (f"\n    ... and {len(items) - 50} more" if len(items) > 50 else "")
                parts.append(f"  {title} ({len(items)}):\n    {listed}")
        super().__init__("\n".join(parts))


def check_shape(name: str, param_shape, loaded: torch.Tensor, detail: str = "") -> None:
    if tuple(param_shape) != tuple(loaded.shape):
        raise WeightShapeError(name, tuple(param_shape), tuple(loaded.shape), detail)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Copy a whole tensor into a parameter that is not sharded (norm weights, biases of replicated layers)."""
    if shard_id is not None:
        raise ValueError(f"parameter {getattr(param, 'param_name', '?')} takes no shard id (got {shard_id!r})")
    if loaded_weight.dim() == 0 and param.numel() == 1:
        loaded_weight = loaded_weight.reshape(param.shape)
    check_shape(getattr(param, "param_name", "parameter"), param.shape, loaded_weight)
    param.data.copy_(loaded_weight)


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a checkpoint carries (persistent ones: in the state dict), by name. Some layers keep
    constants there (transformers' xIELU activation saves its beta and eps), and they load like weights."""
    saved = model.state_dict(keep_vars=True).keys()
    return {name: buf for name, buf in model.named_buffers() if name in saved}


def _refuse_pickles(ckpt_dir: Path) -> None:
    pickles = sorted(p.name for p in ckpt_dir.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    raise CheckpointFormatError(
        f"no *.safetensors files in {ckpt_dir}"
        + (f"; found pickled weights ({', '.join(pickles[:5])}), which porter never loads (unpickling runs "
           "arbitrary code). Convert them to safetensors first (e.g. `model.save_pretrained(dir, "
           "safe_serialization=True)` in a trusted environment)." if pickles else "")
        + " porter reads safetensors checkpoints only."
    )


def safetensors_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's shard files, in index order; every shard the index names must exist."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        if ckpt_dir.suffix != ".safetensors":
            raise CheckpointFormatError(f"{ckpt_dir} is not a .safetensors file; porter reads safetensors only")
        return [ckpt_dir]
    if not ckpt_dir.is_dir():
        raise CheckpointFormatError(f"checkpoint directory {ckpt_dir} does not exist")
    index = ckpt_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{index} is not a valid safetensors index ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (ckpt_dir / n).is_file()]
        if missing:
            raise CheckpointFormatError(
                f"{index.name} lists {len(names)} shard(s) but {len(missing)} are missing from {ckpt_dir}: "
                + ", ".join(missing)
            )
        return [ckpt_dir / n for n in names]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        _refuse_pickles(ckpt_dir)
    # Mistral-style repos ship the same weights twice: HF names, and `consolidated*` in native names
    hf_named = [f for f in files if not f.name.startswith("consolidated")]
    return hf_named or files


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointFormatError(f"cannot read {path} as safetensors (corrupt or truncated?): {e}") from None


def iterate_safetensors(ckpt_dir: str | os.PathLike, progress: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, one shard open at a time (CPU tensors).

    progress=None shows a rich progress bar when the checkpoint is large or sharded."""
    files = safetensors_files(ckpt_dir)
    total = sum(f.stat().st_size for f in files)
    if progress is None:
        progress = total > PROGRESS_MIN_BYTES or len(files) > 1
    bar = None
    if progress:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("loading weights"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                       transient=True)
        task = bar.add_task("load", total=total)
        bar.start()
    try:
        for f in files:
            with _open(f) as st:
                for name in st.keys():
                    try:
                        tensor = st.get_tensor(name)
                    except Exception as e:
                        raise CheckpointFormatError(f"cannot read tensor '{name}' from {f} (corrupt?): {e}") from None
                    yield name, tensor
            if bar is not None:
                bar.advance(task, f.stat().st_size)
    finally:
        if bar is not None:
            bar.stop()


# Checkpoint tensors that are buffers HF recomputes, never parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def is_ignored_checkpoint_key(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def stacked_param_name(name: str, stacked_params_mapping) -> tuple[str, object] | None:
    """Route a checkpoint key into a fused parameter: for the first (param_name, shard_name, shard_id)
    whose shard_name equals a whole dotted component of `name`, return (name with that component
    replaced, shard_id); else None. Matching whole components (not substrings) means `q_proj` never
    matches inside `qkv_proj`, so a name is never rewritten twice."""
    parts = name.split(".")
    for param_name, shard_name, shard_id in stacked_params_mapping:
        shard, fused = shard_name.strip("."), param_name.strip(".")
        if shard in parts:
            i = parts.index(shard)
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard_id
    return None
