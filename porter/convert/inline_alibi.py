"""ALiBi inputs of an inline attention block: recognised, and their per-forward plumbing dropped.

An additive score bias from a forward input is accepted only as ALiBi: the model must build it with the
standard ALiBi slope formula (a code pattern, checked in the module's functions that produce the
input). The engine's Attention then computes the slopes once at construction, so where the model
builds the input it becomes None (the bias code and the mask code that mixed it in fold away), and
`bias is None` tests in the block read the config flag the model gates the bias on.
"""
from __future__ import annotations

import re

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import classes, code, dotted, init_assignments, loads, methods, param_names, self_attr
from porter.convert.inline_layout import Refused, target_names_of
from porter.convert.specialise import FALSE_PARAMS, NONE_PARAMS

# the standard ALiBi slopes: 2^(-8/n)^i over the closest power of two n below the head count
_ALIBI_POW2 = re.compile(r"2\s*\*\*\s*math\.floor\(\s*math\.log2\(")
_ALIBI_BASE = re.compile(r"2\s*\*\*\s*\(\s*-\s*\(\s*2\s*\*\*\s*-\s*\(\s*math\.log2\([^)]*\)\s*-\s*3\s*\)\s*\)\s*\)")
_BF16 = re.compile(r"\.bfloat16\(\)")


def alibi_inputs(module: cst.Module, attn: cst.ClassDef) -> tuple[dict[str, bool], dict[str, str | None],
                                                                   dict[str, str]]:
    """Forward inputs of the attention block that may feed a score bias (added, or a baddbmm input).
    Those the model builds with the standard ALiBi slope formula -> whether the slopes go through
    bfloat16, and the config expression (with `{config}` for the block's config parameter) under which
    the model passes one; the others -> why they are not ALiBi (refused if they do reach the scores)."""
    fwd = methods(attn)["forward"]
    params = set(param_names(fwd)[2:]) - NONE_PARAMS - FALSE_PARAMS
    used = [p for p in params if re.search(rf"\b{p}\.baddbmm\(|\+\s*{p}\b|\b{p}\.view\(", code(fwd))]
    funcs = {s.name.value: s for s in module.body if isinstance(s, cst.FunctionDef)}
    alibi, flags, other = {}, {}, {}
    for p in used:
        producers = _producers(module, attn, p, funcs)
        formula = [f for f in producers if _ALIBI_POW2.search(code(funcs[f])) and _ALIBI_BASE.search(code(funcs[f]))]
        if not formula:
            other[p] = ("the model does not build it with the standard ALiBi slope formula "
                        f"(built by: {', '.join(sorted(producers)) or 'code not found under that name'})")
            continue
        alibi[p] = any(_BF16.search(code(funcs[f])) for f in producers)
        flags[p] = _gate(module, attn, p)
    return alibi, flags, other


def _producers(module, attn, name: str, funcs) -> set[str]:
    """Module functions called (directly, through locals, or through a method) by the statements that
    assign `name` in the forwards of the other classes."""
    out: set[str] = set()
    for cls in classes(module).values():
        if cls is attn:
            continue
        ms = methods(cls)
        fwd = ms.get("forward")
        if fwd is None:
            continue
        assigns: dict[str, list[cst.BaseExpression]] = {}

        class V(cst.CSTVisitor):
            def visit_Assign(self, n: cst.Assign):
                for t in n.targets:
                    for x in target_names_of(t.target):
                        assigns.setdefault(x, []).append(n.value)

        fwd.visit(V())
        todo, seen = [name], set()
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            for value in assigns.get(x, []):
                calls = _called(value)
                for c in calls:
                    if c in funcs:
                        out.add(c)
                        out |= {f for f in _called(funcs[c]) if f in funcs}
                    elif c.startswith("self.") and c[5:] in ms:
                        out |= {f for f in _called(ms[c[5:]]) if f in funcs}
                todo += [n for n in loads(value) if n in assigns]
    return out


def _assigns(fn: cst.FunctionDef, name: str) -> bool:
    found = []

    class V(cst.CSTVisitor):
        def visit_AssignTarget(self, n: cst.AssignTarget):
            if name in target_names_of(n.target):
                found.append(n)

    fn.visit(V())
    return bool(found)


def _called(node) -> set[str]:
    out = set()

    class V(cst.CSTVisitor):
        def visit_Call(self, n: cst.Call):
            d = dotted(n.func)
            if d:
                out.add(d)

    node.visit(V())
    return out


def _gate(module, attn, name: str) -> str | None:
    """`name = None` then `if COND: name = ...` at the top of a forward: the config expression COND
    stands for (a `self.x` read is replaced by what `__init__` assigned to it). None: always passed."""
    for cls in classes(module).values():
        if cls is attn or "forward" not in methods(cls):
            continue
        body = methods(cls)["forward"].body.body
        init = methods(cls).get("__init__")
        assigned = dict(init_assignments(cls))
        cfg = param_names(init)[1] if init is not None and len(param_names(init)) > 1 else "config"
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, cst.SimpleStatementLine) and code(stmt.body[0]).strip() == f"{name} = None"):
                continue
            for later in body[i + 1:]:
                if isinstance(later, cst.If) and re.search(rf"^\s*{name}\s*=", code(later.body), re.M):
                    test = later.test
                    attr = self_attr(test)
                    if attr in assigned and set(loads(assigned[attr])) <= {cfg}:
                        text = code(assigned[attr])
                        return re.sub(rf"\b{cfg}\b", "{config}", text)
                    if set(loads(test)) <= {cfg}:
                        return re.sub(rf"\b{cfg}\b", "{config}", code(test))
                    raise Refused(later, f"`if {code(test)}`", f"gates the ALiBi input `{name}` on a value "
                                                              "that is not a config field")
    return None


def drop_bias(module: cst.Module, name: str, converted: set[str], ctx: Context) -> cst.Module:
    """The converted attention no longer reads the ALiBi input: where the model builds it, it is None
    (its assignments go, reads become None), so the bias code and the mask code mixing it fold away."""

    class Drop(cst.CSTTransformer):
        def __init__(self):
            super().__init__()
            self.depth = 0

        def visit_FunctionDef(self, node):
            self.depth += node.name.value == "forward"

        def leave_FunctionDef(self, original, updated):
            self.depth -= original.name.value == "forward"
            return updated

        def leave_SimpleStatementLine(self, original, updated):
            if self.depth and len(updated.body) == 1 and isinstance(updated.body[0], cst.Assign) and \
                    [code(t.target) for t in updated.body[0].targets] == [name]:
                return cst.RemoveFromParent()
            return updated

        def leave_Name(self, original, updated):
            return cst.Name("None") if self.depth and updated.value == name else updated

        def leave_Arg(self, original, updated):
            return updated.with_changes(keyword=original.keyword)

        def leave_Attribute(self, original, updated):
            return updated.with_changes(attr=original.attr)

        def leave_AssignTarget(self, original, updated):
            return updated.with_changes(target=original.target)

        def leave_Param(self, original, updated):
            return original

    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value not in converted and "forward" in methods(stmt) and \
                _assigns(methods(stmt)["forward"], name):
            ctx.report.change("inline_attention", ctx.lines.of(stmt),
                              f"{stmt.name.value}: the ALiBi input `{name}` is no longer built (slopes live in "
                              "the engine Attention)")
            stmt = stmt.visit(Drop())
        body.append(stmt)
    return module.with_changes(body=body)
