"""Dropout inside module-level helper functions is the identity at inference, as in blocks.

Older files wrap it in helpers such as `dropout_add(x, residual, prob, training)` (dropout, then the
residual add). Their dropout call becomes its input; the parameters only the dropout read (`prob`,
`training`) are removed (with the docstring that documents them), and so are the arguments every
call site passes for them, so no training flag survives into the port.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import code, dotted, loads, param_names, with_args, with_params

_DROPOUT = {"F.dropout", "nn.functional.dropout", "torch.nn.functional.dropout", "functional.dropout"}


class _Unwrap(cst.CSTTransformer):
    def leave_Call(self, original, updated):
        if dotted(updated.func) in _DROPOUT and updated.args:
            return updated.args[0].value
        return updated


class _CallSites(cst.CSTTransformer):
    def __init__(self, removed: dict[str, tuple[list[str], set[str]]]):
        super().__init__()
        self.removed = removed  # function -> (its old parameter list, names removed)

    def leave_Call(self, original, updated):
        name = dotted(updated.func)
        if name not in self.removed:
            return updated
        params, gone = self.removed[name]
        kept, i = [], 0
        for a in updated.args:
            if a.keyword is None and not a.star:
                drop = i < len(params) and params[i] in gone
                i += 1
            else:
                drop = a.keyword is not None and a.keyword.value in gone
            if not drop:
                kept.append(a)
        return with_args(updated, kept)


def _plain_calls(module: cst.Module, name: str) -> bool:
    """`name` is called by name, and every call passes plain positional/keyword arguments (no
    *args/**kwargs). A function only passed around as a value (an attention implementation) is not."""
    calls, ok = [0], [True]

    class V(cst.CSTVisitor):
        def visit_Call(self, n):
            if dotted(n.func) == name:
                calls[0] += 1
                ok[0] = ok[0] and not any(a.star for a in n.args)

    module.visit(V())
    return ok[0] and calls[0] > 0


def normalise_function_dropout(module: cst.Module, ctx: Context) -> cst.Module:
    if "dropout(" not in module.code:
        return module
    body, removed = [], {}
    for stmt in module.body:
        if isinstance(stmt, cst.FunctionDef) and any(d in code(stmt.body) for d in _DROPOUT) and \
                _plain_calls(module, stmt.name.value):
            new = stmt.with_changes(body=stmt.body.visit(_Unwrap()))
            used = loads(new.body)
            params = param_names(stmt)
            keep = [p for p in new.params.params if used[p.name.value]]
            gone = {p.name.value for p in new.params.params} - {p.name.value for p in keep}
            if new.params.star_arg is not cst.MaybeSentinel.DEFAULT or new.params.kwonly_params or \
                    new.params.star_kwarg is not None or new.params.posonly_params:
                body.append(stmt)
                continue
            new = new.with_changes(params=with_params(new.params, keep))
            first = new.body.body[0] if new.body.body else None
            if gone and isinstance(first, cst.SimpleStatementLine) and isinstance(first.body[0], cst.Expr) and \
                    isinstance(first.body[0].value, (cst.SimpleString, cst.ConcatenatedString)):
                new = new.with_changes(body=new.body.with_changes(body=new.body.body[1:]))  # documents them
            removed[stmt.name.value] = (params, gone)
            ctx.report.change("function_dropout", ctx.lines.of(stmt),
                              f"{stmt.name.value}: dropout is the identity at inference"
                              + (f"; dropped parameters {', '.join(sorted(gone))}" if gone else ""))
            stmt = new
        body.append(stmt)
    if not removed:
        return module
    return module.with_changes(body=body).visit(_CallSites(removed))
