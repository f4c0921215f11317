"""Load checkpoint weights into an engine model one key at a time, and say exactly what went wrong.

One `load_weights([(key, tensor)])` call per checkpoint key attributes every outcome to its key: the
parameters it filled, an unknown key, a shape error. Parameters start as NaN, so one that a key only
partly filled (a fused qkv_proj missing its k shard) still shows, not just one never touched.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from porter.verify.checkpoint import iter_tensors

# Checkpoint entries that are derived state, never weights (transformers 4 saved some of them).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass
class WeightReport:
    unused_keys: list[str] = field(default_factory=list)  # checkpoint keys no parameter took
    ignored_keys: list[str] = field(default_factory=list)  # derived buffers, skipped on purpose
    unfilled_params: list[str] = field(default_factory=list)  # parameters no key filled
    partial_params: list[str] = field(default_factory=list)  # parameters some keys filled only in part
    shape_errors: list[str] = field(default_factory=list)  # "key: message"
    load_errors: list[str] = field(default_factory=list)  # any other exception, "key: Type: message"

    @property
    def ok(self) -> bool:
        return not (self.unused_keys or self.unfilled_params or self.partial_params or self.shape_errors or self.load_errors)

    def problems(self) -> list[str]:
        """One line per problem, for tables and error messages."""
        lines = [f"checkpoint key never loaded: {k}" for k in self.unused_keys]
        lines += [f"parameter never filled: {p}" for p in self.unfilled_params]
        lines += [f"parameter only partly filled: {p}" for p in self.partial_params]
        lines += [f"shape mismatch: {s}" for s in self.shape_errors]
        lines += [f"load error: {e}" for e in self.load_errors]
        return lines

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _is_shape_error(exc: Exception) -> bool:
    return type(exc).__name__ == "WeightShapeError" or "shape" in str(exc).lower() or "size" in str(exc).lower()


def _is_unknown_key(exc: Exception) -> bool:
    return isinstance(exc, KeyError) or "no parameter" in str(exc).lower() or "no module" in str(exc).lower()


@torch.no_grad()
def load_with_report(model: torch.nn.Module, ckpt: Path) -> WeightReport:
    report = WeightReport()
    params = dict(model.named_parameters())
    for param in params.values():
        if param.is_floating_point():
            param.fill_(float("nan"))
    filled: set[str] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    embedding = head = None
    for key, tensor in iter_tensors(ckpt):
        if key.endswith(IGNORABLE_SUFFIXES):
            report.ignored_keys.append(key)
            continue
        if key.endswith("embed_tokens.weight"):
            embedding = tensor
        try:
            loaded = model.load_weights([(key, tensor)])
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, attributed to its key
            message = f"{key}: {exc}".splitlines()[0]
            if _is_shape_error(exc):
                report.shape_errors.append(message)
            elif _is_unknown_key(exc):
                report.unused_keys.append(key)
            else:
                report.load_errors.append(f"{key}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        if loaded:
            filled |= set(loaded)
        elif tied and key == "lm_head.weight":  # a tied checkpoint's redundant head: must equal the embedding
            report.ignored_keys.append(key)
            head = tensor
        else:
            report.unused_keys.append(key)
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        report.load_errors.append("lm_head.weight: the config ties it to the embedding, but the checkpoint's "
                                  "head differs from embed_tokens.weight (set tie_word_embeddings=false?)")
    for name, param in params.items():
        if name not in filled:
            report.unfilled_params.append(name)
        elif param.is_floating_point() and torch.isnan(param).any():
            report.partial_params.append(name)
    return report
