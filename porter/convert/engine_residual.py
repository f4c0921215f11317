"""Pass: `h = residual + h; residual = h; h = self.norm(h)` -> `h, residual = self.norm(h, residual)`.

The engine's RMSNorm takes an optional residual and returns (norm(x + residual), x + residual), one
launch on CUDA (vLLM's fused residual form); HF decoder layers write the same thing as three statements,
which run as an add kernel and a norm kernel. The rewrite is a local equivalence: both names end bound
to the same values (x + residual equals residual + x exactly in IEEE arithmetic, and both round the sum
to the inputs' dtype), so nothing after it changes. It applies where the norm is built in the class's
__init__ as the engine RMSNorm (which the engine_norms pass put there) and the three statements are
consecutive simple statements of one block.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted, init_assignments, self_attr

ENGINE_MODULE = "porter.engine.layers.layernorm"


def _engine_norm_names(module: cst.Module) -> set[str]:
    """Names the module binds to the engine's RMSNorm classes."""
    names = set()
    for stmt in module.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for s in stmt.body:
                if isinstance(s, cst.ImportFrom) and dotted(s.module) == ENGINE_MODULE and \
                        not isinstance(s.names, cst.ImportStar):
                    for alias in s.names:
                        if code(alias.name) in ("RMSNorm", "GemmaRMSNorm"):
                            names.add(code(alias.asname.name) if alias.asname else code(alias.name))
    return names


def _single(stmt: cst.BaseStatement):
    """The one Assign `name = value` of a simple statement line, as (name, value), else None."""
    if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign):
        s = stmt.body[0]
        if len(s.targets) == 1 and isinstance(s.targets[0].target, cst.Name):
            return s.targets[0].target.value, s.value
    return None


def _name(expr) -> str | None:
    return expr.value if isinstance(expr, cst.Name) else None


def norm_assignment(stmt, norms: set[str]):
    """(name, norm attr, argument) of a statement `name = self.<norm>(argument)`, one plain argument."""
    one = _single(stmt)
    if not one or not isinstance(one[1], cst.Call):
        return None
    call = one[1]
    attr = self_attr(call.func)
    if attr not in norms or len(call.args) != 1 or call.args[0].keyword is not None or call.args[0].star:
        return None
    return one[0], attr, call.args[0].value


def _fusable(a, b, c, norms: set[str]):
    """(h, residual, norm attr) when a, b, c are `h = residual + h` (either order), `residual = h`,
    `h = self.norm(h)`."""
    a, b, c = _single(a), _single(b), norm_assignment(c, norms)
    if not (a and b and c):
        return None
    h, total = a
    residual, copied = b
    if not (isinstance(total, cst.BinaryOperation) and isinstance(total.operator, cst.Add)):
        return None
    if {_name(total.left), _name(total.right)} != {h, residual} or h == residual or _name(copied) != h:
        return None
    if c[0] != h or _name(c[2]) != h:
        return None
    return h, residual, c[1]


class _FuseBlocks(cst.CSTTransformer):
    def __init__(self, owner: "EngineResidual", cls: str, norms: set[str]):
        super().__init__()
        self.owner, self.cls, self.norms = owner, cls, norms

    def leave_IndentedBlock(self, original, updated):
        body, out, i, changed = list(updated.body), [], 0, False
        while i < len(body):
            found = _fusable(*body[i:i + 3], self.norms) if i + 3 <= len(body) else None
            if found is None:
                out.append(body[i])
                i += 1
                continue
            h, residual, attr = found
            first, last = body[i], body[i + 2]
            fused = cst.parse_statement(f"{h}, {residual} = self.{attr}({h}, {residual})\n").with_changes(
                leading_lines=[*first.leading_lines, *body[i + 1].leading_lines, *last.leading_lines])
            self.owner.ctx.lines.carry(last, fused)
            self.owner.note(last, f"{self.cls}: `{h} = {residual} + {h}; {residual} = {h}; {h} = self.{attr}({h})` "
                                  f"-> fused residual add + norm `self.{attr}({h}, {residual})`")
            out.append(fused)
            i += 3
            changed = True
        return updated.with_changes(body=out) if changed else updated


def engine_norm_attrs(cls: cst.ClassDef, classes: set[str]) -> set[str]:
    """The attributes cls's __init__ builds as one of the engine norm classes."""
    return {attr for attr, value in init_assignments(cls) if isinstance(value, cst.Call) and dotted(value.func) in classes}


def rewrite_norm_classes(module: cst.Module, make_visitor, min_norms: int = 1) -> cst.Module:
    """Visit every top-level class that builds at least min_norms engine norms with
    make_visitor(class name, its norm attributes)."""
    classes = _engine_norm_names(module)
    if not classes:
        return module
    body, changed = [], False
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef):
            norms = engine_norm_attrs(stmt, classes)
            if len(norms) >= min_norms:
                new = stmt.visit(make_visitor(stmt.name.value, norms))
                changed |= new is not stmt
                stmt = new
        body.append(stmt)
    return module.with_changes(body=body) if changed else module


class EngineResidual(Pass):
    name = "engine_residual"

    def run(self, module: cst.Module) -> cst.Module:
        return rewrite_norm_classes(module, lambda cls, norms: _FuseBlocks(self, cls, norms))


def engine_residual(module: cst.Module, ctx) -> cst.Module:
    return EngineResidual(ctx).run(module)
