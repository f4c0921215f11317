"""Adding `from porter.engine... import name [as alias]` to a converted module, in the porter import block."""
from __future__ import annotations

import libcst as cst

from porter.convert.cst_util import code, dotted


def statement_names(stmt: cst.CSTNode) -> set[str]:
    """Names one top-level statement binds (a def, a class, imports, plain assignments)."""
    if isinstance(stmt, (cst.ClassDef, cst.FunctionDef)):
        return {stmt.name.value}
    out: set[str] = set()
    if isinstance(stmt, cst.SimpleStatementLine):
        for s in stmt.body:
            if isinstance(s, (cst.Import, cst.ImportFrom)) and not isinstance(s.names, cst.ImportStar):
                out |= {code(a.asname.name) if a.asname else code(a.name).split(".")[0] for a in s.names}
            elif isinstance(s, cst.Assign):
                out |= {t.target.value for t in s.targets if isinstance(t.target, cst.Name)}
    return out


def bound_names(module: cst.Module) -> set[str]:
    """Names the module's top-level statements bind."""
    return set().union(*(statement_names(stmt) for stmt in module.body))


def add_import(module: cst.Module, engine_module: str, name: str, alias: str | None = None) -> cst.Module:
    """The import placed so the porter block stays sorted by module (after the other imports if none)."""
    what = f"{name} as {alias}" if alias and alias != name else name
    new = cst.parse_statement(f"from {engine_module} import {what}\n")
    body = list(module.body)
    imports = [i for i, s in enumerate(body) if isinstance(s, cst.SimpleStatementLine)
               and isinstance(s.body[0], (cst.Import, cst.ImportFrom))]
    ours = [i for i in imports if isinstance(body[i].body[0], cst.ImportFrom)
            and (dotted(body[i].body[0].module) or "").startswith("porter.")]
    if ours:
        at = next((i for i in ours if dotted(body[i].body[0].module) > engine_module), ours[-1] + 1)
        if at == ours[0]:
            new = new.with_changes(leading_lines=body[at].leading_lines)
            body[at] = body[at].with_changes(leading_lines=[])
    else:
        at = imports[-1] + 1 if imports else 0
        new = new.with_changes(leading_lines=[cst.EmptyLine()] if imports else [])
    body.insert(at, new)
    return module.with_changes(body=body)
