"""Normalise GPT-2 style `Conv1D(nf, nx)` projections into `nn.Linear(nx, nf)`.

Conv1D computes `x @ W + b` with `W` stored `[nx, nf]` (in, out), the transpose of nn.Linear's
`[out, in]`; the forward math is otherwise the same, so the module becomes a Linear (which the parallel
pass then turns into engine layers) and the generated `load_weights` transposes the checkpoint tensors
of these modules (`ctx.transposed_keys`, a key regex).
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import arg_value, code, dotted, self_attr
from porter.convert.specialise import callee_map


class _Conv1DToLinear(cst.CSTTransformer):
    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx
        self.cls: list[str] = []
        self.transposed: list[tuple[str, str]] = []

    def visit_ClassDef(self, node):
        self.cls.append(node.name.value)

    def leave_ClassDef(self, original, updated):
        self.cls.pop()
        return updated

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        value = updated.value
        attr = self_attr(updated.targets[0].target)
        if not (attr and self.cls and isinstance(value, cst.Call) and (dotted(value.func) or "").split(".")[-1] == "Conv1D"):
            return updated
        nf, nx = arg_value(value, 0, "nf"), arg_value(value, 1, "nx")
        line = self.ctx.lines.of(original)
        if nf is None or nx is None or len(value.args) != 2:
            self.ctx.report.refuse(f"`{code(value)}`", line, "expected Conv1D(nf, nx)")
            return updated
        self.transposed.append((self.cls[-1], attr))
        self.ctx.report.change("conv1d", line, f"{self.cls[-1]}.{attr}: Conv1D({code(nf)}, {code(nx)}) -> "
                                               f"nn.Linear({code(nx)}, {code(nf)}); load_weights transposes its weight")
        return updated.with_changes(value=cst.parse_expression(f"nn.Linear({code(nx)}, {code(nf)})"))


def normalise_conv1d(module: cst.Module, ctx: Context) -> cst.Module:
    if "Conv1D(" not in module.code:
        return module
    v = _Conv1DToLinear(ctx)
    new = module.visit(v)
    ctx.transposed_keys = transposed_key_pattern(module, v.transposed) or ""
    return new


def transposed_key_pattern(module: cst.Module, transposed: list[tuple[str, str]]) -> str | None:
    """Regex of the checkpoint keys of the Conv1D weights: `\\.<parent attr>\\.<attr>\\.weight$` for every
    attribute a parent class constructs the Conv1D's class into."""
    if not transposed:
        return None
    owners = callee_map(module)
    alts = []
    for cls, attr in transposed:
        parents = sorted({a for attrs in owners.values() for a, c in attrs.items() if c == cls})
        alts += [rf"\.{p}\.{attr}\.weight$" for p in parents] or [rf"\.{attr}\.weight$"]
    return "|".join(dict.fromkeys(alts))
