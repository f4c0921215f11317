"""Build an engine model and fill it from a safetensors checkpoint, reporting every mismatch at once."""
from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from porter.engine.config import EngineConfig, set_current_engine_config
from porter.engine.weight_utils import (
    CheckpointKeyError,
    CheckpointMismatchError,
    WeightShapeError,
    default_weight_loader,
    iterate_safetensors,
)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(engine_config: EngineConfig, model_class: type[nn.Module]) -> nn.Module:
    """Construct the model with the config current, its dtype as default dtype and its device as default device."""
    with _default_dtype(engine_config.dtype), torch.device(engine_config.device), \
            set_current_engine_config(engine_config):
        return model_class(engine_config=engine_config)


@contextmanager
def _collect_shape_errors(model: nn.Module, errors: list[WeightShapeError]):
    """Wrap each parameter's weight_loader so a shape mismatch is recorded and loading goes on, giving
    one report with every mismatch instead of stopping at the first."""
    originals = {}
    for name, param in model.named_parameters():
        original = getattr(param, "weight_loader", None)
        originals[param] = original
        call = original or default_weight_loader

        def guarded(*args, _call=call, _name=name, **kwargs):
            try:
                _call(*args, **kwargs)
            except WeightShapeError as e:
                # plain parameters (no param_name) are named by their state-dict name
                errors.append(e if hasattr(args[0], "param_name") else WeightShapeError(_name, e.expected, e.got))

        param.weight_loader = guarded
    try:
        yield
    finally:
        for param, original in originals.items():
            if original is None:
                del param.weight_loader
            else:
                param.weight_loader = original


def load_weights_into(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Run model.load_weights; raise one CheckpointMismatchError listing parameters never filled,
    checkpoint keys no parameter takes and shape mismatches."""
    shape_errors: list[WeightShapeError] = []
    unused: list[str] = []
    with _collect_shape_errors(model, shape_errors):
        try:
            loaded = model.load_weights(weights)
        except CheckpointKeyError as e:
            loaded, unused = e.loaded, e.unused
    if loaded is None:  # a model that does not report what it loaded opts out of the completeness check
        loaded = {name for name, _ in model.named_parameters()}
    bad = {e.name for e in shape_errors}
    missing = [n for n, p in model.named_parameters()
               if n not in loaded and getattr(p, "param_name", n) not in bad]
    if missing or unused or shape_errors:
        raise CheckpointMismatchError(missing, unused, [str(e) for e in shape_errors])
    return set(loaded)


def load_model(engine_config: EngineConfig, model_class: type[nn.Module], ckpt_dir: str | os.PathLike,
               progress: bool | None = None) -> nn.Module:
    """Construct `model_class` for `engine_config` and load the safetensors checkpoint at `ckpt_dir`."""
    model = build_model(engine_config, model_class)
    load_weights_into(model, iterate_safetensors(ckpt_dir, progress=progress))
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook()
    return model.eval()
