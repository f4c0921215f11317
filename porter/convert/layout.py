"""Final layout: a multi-line call or signature gets one argument per line with a trailing comma and
the closing bracket back at the statement's indentation (rewrites leave them ragged), and a line
made too long by added arguments is split the same way. No formatter is needed at runtime."""
from __future__ import annotations

import libcst as cst

from porter.convert.cst_util import code

MAX_LINE = 110


def _nl(indent: str) -> cst.ParenthesizedWhitespace:
    return cst.ParenthesizedWhitespace(first_line=cst.TrailingWhitespace(), indent=True,
                                       last_line=cst.SimpleWhitespace(indent))


def _one_per_line(items: list, depth: int) -> list:
    inner, outer = "    " * (depth + 1), "    " * depth
    out = [x.with_changes(comma=cst.Comma(whitespace_after=_nl(inner))) for x in items[:-1]]
    out.append(items[-1].with_changes(comma=cst.Comma(whitespace_after=_nl(outer))))
    return out


def _multiline(ws) -> bool:
    return isinstance(ws, cst.ParenthesizedWhitespace)


class _Explode(cst.CSTTransformer):
    """One argument per line for calls already written across lines, or for `targets` calls."""

    def __init__(self, targets: set[int] | None = None):
        super().__init__()
        self.targets = targets or set()
        self.depth = 0

    def visit_Call(self, node: cst.Call) -> None:
        if _multiline(node.whitespace_before_args) or id(node) in self.targets:
            self.depth += 1

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        if not (_multiline(original.whitespace_before_args) or id(original) in self.targets):
            return updated
        self.depth -= 1
        if not updated.args:
            return updated
        args = [a.with_changes(whitespace_after_arg=cst.SimpleWhitespace("")) for a in updated.args]
        return updated.with_changes(whitespace_before_args=_nl("    " * (self.depth + 1)),
                                    args=_one_per_line(args, self.depth))

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        p = updated.params
        if not _multiline(updated.whitespace_before_params) or p.star_kwarg is not None or p.kwonly_params:
            return updated
        params = list(p.params)
        if not params or not isinstance(p.star_arg, cst.MaybeSentinel):
            return updated
        params = [x.with_changes(whitespace_after_param=cst.SimpleWhitespace("")) for x in params]
        return updated.with_changes(whitespace_before_params=_nl("    "),
                                    params=p.with_changes(params=_one_per_line(params, 0)))


class Layout(cst.CSTTransformer):
    def __init__(self):
        super().__init__()
        self.indent = 0

    def visit_IndentedBlock(self, node):
        self.indent += 1

    def leave_IndentedBlock(self, original, updated):
        self.indent -= 1
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        header = code(updated.with_changes(body=cst.IndentedBlock([cst.SimpleStatementLine([cst.Pass()])]),
                                           decorators=[], leading_lines=[])).splitlines()[0]
        p = updated.params
        if 4 * self.indent + len(header) <= MAX_LINE or p.star_kwarg is not None or p.kwonly_params \
                or not p.params or not isinstance(p.star_arg, cst.MaybeSentinel):
            return updated
        params = [x.with_changes(whitespace_after_param=cst.SimpleWhitespace("")) for x in p.params]
        return updated.with_changes(whitespace_before_params=_nl("    "),
                                    params=p.with_changes(params=_one_per_line(params, 0)))

    def leave_SimpleStatementLine(self, original, updated):
        for _ in range(4):
            width = 4 * self.indent
            text = code(updated)
            if all(width + len(line) <= MAX_LINE for line in text.splitlines()):
                break
            target = _longest_one_line_call(updated, MAX_LINE - width)
            if target is None:
                break
            updated = updated.visit(_Explode({id(target)}))
        return updated


def _longest_one_line_call(stmt, budget: int):
    best: list = []

    class V(cst.CSTVisitor):
        def visit_Call(self, node):
            text = code(node)
            if "\n" not in text and len(text) > budget // 2 and node.args and (not best or len(text) > best[1]):
                best[:] = [node, len(text)]

    stmt.visit(V())
    return best[0] if best else None


def tidy_layout(module: cst.Module) -> cst.Module:
    return module.visit(_Explode()).visit(Layout())
