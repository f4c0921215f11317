"""Constant facts that older files route through local variables, made visible to branch folding.

- The engine runs its own attention, never one of HF's implementations: a comparison of
  `..._attn_implementation` with a string literal is False for `==` and True for `!=`
  (GPT-2's `using_eager and self.reorder_and_upcast_attn` branch then folds to the interface call).
- A local bound exactly once, at the top of a function body, to True/False/None and never rebound
  (`is_cross_attention = encoder_hidden_states is not None` after specialisation) is substituted into
  its reads and the assignment dropped, so `if is_cross_attention:` folds too.
Folding of the branches themselves is the specialise pass's (re-run after this), or `fold` here for
code outside the blocks before roles are known.
"""
from __future__ import annotations

import re
from collections import Counter

import libcst as cst

from porter.convert.context import Context, Pass
from porter.convert.cst_util import code, fold_if, init_assignments, self_attr, target_names

_LITERALS = {"True": True, "False": False, "None": None}
_IMPLEMENTATION_TEST = re.compile(r"_attn_implementation\s*[!=]=|[!=]=\s*\S*_attn_implementation\b")


def _literal(node) -> str | None:
    return node.value if isinstance(node, cst.Name) and node.value in _LITERALS else None


class _AttnImplementation(Pass):
    name = "constants"

    def leave_Comparison(self, original: cst.Comparison, updated: cst.Comparison):
        if len(updated.comparisons) != 1:
            return updated
        comp = updated.comparisons[0]
        sides = (updated.left, comp.comparator)
        if not any(isinstance(s, cst.Attribute) and s.attr.value == "_attn_implementation" for s in sides) or \
                not any(isinstance(s, cst.SimpleString) for s in sides):
            return updated
        if isinstance(comp.operator, (cst.Equal, cst.NotEqual)):
            value = isinstance(comp.operator, cst.NotEqual)
            self.ctx.report.change("constants", self.ctx.lines.of(original),
                                   f"`{code(original)}` -> {value} (the engine's own attention runs)")
            return cst.Name(repr(value))
        return updated


class _NoCrossAttention(Pass):
    """A decoder-only causal LM has no encoder: `<config>.add_cross_attention` is False, and so is an
    `is_cross_attention` constructor parameter and the `self.<attr>` that stores it."""

    name = "constants"
    PARAMS = ("is_cross_attention",)

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.attrs: set[str] = set()
        init = next((s for s in node.body.body if isinstance(s, cst.FunctionDef) and s.name.value == "__init__"), None)
        if init is None or not any(p.name.value in self.PARAMS for p in init.params.params):
            return
        for attr, value in init_assignments(node):
            if isinstance(value, cst.Name) and value.value in self.PARAMS:
                self.attrs.add(attr)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.params = {p.name.value for p in node.params.params if p.name.value in self.PARAMS}

    def leave_AssignTarget(self, original, updated):
        return updated.with_changes(target=original.target)

    def leave_Param(self, original, updated):
        return original

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        if original.attr.value == "add_cross_attention" or self_attr(original) in getattr(self, "attrs", ()):
            self.note(original, f"`{code(original)}` -> False (decoder-only: no cross-attention)")
            return cst.Name("False")
        return updated.with_changes(attr=original.attr)

    def leave_Name(self, original: cst.Name, updated: cst.Name):
        return cst.Name("False") if original.value in getattr(self, "params", ()) else updated


class _Bindings(cst.CSTVisitor):
    """Counts every binding of each name in a function (assignments, loops, with, augmented, walrus)."""

    def __init__(self):
        self.count: Counter[str] = Counter()

    def _bind(self, target):
        names = target_names(target)
        for n in names or []:
            self.count[n] += 1

    def visit_AssignTarget(self, node):
        self._bind(node.target)

    def visit_AugAssign(self, node):
        self._bind(node.target)

    def visit_AnnAssign(self, node):
        self._bind(node.target)

    def visit_For(self, node):
        self._bind(node.target)

    def visit_CompFor(self, node):
        self._bind(node.target)

    def visit_WithItem(self, node):
        if node.asname is not None:
            self._bind(node.asname.name)

    def visit_NamedExpr(self, node):
        self._bind(node.target)

    def visit_Param(self, node):
        self.count[node.name.value] += 1


