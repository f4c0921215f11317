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
import libcst.matchers as matchers

from porter.convert.context import Context
from porter.convert.cst_util import (ReadNamesOnly, classes, code, dotted, init_assignments, loads, methods,
                                     param_names, self_attr)
from porter.convert.inline_layout import Refused, target_names_of
from porter.convert.specialise import FALSE_PARAMS, NONE_PARAMS

# the standard ALiBi slopes: 2^(-8/n)^i over the closest power of two n below the head count
_ALIBI_POW2 = re.compile(r"2\s*\*\*\s*math\.floor\(\s*math\.log2\(")
# the interleaved variant: 2^(-max_bias/m * i) over the next power of two m, even i first when cut
_INTERLEAVED = (re.compile(r"2\s*\*\*\s*math\.ceil\(\s*math\.log2\("), re.compile(r"1\.0\s*/\s*torch\.pow\(\s*2\s*,"),
                re.compile(r"\[:?,?\s*1::2"), re.compile(r"\[:?,?\s*::2"))
_MAX_BIAS = re.compile(r"\*\s*\(\s*(\w+)\s*/\s*\w+\s*\)")
_ALIBI_BASE = re.compile(r"2\s*\*\*\s*\(\s*-\s*\(\s*2\s*\*\*\s*-\s*\(\s*math\.log2\([^)]*\)\s*-\s*3\s*\)\s*\)\s*\)")
_BF16 = re.compile(r"\.bfloat16\(\)")


def alibi_inputs(module: cst.Module, attn: cst.ClassDef) -> tuple[dict[str, str], dict[str, str | None],
                                                                   dict[str, str]]:
    """Forward inputs of the attention block that may feed a score bias (added, or a baddbmm input).
    Those the model builds with a known ALiBi slope formula -> the engine call computing their slopes
    (`{heads}` for the head count), and the config expression (with `{config}` for the block's config
    parameter) under which the model passes one; the others -> why they are not ALiBi (refused if they
    do reach the scores)."""
    fwd = methods(attn)["forward"]
    params = set(param_names(fwd)[2:]) - NONE_PARAMS - FALSE_PARAMS
    used = [p for p in params if re.search(rf"\b{p}\.baddbmm\(|\+\s*{p}\b|\b{p}\.view\(", code(fwd))]
    funcs = {s.name.value: s for s in module.body if isinstance(s, cst.FunctionDef)}
    alibi, flags, other = {}, {}, {}
    for p in used:
        producers = _producers(module, attn, p, funcs)
        slopes = _slopes(module, [funcs[f] for f in sorted(producers)])
        if slopes is None:
            other[p] = ("the model does not build it with a known ALiBi slope formula "
                        f"(built by: {', '.join(sorted(producers)) or 'code not found under that name'})")
            continue
        alibi[p] = slopes
        flags[p] = _gate(module, attn, p)
    return alibi, flags, other


def _slopes(module: cst.Module, producers: list[cst.FunctionDef]) -> str | None:
    """The engine call that computes the slopes the producers' formula does, or None."""
    for fn in producers:
        text = code(fn)
        if _ALIBI_POW2.search(text) and _ALIBI_BASE.search(text):
            rounding = ", torch.bfloat16" if any(_BF16.search(code(f)) for f in producers) else ""
            return f"alibi_slopes({{heads}}{rounding})"
        if all(r.search(text) for r in _INTERLEAVED):
            m = _MAX_BIAS.search(text)
            max_bias = _fixed_default(module, fn, m.group(1)) if m else None
            if max_bias is not None:
                return f"alibi_slopes_interleaved({{heads}}, {max_bias})"
    return None


def _fixed_default(module: cst.Module, fn: cst.FunctionDef, name: str) -> str | None:
    """The literal default of `fn`'s parameter `name` when no call in the module (to `fn`, or to a method
    of the same name that forwards to it with the same default) passes that parameter itself."""
    def default(f: cst.FunctionDef) -> str | None:
        p = next((x for x in f.params.params if x.name.value == name), None)
        return code(p.default) if p is not None and isinstance(p.default, (cst.Integer, cst.Float)) else None

    value = default(fn)
    if value is None:
        return None
    wrappers = [m for c in classes(module).values() for n, m in methods(c).items()
                if n == fn.name.value and fn.name.value in _called(m)]
    if any(default(w) != value for w in wrappers):
        return None
    index = param_names(fn).index(name)
    passed = []

    class Calls(cst.CSTVisitor):
        def visit_Call(self, n: cst.Call):
            d = dotted(n.func) or ""
            if d.split(".")[-1] != fn.name.value or any(n is c for w in wrappers for c in _calls_in(w)):
                return
            positional = [a for a in n.args if a.keyword is None]
            at = index
            if d.startswith("self."):  # a method call binds self itself
                at = min((param_names(w).index(name) - 1 for w in wrappers), default=-1)
            if any(a.keyword is not None and a.keyword.value == name for a in n.args) or len(positional) > at:
                passed.append(n)

    module.visit(Calls())
    return value if not passed else None


def _calls_in(node) -> list[cst.Call]:
    return list(matchers.findall(node, matchers.Call()))


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
        # `layer(..., position_bias=alibi)`: the input is what the caller passes under its name
        for call in _calls_in(fwd):
            for a in call.args:
                if a.keyword is not None and a.keyword.value == name:
                    for n in loads(a.value):
                        if n != name:
                            assigns.setdefault(name, []).append(cst.Name(n))
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
                todo += [n for n in loads(value) if n in assigns and n not in seen]
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
    return {d for c in matchers.findall(node, matchers.Call()) if (d := dotted(c.func))}


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

    class Drop(ReadNamesOnly, cst.CSTTransformer):
        def __init__(self, local: str):
            super().__init__()
            self.depth, self.local = 0, local

        def visit_FunctionDef(self, node):
            self.depth += node.name.value == "forward"

        def leave_FunctionDef(self, original, updated):
            self.depth -= original.name.value == "forward"
            return updated

        def leave_SimpleStatementLine(self, original, updated):
            if self.depth and len(updated.body) == 1 and isinstance(updated.body[0], cst.Assign) and \
                    [code(t.target) for t in updated.body[0].targets] == [self.local]:
                return cst.RemoveFromParent()
            return updated

        def leave_Name(self, original, updated):
            return cst.Name("None") if self.depth and updated.value == self.local else updated

    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value not in converted and "forward" in methods(stmt):
            fwd = methods(stmt)["forward"]
            # the local built for it: its own name, or what calls pass as `name=local`
            passed = {a.value.value for c in _calls_in(fwd) for a in c.args
                      if a.keyword is not None and a.keyword.value == name and isinstance(a.value, cst.Name)}
            for local in sorted({name} | passed):
                if _assigns(fwd, local):
                    ctx.report.change("inline_attention", ctx.lines.of(stmt),
                                      f"{stmt.name.value}: the ALiBi input `{local}` is no longer built (slopes "
                                      "live in the engine Attention)")
                    stmt = stmt.visit(Drop(local))
        body.append(stmt)
    return module.with_changes(body=body)
