"""Relative imports of the transformers package become absolute `transformers.*` imports, so the
converted file imports HF helpers (and the configuration class) instead of copying them."""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted


def _module_expr(dotted_name: str) -> cst.BaseExpression:
    return cst.parse_expression(dotted_name)


class _AnnotationUses(cst.CSTVisitor):
    """Names read inside annotations vs anywhere else."""

    def __init__(self, skip: set[str]):
        self.depth, self.in_annotation, self.elsewhere, self.skip = 0, set(), set(), skip

    def visit_ClassDef(self, node):
        return node.name.value not in self.skip  # classes the plumbing pass removes

    def visit_Annotation(self, node):
        self.depth += 1

    def leave_Annotation(self, node):
        self.depth -= 1

    def visit_ImportFrom(self, node):
        return False

    def visit_Name(self, node):
        (self.in_annotation if self.depth else self.elsewhere).add(node.value)


class _RetypeAnnotations(cst.CSTTransformer):
    def __init__(self, names: set[str]):
        super().__init__()
        self.names, self.depth = names, 0

    def visit_Annotation(self, node):
        self.depth += 1

    def leave_Annotation(self, original, updated):
        self.depth -= 1
        return updated

    def leave_Name(self, original, updated):
        return updated.with_changes(value="PretrainedConfig") if self.depth and updated.value in self.names else updated


class ResolveRelativeImports(Pass):
    name = "imports"

    def visit_Module(self, node: cst.Module) -> None:
        uses = _AnnotationUses(self.ctx.roles.pretrained | self.ctx.roles.dropped)
        node.visit(uses)
        self.uses = uses
        self.retyped: set[str] = set()

    def on_visit(self, node) -> bool:
        return super().on_visit(node) and not isinstance(node, (cst.ClassDef, cst.FunctionDef))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.retyped:
            return updated
        body = [s.visit(_RetypeAnnotations(self.retyped)) for s in updated.body]
        first = next(i for i, s in enumerate(body) if isinstance(s, cst.SimpleStatementLine)
                     and isinstance(s.body[0], (cst.Import, cst.ImportFrom)))
        body.insert(first, cst.parse_statement("from transformers import PretrainedConfig\n"))
        return updated.with_changes(body=body)

    def leave_ImportFrom(self, original: cst.ImportFrom, updated: cst.ImportFrom):
        level = len(updated.relative)
        if not level:
            return updated
        rel = "." * level + (dotted(updated.module) or "")
        if self.ctx.package is None:
            names = {code(a.asname.name) if a.asname else code(a.name) for a in updated.names} \
                if not isinstance(updated.names, cst.ImportStar) else {"*"}
            if names & (self.uses.elsewhere | {"*"}):
                self.refuse(original, f"relative import `from {rel} import ...`",
                            "the source is not inside an installed transformers package and the names are used "
                            "outside annotations, so the import cannot be made absolute; write it as an absolute "
                            "import")
                return updated
            # a remote-code configuration class used only in annotations: annotate with PretrainedConfig
            self.retyped |= names
            self.note(original, f"`from {rel} import {', '.join(sorted(names))}` (annotations only) -> "
                                "transformers.PretrainedConfig annotations")
            return cst.RemoveFromParent()
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


def model_output_imports(module: cst.Module, package: str | None = None) -> set[str]:
    """Local names of transformers' model-output classes imported by the module (inside the transformers
    package, before relative imports are resolved, `from ...modeling_outputs import X` counts too)."""
    homes = {"transformers.modeling_outputs"}
    if (package or "").startswith("transformers"):
        homes.add("modeling_outputs")
    return {name for name, origin in import_origins(module).items() if origin.rpartition(".")[0] in homes}
