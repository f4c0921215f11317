"""transformers' conversion_mapping.py, read as source: how each model's checkpoint keys map to its modules.

transformers 5 loads (and saves) some checkpoints under older key names than its modules use: per-expert
weights that load into one fused parameter, renamed submodules. The converted model's load_weights must do
the same. The file is parsed, not imported (importing it pulls in torch and the loading machinery), and
its entries are built two ways, both honoured here:
- dict literals: `mapping = {"mixtral": [WeightConverter(...), ...], ...}` and aliases
  `{"qwen3_moe": "qwen2_moe", ...}` (a model type that shares another's mapping);
- statements after the literal, in source order: `mapping["laguna"] = mapping["qwen2_moe"].copy()`,
  `mapping["laguna"] += [WeightRenaming(...)]`, `mapping["x"] += mapping["y"].copy()`.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def conversion_entries() -> tuple[dict[str, list[ast.Call]], dict[str, str]]:
    """(key -> its transform calls in order, alias -> key) from the installed transformers."""
    try:
        import transformers
    except ImportError:
        return {}, {}
    path = Path(transformers.__file__).parent / "conversion_mapping.py"
    if not path.is_file():
        return {}, {}
    tree = ast.parse(path.read_text())
    entries: dict[str, list[ast.Call]] = {}
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                continue
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                aliases.setdefault(key.value, value.value)
            elif isinstance(value, ast.List):
                entries.setdefault(key.value, []).extend(c for c in value.elts if isinstance(c, ast.Call))
    for stmt in _statements(tree.body):
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            key = _entry_key(stmt.targets[0])
            calls = _calls(stmt.value, entries)
            if key is not None and calls is not None:
                entries[key] = calls
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            key = _entry_key(stmt.target)
            calls = _calls(stmt.value, entries)
            if key is not None and calls is not None:
                entries.setdefault(key, []).extend(calls)
    return entries, aliases


def _statements(body):
    """Every statement, nested ones included, in source order."""
    for stmt in body:
        yield stmt
        for field in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(stmt, field, None) or [])
        for handler in getattr(stmt, "handlers", None) or []:
            yield from _statements(handler.body)


def _entry_key(node) -> str | None:
    """`mapping["laguna"]` -> "laguna"."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.slice.value
    return None


def _calls(node, entries) -> list[ast.Call] | None:
    """The transforms an assigned value stands for: a list of calls, or another entry (`.copy()` or not)."""
    if isinstance(node, ast.List):
        return [c for c in node.elts if isinstance(c, ast.Call)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "copy" \
            and not node.args:
        node = node.func.value
    key = _entry_key(node)
    return list(entries.get(key, [])) if key is not None else None
