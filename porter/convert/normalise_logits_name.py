"""The LM head's output is called `logits` (the head pass reads the causal LM forward by that name).

Some files name it otherwise (`lm_logits = self.lm_head(hidden_states)`). In a class whose forward
assigns the output of its vocabulary projection (a linear onto `vocab_size`) to one other local, and
binds no `logits` of its own, that local is renamed throughout the forward.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import code, dotted, init_assignments, loads, methods, self_call_attr

_NAME = "logits"


class _Rename(cst.CSTTransformer):
    def __init__(self, old: str):
        super().__init__()
        self.old = old

    def leave_Name(self, original, updated):
        return updated.with_changes(value=_NAME) if updated.value == self.old else updated

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original, updated):
        return updated.with_changes(attr=original.attr)


def _head_attrs(cls: cst.ClassDef) -> set[str]:
    return {a for a, v in init_assignments(cls) if isinstance(v, cst.Call)
            and (dotted(v.func) or "").endswith("Linear") and "vocab_size" in code(v)}


def normalise_logits_name(module: cst.Module, ctx: Context) -> cst.Module:
    body = list(module.body)
    for i, cls in enumerate(body):
        if not isinstance(cls, cst.ClassDef) or not _head_attrs(cls) or "forward" not in methods(cls):
            continue
        fwd = methods(cls)["forward"]
        heads = _head_attrs(cls)
        targets = {code(s.body[0].targets[0].target) for s in fwd.body.body
                   if isinstance(s, cst.SimpleStatementLine) and isinstance(s.body[0], cst.Assign)
                   and self_call_attr(s.body[0].value) in heads}
        if len(targets) != 1 or _NAME in targets or _NAME in loads(fwd) or _NAME in code(fwd).split():
            continue
        old = targets.pop()
        if not old.isidentifier():
            continue
        new_fwd = fwd.with_changes(body=fwd.body.visit(_Rename(old)))
        body[i] = cls.with_changes(body=cls.body.with_changes(
            body=[new_fwd if s is fwd else s for s in cls.body.body]))
        ctx.report.change("logits_name", ctx.lines.of(fwd), f"{cls.name.value}.forward: `{old}` -> `{_NAME}` "
                                                            "(the LM head's output)")
    return module.with_changes(body=body)
