"""Traces of HF-only inputs that specialisation cannot see, removed up front.

- `kwargs.pop("output_attentions", None)` as a statement discards a flag the engine never passes
  (the inference facts' flags and absent inputs), so it is dropped.
- A forward's docstring that documents inputs the port removes (past_key_values, attention_mask, ...)
  describes the HF signature, not the engine one: it is dropped.
- In the base model's forward: a statement that only calls a `self.` method the class does not define
  (a PreTrainedModel helper such as a padding warning; the base class is gone) is dropped, and so is
  `input_ids = input_ids.view(-1, shape[-1])`, which folds a batch of ids to [batch, seq] (a no-op
  for HF's 2-D ids; on the engine's flat [T] ids it would add a batch dim).
- In the causal LM, `.contiguous()` (a memory-layout call, value-preserving) is dropped, so the LM head
  reads as `logits = self.lm_head(hidden_states)`.
"""
from __future__ import annotations

import re

import libcst as cst

from porter.convert.context import Context, Pass
from porter.convert.cst_util import code, init_assignments, is_pure, methods, param_names, self_call_attr
from porter.convert.specialise import FALSE_PARAMS, NONE_PARAMS

_REMOVED = re.compile(r"\b(training|past_key_values|attention_mask|labels|output_attentions)\b")


def _kwargs_pop(stmt, kwargs: str | None) -> str | None:
    if kwargs is None or not (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1
                              and isinstance(stmt.body[0], cst.Expr)):
        return None
    call = stmt.body[0].value
    if isinstance(call, cst.Call) and isinstance(call.func, cst.Attribute) and call.func.attr.value == "pop" and \
            isinstance(call.func.value, cst.Name) and call.func.value.value == kwargs and call.args and \
            isinstance(call.args[0].value, cst.SimpleString):
        key = call.args[0].value.evaluated_value
        return key if key in FALSE_PARAMS | NONE_PARAMS else None
    return None


class _Inputs(Pass):
    name = "inputs"

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.cls = node.name.value
        self.own = set(methods(node)) | {a for a, _ in init_assignments(node)}

    def leave_ClassDef(self, original, updated):
        self.cls = None
        return updated

    def _base_input_noise(self, fn: cst.FunctionDef, stmt) -> str | None:
        if getattr(self, "cls", None) != self.ctx.roles.base or fn.name.value != "forward" or \
                not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
            return None
        small = stmt.body[0]
        if isinstance(small, cst.Expr) and self_call_attr(small.value) and self_call_attr(small.value) not in self.own:
            return f"dropped `{code(small.value)[:60]}` (a PreTrainedModel helper; the base class is gone)"
        if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.value, cst.Call):
            f, args = small.value.func, small.value.args
            target = code(small.targets[0].target)
            if isinstance(f, cst.Attribute) and f.attr.value in ("view", "reshape") and code(f.value) == target \
                    and target in param_names(fn) and len(args) == 2 and code(args[0].value) == "-1" \
                    and code(args[1].value).endswith("[-1]"):
                return f"dropped `{code(small).strip()}` (ids are flat [T] on the engine)"
        return None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.fn = node

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        if getattr(self, "cls", None) == self.ctx.roles.causal_lm and not updated.args and \
                isinstance(updated.func, cst.Attribute) and updated.func.attr.value == "contiguous":
            self.note(original, f"dropped `.contiguous()` of `{code(updated.func.value)[:50]}` (layout only)")
            return updated.func.value
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        fn = getattr(self, "fn", None)
        noise = self._base_input_noise(fn, updated) if fn is not None else None
        if noise is None:
            return updated
        self.note(original, noise)
        return cst.RemoveFromParent()

    def leave_If(self, original: cst.If, updated: cst.If):
        # a branch whose only statement was dropped above: `if input_ids is not None: pass`
        body = updated.body.body
        if updated.orelse is None and is_pure(updated.test) and all(
                isinstance(s, cst.SimpleStatementLine) and all(isinstance(x, cst.Pass) for x in s.body) for s in body) \
                and not all(isinstance(s, cst.SimpleStatementLine) and all(isinstance(x, cst.Pass) for x in s.body)
                            for s in original.body.body):
            return cst.RemoveFromParent()
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        self.fn = None
        kwargs = updated.params.star_kwarg.name.value if isinstance(updated.params.star_kwarg, cst.Param) else None
        body = []
        for i, stmt in enumerate(updated.body.body):
            key = _kwargs_pop(stmt, kwargs)
            if key is not None:
                self.ctx.report.change("inputs", self.ctx.lines.of(stmt), f"dropped `{kwargs}.pop({key!r}, ...)`")
                continue
            if i == 0 and updated.name.value == "forward" and isinstance(stmt, cst.SimpleStatementLine) and \
                    isinstance(stmt.body[0], cst.Expr) and isinstance(stmt.body[0].value, cst.SimpleString) and \
                    _REMOVED.search(stmt.body[0].value.value):
                self.ctx.report.change("inputs", self.ctx.lines.of(stmt),
                                       "dropped a forward docstring that documents HF-only inputs")
                continue
            body.append(stmt)
        if len(body) == len(updated.body.body):
            return updated
        return updated.with_changes(body=updated.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])]))


def normalise_inputs(module: cst.Module, ctx: Context) -> cst.Module:
    return module.visit(_Inputs(ctx))
