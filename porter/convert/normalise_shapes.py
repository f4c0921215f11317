"""Normalise `[batch, seq, hidden]` shape unpacking into the leading-dims idiom that flattens.

    batch_size, sequence_length, hidden_dim = x.shape        ->  *lead_shape, hidden_dim = x.shape
    y.reshape(batch_size, sequence_length, hidden_dim)       ->  y.reshape(*lead_shape, hidden_dim)

    q.view(batch_size, -1, heads, head_dim)                  ->  q.view(*lead_shape[:-1], -1, heads, head_dim)

Only when the batch and sequence names are read nowhere else than as that consecutive pair of
`view`/`reshape` arguments (or the batch name alone before a -1): then the code means "restore the
leading dims", which is `(T,)` on the engine's flat tokens. Any other use (`bsz * q_len`, a loop bound) is left for the flatten pass to refuse.
Also the last-dim idioms of `_LastDim`.
"""
from __future__ import annotations

import re

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import code, loads, self_call_attr

_LEAD = "lead_shape"


def _unpack(stmt: cst.CSTNode) -> tuple[str, str, str] | None:
    if not (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign)):
        return None
    a = stmt.body[0]
    t, v = a.targets[0].target, code(a.value)
    if len(a.targets) != 1 or not isinstance(t, cst.Tuple) or len(t.elements) != 3:
        return None
    if not (v.endswith(".shape") or v.endswith(".size()")):
        return None
    names = [e.value.value if isinstance(e.value, cst.Name) else None for e in t.elements]
    if None in names:
        return None
    return names[0], names[1], names[2]


def _pair_calls(fn: cst.FunctionDef, b: str, s: str) -> tuple[int, int]:
    """How many view/reshape calls pass `b, s` as consecutive positional arguments, and `b, -1`."""
    pairs = lone = 0

    class V(cst.CSTVisitor):
        def visit_Call(self, n: cst.Call):
            nonlocal pairs, lone
            if isinstance(n.func, cst.Attribute) and n.func.attr.value in ("view", "reshape"):
                vals = [code(a.value) for a in n.args]
                for i in range(len(vals) - 1):
                    if vals[i] == b and vals[i + 1] == s:
                        pairs += 1
                    elif vals[i] == b and vals[i + 1] == "-1":
                        lone += 1

    fn.visit(V())
    return pairs, lone


class _Rewrite(cst.CSTTransformer):
    def __init__(self, b: str, s: str, unpack: cst.SimpleStatementLine):
        super().__init__()
        self.b, self.s, self.unpack = b, s, unpack

    def leave_SimpleStatementLine(self, original, updated):
        got = _unpack(original)
        if got is not None and got[:2] == (self.b, self.s):  # every unpacking of the same names
            a = updated.body[0]
            t = a.targets[0].target
            new_t = cst.Tuple([cst.StarredElement(cst.Name(_LEAD)), cst.Element(t.elements[2].value)], lpar=[], rpar=[])
            return updated.with_changes(body=[a.with_changes(targets=[a.targets[0].with_changes(target=new_t)])])
        return updated

    def leave_Call(self, original, updated: cst.Call):
        if not (isinstance(updated.func, cst.Attribute) and updated.func.attr.value in ("view", "reshape")):
            return updated
        args = list(updated.args)
        for i in range(len(args) - 1):
            if code(args[i].value) == self.b and code(args[i + 1].value) == self.s:
                star = cst.Arg(cst.Name(_LEAD), star="*", comma=args[i + 1].comma)
                return updated.with_changes(args=[*args[:i], star, *args[i + 2:]])
            if code(args[i].value) == self.b and code(args[i + 1].value) == "-1":
                star = cst.Arg(cst.parse_expression(f"{_LEAD}[:-1]"), star="*", comma=args[i].comma)
                return updated.with_changes(args=[*args[:i], star, *args[i + 1:]])
        return updated


