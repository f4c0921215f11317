"""Small libcst helpers shared by the passes: code text, dotted names, which names a node reads."""
from __future__ import annotations

from collections import Counter

import libcst as cst
import libcst.matchers as matchers

_EMPTY = cst.Module(body=[])


def code(node: cst.CSTNode) -> str:
    return _EMPTY.code_for_node(node)


def same_code(a: cst.CSTNode, b: cst.CSTNode) -> bool:
    """Equal up to whitespace and comments-free layout (used to match call arguments)."""
    return "".join(code(a).split()) == "".join(code(b).split())


def dotted(expr: cst.CSTNode | None) -> str | None:
    """`nn.Linear` -> "nn.Linear"; None when the expression is not a plain dotted name."""
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        base = dotted(expr.value)
        return f"{base}.{expr.attr.value}" if base else None
    return None


def self_attr(expr: cst.CSTNode | None) -> str | None:
    """`self.X` -> "X"."""
    if isinstance(expr, cst.Attribute) and isinstance(expr.value, cst.Name) and expr.value.value == "self":
        return expr.attr.value
    return None


def self_call_attr(expr: cst.CSTNode | None) -> str | None:
    """`self.X(...)` -> "X"."""
    return self_attr(expr.func) if isinstance(expr, cst.Call) else None


def kwarg(call: cst.Call, name: str) -> cst.Arg | None:
    for a in call.args:
        if a.keyword is not None and a.keyword.value == name:
            return a
    return None


def arg_value(call: cst.Call, index: int, name: str) -> cst.BaseExpression | None:
    """The argument bound to positional `index` or keyword `name` (no defaults)."""
    a = kwarg(call, name)
    if a is not None:
        return a.value
    positional = [a for a in call.args if a.keyword is None and not a.star]
    return positional[index].value if index < len(positional) else None


def target_names(target: cst.BaseExpression) -> list[str] | None:
    """Names a plain assignment target binds; None if it also writes through attributes/subscripts."""
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        out: list[str] = []
        for el in target.elements:
            inner = target_names(el.value)
            if inner is None:
                return None
            out += inner
        return out
    if isinstance(target, cst.StarredElement):
        return target_names(target.value)
    return None


