"""`return_dict` is True on the engine: forwards return their output object, which the later passes
reduce to hidden states / logits.

Older files take a `return_dict` parameter, default it from the config
(`return_dict = return_dict if return_dict is not None else self.config.return_dict`) and return a
plain tuple when it is False. The defaulting assignment goes and reads of the parameter become True,
so the tuple branch folds away and the parameter is pruned with its call-site arguments.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Context, Pass
from porter.convert.cst_util import ReadNamesOnly, param_names, target_names

_FLAG = "return_dict"


class _ReturnDict(ReadNamesOnly, Pass):
    name = "return_dict"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.active: list[bool] = []

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.active.append(_FLAG in param_names(node))

    def leave_FunctionDef(self, original, updated):
        if self.active.pop():
            self.note(original, f"{original.name.value}: `{_FLAG}` is True (the engine reads the output object)")
        return updated

    def _on(self) -> bool:
        return bool(self.active) and self.active[-1]

    def leave_SimpleStatementLine(self, original, updated):
        if self._on() and len(updated.body) == 1 and isinstance(updated.body[0], cst.Assign) and \
                any(target_names(t.target) == [_FLAG] for t in original.body[0].targets):
            return cst.RemoveFromParent()
        return updated

    def leave_Name(self, original, updated):
        return cst.Name("True") if self._on() and updated.value == _FLAG else updated


def normalise_return_dict(module: cst.Module, ctx: Context) -> cst.Module:
    if _FLAG not in module.code:
        return module
    return module.visit(_ReturnDict(ctx))