class _LastDim(cst.CSTTransformer):
    """`self.proj(x).split(n, dim=2)` (a projection of [batch, seq, hidden]) -> `dim=-1`, and
    `y.reshape(*y.shape[:-2], -1)` (merge the heads) -> `y.reshape(*x.shape[:-1], -1)` with x the
    function's input: both mean the last dim / the leading dims, which on flat tokens are other indices."""

    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx
        self.inputs: list[str | None] = []

    def visit_FunctionDef(self, node: cst.FunctionDef):
        params = [p.name.value for p in node.params.params]
        self.inputs.append(params[1] if len(params) > 1 and params[0] == "self" else None)

    def leave_FunctionDef(self, original, updated):
        self.inputs.pop()
        return updated

    def _four_d(self, node) -> str | None:
        """The receiver of a split is 4-D [batch, (1|seq), ., .] built from a projection output: returns how."""
        while isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute):
            attr, inner = node.func.attr.value, node.func.value
            if attr == "unsqueeze" and [code(a.value) for a in node.args] == ["1"] and \
                    isinstance(inner, cst.Call) and self_call_attr(inner):
                return "unsqueeze"
            if attr in ("view", "reshape") and len(node.args) == 3 and node.args[0].star == "*" and \
                    code(node.args[0].value).endswith(".shape[:2]"):
                return "view"
            node = inner
        return None

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        f = updated.func
        if not isinstance(f, cst.Attribute):
            return updated
        # `.view(*x.shape[:2], heads, d)` of the input's [batch, seq] -> its leading dims
        if f.attr.value in ("view", "reshape") and len(updated.args) == 3 and updated.args[0].star == "*" and \
                self.inputs and self.inputs[-1] and code(updated.args[0].value) == f"{self.inputs[-1]}.shape[:2]":
            args = list(updated.args)
            args[0] = args[0].with_changes(value=cst.parse_expression(f"{self.inputs[-1]}.shape[:-1]"))
            self.ctx.report.change("shapes", self.ctx.lines.of(original),
                                   f"`*{self.inputs[-1]}.shape[:2]` -> `*{self.inputs[-1]}.shape[:-1]` (leading dims)")
            return updated.with_changes(args=args)
        # split(..., dim=3) of a 4-D head layout -> the last dim; `x.unsqueeze(1)` (a broadcast head dim,
        # multi-query) is not needed on flat tokens: the engine takes [T, heads * head_dim]
        if f.attr.value in ("split", "chunk"):
            how = self._four_d(original.func.value)
            dim = next((i for i, a in enumerate(updated.args) if (a.keyword is not None and a.keyword.value == "dim"
                        or a.keyword is None and i == 1) and code(a.value) == "3"), None)
            if how is not None and dim is not None:
                args = list(updated.args)
                args[dim] = args[dim].with_changes(value=cst.parse_expression("-1"))
                base = f.value
                if how == "unsqueeze" and isinstance(base, cst.Call) and base.func.attr.value == "unsqueeze":
                    base = base.func.value
                new = updated.with_changes(func=f.with_changes(value=base), args=args)
                self.ctx.report.change("shapes", self.ctx.lines.of(original),
                                       f"`...{code(f)[-40:]}(..., dim=3)` of a 4-D head layout -> dim=-1"
                                       + (" without the broadcast head dim" if how == "unsqueeze" else ""))
                return new
        if f.attr.value in ("split", "chunk") and isinstance(f.value, cst.Call) and self_call_attr(f.value):
            args = list(updated.args)
            for i, a in enumerate(args):
                if (a.keyword is not None and a.keyword.value == "dim" or a.keyword is None and i == 1) \
                        and code(a.value) == "2":
                    args[i] = a.with_changes(value=cst.parse_expression("-1"))
                    self.ctx.report.change("shapes", self.ctx.lines.of(original),
                                           f"`{code(original)[:60]}`: dim=2 of a projection output -> dim=-1")
                    return updated.with_changes(args=args)
        if f.attr.value in ("reshape", "view") and self.inputs and self.inputs[-1] and len(updated.args) == 2 \
                and updated.args[0].star == "*" and code(updated.args[1].value) == "-1" \
                and code(updated.args[0].value) == f"{code(f.value)}.shape[:-2]":
            new = cst.parse_expression(f"{code(f.value)}.{f.attr.value}(*{self.inputs[-1]}.shape[:-1], -1)")
            self.ctx.report.change("shapes", self.ctx.lines.of(original),
                                   f"`{code(original)}` -> `{code(new)}` (heads merged back onto the input's leading dims)")
            return new
        return updated


class _LastOnly(cst.CSTTransformer):
    """`_, _, d = x.shape` -> `d = x.shape[-1]` (`x.size()` -> `x.size(-1)`)."""

    def __init__(self, unpack: cst.SimpleStatementLine):
        super().__init__()
        self.unpack = unpack

    def leave_SimpleStatementLine(self, original, updated):
        if not original.deep_equals(self.unpack):
            return updated
        a = updated.body[0]
        value = code(a.value)
        last = value[: -len(".size()")] + ".size(-1)" if value.endswith(".size()") else value + "[-1]"
        target = a.targets[0].with_changes(target=a.targets[0].target.elements[2].value)
        return updated.with_changes(body=[a.with_changes(targets=[target], value=cst.parse_expression(last))])


class _Functions(cst.CSTTransformer):
    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        for stmt in updated.body.body:
            got = _unpack(stmt)
            if got is None:
                continue
            b, s, last = got
            used = loads(updated)
            if used[b] == 0 and used[s] == 0:  # only the last dim is read: the same on flat tokens
                updated = updated.visit(_LastOnly(stmt))
                self.ctx.report.change("shapes", self.ctx.lines.of(stmt),
                                       f"`{b}, {s}, {last} = ...` with only `{last}` read -> the last dim alone")
                continue
            pairs, lone = _pair_calls(updated, b, s)
            # each name is read once per call (the unpacking itself is a store, not a read)
            if pairs + lone == 0 or used[b] != pairs + lone or used[s] != pairs or _LEAD in used:
                continue
            line = self.ctx.lines.of(stmt)
            updated = updated.visit(_Rewrite(b, s, stmt))
            self.ctx.report.change("shapes", line, f"`{b}, {s}, ...` shape unpacking -> `*{_LEAD}, ...` "
                                                   "(leading dims, flat tokens on the engine)")
        return updated


_UNPACK = re.compile(r"^\s*\w+, \w+, \w+ = .*\.(shape|size\(\))\s*$", re.M)
_LAST_DIM = re.compile(r"dim=[23]\)|shape\[:-2\]|shape\[:2\]")


def normalise_shapes(module: cst.Module, ctx: Context) -> cst.Module:
    text = module.code  # walk only where the idioms occur
    if _UNPACK.search(text):
        module = module.visit(_Functions(ctx))
    if _LAST_DIM.search(text):
        module = module.visit(_LastDim(ctx))
    return module