class _Loads(cst.CSTVisitor):
    """Counts Name reads: skips keyword names, attribute names, plain assignment targets, params."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()

    def visit_Name(self, node: cst.Name) -> None:
        self.names[node.value] += 1

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_Param(self, node: cst.Param) -> bool:
        for part in (node.annotation, node.default):
            if part is not None:
                part.visit(self)
        return False

    def _targets(self, targets) -> None:
        for t in targets:
            if target_names(t) is not None:
                continue
            if isinstance(t, cst.Subscript) and isinstance(t.value, cst.Name):
                for el in t.slice:  # `x[key] = ...` mutates x; only the key is read
                    el.visit(self)
                continue
            t.visit(self)

    def visit_Assign(self, node: cst.Assign) -> bool:
        self._targets([t.target for t in node.targets])
        node.value.visit(self)
        return False

    def visit_AnnAssign(self, node: cst.AnnAssign) -> bool:
        self._targets([node.target])
        node.annotation.visit(self)
        if node.value is not None:
            node.value.visit(self)
        return False

    def visit_NamedExpr(self, node: cst.NamedExpr) -> bool:
        node.value.visit(self)
        return False

    def visit_For(self, node: cst.For) -> bool:
        self._targets([node.target])
        for part in (node.iter, node.body, node.orelse):
            if part is not None:
                part.visit(self)
        return False

    def visit_CompFor(self, node: cst.CompFor) -> bool:
        self._targets([node.target])
        node.iter.visit(self)
        for i in node.ifs:
            i.visit(self)
        if node.inner_for_in is not None:
            node.inner_for_in.visit(self)
        return False

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        for d in node.decorators:
            d.visit(self)
        node.params.visit(self)
        if node.returns is not None:
            node.returns.visit(self)
        node.body.visit(self)
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        for part in (*node.decorators, *node.bases, *node.keywords):
            part.visit(self)
        node.body.visit(self)
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False

    def visit_Import(self, node: cst.Import) -> bool:
        return False


def loads(node: cst.CSTNode) -> Counter[str]:
    v = _Loads()
    node.visit(v)
    return v.names


def contains(node: cst.CSTNode, pred) -> bool:
    found = []

    class _V(cst.CSTVisitor):
        def on_visit(self, n: cst.CSTNode) -> bool:
            if found:
                return False
            if pred(n):
                found.append(n)
                return False
            return True

    node.visit(_V())
    return bool(found)


def is_impure_call(node: cst.CSTNode) -> bool:
    """Calls that run a submodule or a method of one (they may write the KV cache): never dropped."""
    if not isinstance(node, cst.Call):
        return False
    f = node.func
    root = f
    while isinstance(root, cst.Attribute):
        root = root.value
    if isinstance(root, cst.Call) and dotted(root.func) == "super":
        return True
    return isinstance(root, cst.Name) and root.value == "self"


def is_pure(node: cst.CSTNode) -> bool:
    return not contains(node, is_impure_call)


def methods(cls: cst.ClassDef) -> dict[str, cst.FunctionDef]:
    out = {}
    for s in cls.body.body:
        if isinstance(s, cst.FunctionDef):
            out[s.name.value] = s
    return out


def classes(module: cst.Module) -> dict[str, cst.ClassDef]:
    return {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}


def init_assignments(cls: cst.ClassDef) -> list[tuple[str, cst.BaseExpression]]:
    """(attr, value) for every top-level `self.attr = value` statement of __init__."""
    init = methods(cls).get("__init__")
    out = []
    if init is None:
        return out
    for s in init.body.body:
        if isinstance(s, cst.SimpleStatementLine):
            for small in s.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    attr = self_attr(small.targets[0].target)
                    if attr:
                        out.append((attr, small.value))
    return out


def calls_of(node: cst.CSTNode, attr: str) -> list[cst.Call]:
    """Every `self.<attr>(...)` call inside node, in source order."""
    return [c for c in matchers.findall(node, matchers.Call()) if self_call_attr(c) == attr]


class ReadNamesOnly:
    """Mixin for a transformer whose `leave_Name` rewrites names where they are read: keyword names,
    attribute names, assignment targets and parameters stay as written."""

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original, updated):
        return updated.with_changes(attr=original.attr)

    def leave_AssignTarget(self, original, updated):
        return updated.with_changes(target=original.target)

    def leave_Param(self, original, updated):
        return original


class RenameName(cst.CSTTransformer):
    """Renames a variable everywhere it is read or bound; keyword-argument names and attribute names
    (`f(old=...)`, `x.old`) are other things and stay."""

    def __init__(self, old: str, new: str):
        super().__init__()
        self.old, self.new = old, new

    def leave_Name(self, original, updated):
        return updated.with_changes(value=self.new) if updated.value == self.old else updated

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original, updated):
        return updated.with_changes(attr=original.attr)


def parse_stmt(src: str) -> cst.BaseStatement:
    return cst.parse_statement(src)


def parse_expr(src: str) -> cst.BaseExpression:
    return cst.parse_expression(src)


def param_names(fn: cst.FunctionDef) -> list[str]:
    p = fn.params
    return [x.name.value for x in (*p.posonly_params, *p.params, *p.kwonly_params)]


def append_arg(call: cst.Call, new: cst.Arg) -> cst.Call:
    """Append a keyword argument, keeping the call's one-line or one-argument-per-line layout."""
    args = list(call.args)
    if not args:
        return call.with_changes(args=[new])
    last = args[-1]
    if isinstance(last.comma, cst.Comma):  # trailing comma: the new argument takes over the closing layout
        new = new.with_changes(comma=last.comma)
    else:
        new = new.with_changes(whitespace_after_arg=last.whitespace_after_arg)
    if len(args) >= 2 and isinstance(args[-2].comma, cst.Comma):
        sep = args[-2].comma
    elif isinstance(call.whitespace_before_args, cst.ParenthesizedWhitespace):
        sep = cst.Comma(whitespace_after=call.whitespace_before_args)
    else:
        sep = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    args[-1] = last.with_changes(comma=sep, whitespace_after_arg=cst.SimpleWhitespace(""))
    return call.with_changes(args=[*args, new])


def with_args(call: cst.Call, args: list[cst.Arg]) -> cst.Call:
    """`call` with only `args` (a subset, in order), keeping its layout: a one-line call loses any
    trailing comma; a multi-line call keeps its closing `,\\n)`."""
    args = list(args)
    if args and call.args:
        last = call.args[-1]
        if isinstance(call.whitespace_before_args, cst.ParenthesizedWhitespace) and isinstance(last.comma, cst.Comma):
            args[-1] = args[-1].with_changes(comma=last.comma)
        else:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT,
                                             whitespace_after_arg=last.whitespace_after_arg)
    return call.with_changes(args=args)


def with_params(params: cst.Parameters, keep: list[cst.Param]) -> cst.Parameters:
    """`params` keeping only `keep` (positional ones) and no `*args`/`**kwargs`, keeping the layout."""
    keep = list(keep)
    old = [*params.params, *([params.star_arg] if isinstance(params.star_arg, cst.Param) else []),
           *params.kwonly_params, *([params.star_kwarg] if params.star_kwarg is not None else [])]
    if keep and old:
        last = old[-1]
        keep[-1] = keep[-1].with_changes(comma=last.comma if isinstance(last.comma, cst.Comma) and
                                         isinstance(last.comma.whitespace_after, cst.ParenthesizedWhitespace)
                                         else cst.MaybeSentinel.DEFAULT)
    return params.with_changes(params=keep, star_arg=cst.MaybeSentinel.DEFAULT, kwonly_params=[], star_kwarg=None)


def fold_if(node: cst.If, truth: bool):
    """What an `if` whose test is the constant `truth` folds to: its body, its else part, or nothing."""
    if truth:
        return cst.FlattenSentinel(node.body.body)
    if node.orelse is None:
        return cst.RemoveFromParent()
    if isinstance(node.orelse, cst.If):
        return node.orelse
    return cst.FlattenSentinel(node.orelse.body.body)
