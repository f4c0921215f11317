"""Per-expert checkpoint keys for FusedMoE, compiled from transformers' conversion_mapping.py.

transformers 5 keeps experts stacked in memory (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj`)
but saves and loads per-expert keys (`experts.3.w1.weight`, ...). conversion_mapping.py says how, per
model type, with WeightConverters such as

    WeightConverter([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj",
                    operations=[MergeModulelist(dim=0), Concatenate(dim=1)])

(the first source becomes the gate rows, the second the up rows). The file is read as source, never
imported, and the names are baked into the generated `load_weights` as FusedMoE's expert mapping, so
transformers' loader is never called at run time.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

from porter.convert.hf_conversion_mapping import conversion_entries


@dataclass(frozen=True)
class ExpertKeys:
    gate: str  # checkpoint module name of one expert's gate projection, e.g. "w1" or "gate_proj"
    up: str
    down: str


def _converters() -> tuple[dict[str, list[ast.Call]], dict[str, str]]:
    """(key -> its WeightConverter calls, alias -> key) from the installed conversion_mapping.py."""
    entries, aliases = conversion_entries()
    calls = {k: [c for c in v if getattr(c.func, "id", "") == "WeightConverter"] for k, v in entries.items()}
    return {k: v for k, v in calls.items() if v}, aliases


def _strings(node: ast.AST | None) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def _operations(node: ast.AST | None) -> list[tuple[str, object]]:
    if not isinstance(node, ast.List):
        return []
    out = []
    for c in node.elts:
        if isinstance(c, ast.Call):
            dims = [k.value.value for k in c.keywords if k.arg == "dim" and isinstance(k.value, ast.Constant)]
            dims += [a.value for a in c.args if isinstance(a, ast.Constant)]
            out.append((getattr(c.func, "id", "?"), dims[0] if dims else None))
    return out


def _expert_module(pattern: str) -> str | None:
    """".experts.*.w1.weight" -> "w1"."""
    head, sep, tail = pattern.partition("experts.*.")
    if not sep or not tail.endswith(".weight") or "*" in tail:
        return None
    return tail[: -len(".weight")]


def expert_keys(keys: list[str | None], gate_up: str, down: str) -> tuple[ExpertKeys | None, int]:
    """The per-expert checkpoint names for a stacked (gate_up, down) pair, from the first of `keys`
    (class name, model type) that conversion_mapping.py has; and how many WeightConverters that
    accounts for (the caller refuses any others)."""
    calls, aliases = _converters()
    for key in keys:
        if not key:
            continue
        key = key if key in calls else aliases.get(key, key)
        if key not in calls:
            continue
        gate = up = dn = None
        used = 0
        for call in calls[key]:
            kw = {k.arg: k.value for k in call.keywords}
            for name, value in zip(("source_patterns", "target_patterns"), call.args):
                kw.setdefault(name, value)
            src, dst, ops = _strings(kw.get("source_patterns")), _strings(kw.get("target_patterns")), \
                _operations(kw.get("operations"))
            if not src or not dst or len(dst) != 1:
                continue
            mods = [_expert_module(s) for s in src]
            if None in mods:
                continue
            if dst[0].endswith(f"experts.{gate_up}") and len(mods) == 2 and \
                    ops == [("MergeModulelist", 0), ("Concatenate", 1)]:
                gate, up = mods
                used += 1
            elif dst[0].endswith(f"experts.{down}") and len(mods) == 1 and ops == [("MergeModulelist", 0)]:
                dn = mods[0]
                used += 1
        if gate and up and dn:
            return ExpertKeys(gate, up, dn), used
        return None, 0
    return None, 0


def expert_params_mapping(moe_experts: dict[str, str], keys: list[str | None], other: list[str]) -> str | None:
    """The expression of FusedMoE's checkpoint mapping for the generated load_weights (None without
    experts). Removes from `other` (conversion kinds the caller would refuse) the expert merges it covers."""
    if not moe_experts:
        return None
    parts = []
    for gate_up, down in moe_experts.items():
        found, used = expert_keys(keys, gate_up, down)
        for _ in range(used):
            if "WeightConverter" in other:  # absent when the mapping came through a model-type alias
                other.remove("WeightConverter")
        if found is not None:
            parts.append(f'FusedMoE.make_expert_params_mapping("{found.gate}", "{found.down}", "{found.up}", '
                         "num_experts)")
        # the stacked in-memory layout too (what a checkpoint without a conversion mapping holds), matched
        # from the dot before `experts` so `shared_experts.down_proj` is not taken for it
        parts.append(f'[(".experts.w13_weight", ".experts.{gate_up}", None, "w13"), '
                     f'(".experts.w2_weight", ".experts.{down}", None, "w2")]')
    return " + ".join(parts)


def mapping_alias(model_type: str | None) -> str | None:
    """The model type whose conversion mapping `model_type` shares (`_MODEL_TO_CONVERSION_PATTERN`)."""
    return _converters()[1].get(model_type) if model_type else None
