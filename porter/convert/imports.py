"""Relative imports of the transformers package become absolute `transformers.*` imports, so the
converted file imports HF helpers (and the configuration class) instead of copying them."""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted


def _module_expr(dotted_name: str) -> cst.BaseExpression:
    return cst.parse_expression(dotted_name)


class ResolveRelativeImports(Pass):
    name = "imports"
    scope = "top"

    def leave_ImportFrom(self, original: cst.ImportFrom, updated: cst.ImportFrom):
        level = len(updated.relative)
        if not level:
            return updated
        rel = "." * level + (dotted(updated.module) or "")
        if self.ctx.package is None:
            self.refuse(original, f"relative import `from {rel} import ...`",
                        "the source is not inside an installed transformers package, so the import cannot be "
                        "made absolute; write it as an absolute import")
            return updated
        parts = self.ctx.package.split(".")
        if level - 1 >= len(parts):
            self.refuse(original, f"relative import `from {rel} import ...`", "goes above the transformers package")
            return updated
        base = parts[: len(parts) - (level - 1)]
        target = ".".join(base + ([dotted(updated.module)] if updated.module is not None else []))
        self.note(original, f"`from {rel} import` -> `from {target} import`")
        return updated.with_changes(relative=(), module=_module_expr(target))


def import_origins(module: cst.Module) -> dict[str, str]:
    """Local name -> dotted origin for every import in the module."""
    out: dict[str, str] = {}
    for stmt in module.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for small in stmt.body:
            if isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
                mod = dotted(small.module) or ""
                for alias in small.names:
                    local = alias.asname.name.value if alias.asname else code(alias.name)
                    out[local] = f"{mod}.{code(alias.name)}"
            elif isinstance(small, cst.Import):
                for alias in small.names:
                    full = code(alias.name)
                    local = alias.asname.name.value if alias.asname else full.split(".")[0]
                    out[local] = full if alias.asname else full.split(".")[0]
    return out
