"""A pass-through wrapper between the causal LM and the model that holds the layers, collapsed.

OPT-style files nest `OPTForCausalLM.model = OPTModel(config)` whose only submodule is
`self.decoder = OPTDecoder(config)` (the class with the ModuleList of layers), and the causal LM calls
`self.model.decoder(...)`. The causal LM then holds the inner model directly (`self.model =
OPTDecoder(config)`, calls `self.model(...)`), and load_weights renames the checkpoint's
`model.decoder.` prefix to `model.` (`ctx.checkpoint_renames`).
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import classes, code, dotted, init_assignments, methods

_IGNORED = ("config",)


def _in_file_children(cls: cst.ClassDef, names) -> list[tuple[str, str]]:
    return [(a, dotted(v.func)) for a, v in init_assignments(cls)
            if isinstance(v, cst.Call) and dotted(v.func) in names]


def _holds_layers(cls: cst.ClassDef) -> bool:
    return any(isinstance(v, cst.Call) and (dotted(v.func) or "").endswith("ModuleList") for _, v in init_assignments(cls))


def _wrapper(cls: cst.ClassDef, cls_map) -> tuple[str, str] | None:
    """(attribute, inner class) when `cls` holds one in-file module that holds the layers and nothing
    else but plain values."""
    children = _in_file_children(cls, cls_map)
    modules = [(a, v) for a, v in init_assignments(cls) if isinstance(v, cst.Call) and a not in _IGNORED]
    if len(children) == 1 and len(modules) == 1 and _holds_layers(cls_map[children[0][1]]) and not _holds_layers(cls):
        return children[0]
    return None


class _Collapse(cst.CSTTransformer):
    def __init__(self, owner: str, attr: str, wrapper: str, inner_attr: str, inner: str):
        super().__init__()
        self.owner, self.attr, self.wrapper, self.inner_attr, self.inner = owner, attr, wrapper, inner_attr, inner
        self.cls: list[str] = []

    def visit_ClassDef(self, node):
        self.cls.append(node.name.value)

    def leave_ClassDef(self, original, updated):
        self.cls.pop()
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        if not self.cls or self.cls[-1] != self.owner:
            return updated
        if dotted(updated.func) == self.wrapper:
            return updated.with_changes(func=cst.Name(self.inner))
        if code(updated.func) == f"self.{self.attr}.{self.inner_attr}":
            return updated.with_changes(func=cst.parse_expression(f"self.{self.attr}"))
        return updated


def normalise_wrapper(module: cst.Module, ctx: Context) -> cst.Module:
    cls_map = classes(module)
    for owner, cls in cls_map.items():
        for attr, child in _in_file_children(cls, cls_map):
            got = _wrapper(cls_map[child], cls_map)
            if got is None or "forward" not in methods(cls_map[child]):
                continue
            inner_attr, inner = got
            # the owner must be what holds the LM head: it never reaches into the wrapper otherwise
            if f"self.{attr}.{inner_attr}" not in code(cls):
                continue
            module = module.visit(_Collapse(owner, attr, child, inner_attr, inner))
            ctx.checkpoint_renames.append((rf"^{attr}\.{inner_attr}\.", f"{attr}."))
            ctx.report.change("wrapper", ctx.lines.of(cls), f"{owner}.{attr}: the pass-through {child} collapsed to "
                                                          f"{inner} (checkpoint `{attr}.{inner_attr}.` -> `{attr}.`)")
            return module
    return module