class _Substitute(cst.CSTTransformer):
    def __init__(self, values: dict[str, str]):
        super().__init__()
        self.values = values

    def leave_Name(self, original, updated):
        return cst.Name(self.values[updated.value]) if updated.value in self.values else updated

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original, updated):
        return updated.with_changes(attr=original.attr)

    def leave_Param(self, original, updated):
        return updated.with_changes(name=original.name)


class _PropagateLocals(Pass):
    """Flow-sensitive at the top level of a function body: after `name = <literal>`, reads of `name` in
    the following statements become the literal, up to the first statement that rebinds it (of which
    only an `if` test is still substituted: `x = None; if x is None: x = ...` is the default-fill
    idiom). The assignment goes when nothing rebinds the name."""

    name = "constants"

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        body = list(updated.body.body)
        changed = False
        i = 0
        while i < len(body):
            stmt = body[i]
            i += 1
            if not (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and
                    isinstance(stmt.body[0], cst.Assign) and len(stmt.body[0].targets) == 1):
                continue
            t, v = stmt.body[0].targets[0].target, stmt.body[0].value
            if not (isinstance(t, cst.Name) and _literal(v) is not None):
                continue
            name, value = t.value, _literal(v)
            rebound = False
            for j in range(i, len(body)):
                b = _Bindings()
                body[j].visit(b)
                if b.count[name]:
                    rebound = True
                    if isinstance(body[j], cst.If):
                        body[j] = body[j].with_changes(test=body[j].test.visit(_Substitute({name: value})))
                    break
                body[j] = body[j].visit(_Substitute({name: value}))
            self.note(stmt, f"local `{name}` is {value} here: substituted into the reads that follow")
            changed = True
            if not rebound:
                body.remove(stmt)
                i -= 1
        if not changed:
            return updated
        return updated.with_changes(body=updated.body.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])]))


class _Fold(Pass):
    """`not C`, `C and x`, `C or x` and `if C:` with C a literal."""

    name = "constants"

    def leave_UnaryOperation(self, original, updated):
        v = _literal(updated.expression)
        if isinstance(updated.operator, cst.Not) and v is not None:
            return cst.Name(repr(not _LITERALS[v]))
        return updated

    def leave_BooleanOperation(self, original, updated):
        v = _literal(updated.left)
        if v is None:
            return updated
        truth = bool(_LITERALS[v])
        if isinstance(updated.operator, cst.And):
            return updated.right if truth else updated.left
        return updated.left if truth else updated.right

    def leave_If(self, original, updated: cst.If):
        v = _literal(updated.test)
        if v is None:
            return updated
        return fold_if(updated, bool(_LITERALS[v]))


def normalise_constants(module: cst.Module, ctx: Context, facts=()) -> cst.Module:
    """Before plumbing (which drops helper methods no branch calls any more): the attention-implementation
    fact, the no-cross-attention fact and `facts`, propagated and folded. Passes, so source lines follow
    the rewritten nodes."""
    # each walk only where its trigger occurs in the code (a walk costs ~0.1 s; the text check ~10 ms)
    before = module.code
    for fact in facts:  # other passes' facts (positions are given), folded here too
        module = fact(module, ctx)
    if _IMPLEMENTATION_TEST.search(before):
        module = module.visit(_AttnImplementation(ctx))
    if "cross_attention" in before:
        module = module.visit(_NoCrossAttention(ctx))
    if module.code == before:  # nothing new became constant
        return module
    return module.visit(_PropagateLocals(ctx)).visit(_Fold(ctx))


def propagate_constants(module: cst.Module, ctx: Context, refold) -> cst.Module:
    """After the inference facts are in: constant locals substituted and folded again by specialise's
    InferenceFacts (`refold`), which runs only when something was substituted."""
    before = module.code
    module = module.visit(_PropagateLocals(ctx))
    return refold(module) if module.code != before else module

