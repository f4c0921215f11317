"""Learned absolute position embeddings fed by the engine's positions.

The engine always passes positions, so in any function a `position_ids is None` test is False (and
`is not None` True): the HF fallback that derives positions from the attention mask (OPT's
`cumsum(attention_mask)`) folds away. An nn.Embedding subclass whose forward then no longer reads some
of its parameters (`attention_mask`, `past_key_values_length`) loses them, and its call sites lose the
arguments bound to them, leaving `self.embed_positions(position_ids)`.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, init_assignments, loads, methods, param_names, self_call_attr


class PositionsGiven(Pass):
    name = "positions"

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.given = "position_ids" in param_names(node)

    def leave_Comparison(self, original: cst.Comparison, updated: cst.Comparison):
        if not getattr(self, "given", False) or len(updated.comparisons) != 1:
            return updated
        comp = updated.comparisons[0]
        if code(updated.left) == "position_ids" and code(comp.comparator) == "None" and \
                isinstance(comp.operator, (cst.Is, cst.IsNot)):
            value = isinstance(comp.operator, cst.IsNot)
            self.note(original, f"`{code(original)}` -> {value} (the engine always passes positions)")
            return cst.Name(repr(value))
        return updated


class UnusedEmbeddingInputs(Pass):
    """Drop the forward parameters an nn.Embedding subclass no longer reads, and their arguments."""

    name = "positions"

    def visit_Module(self, node: cst.Module) -> None:
        self.dropped: dict[str, tuple[list[str], list[str]]] = {}  # class -> (old params, dropped)
        for s in node.body:
            if isinstance(s, cst.ClassDef) and s.name.value in self.ctx.roles.embedding_subclasses:
                fwd = methods(s).get("forward")
                if fwd is None:
                    continue
                params = param_names(fwd)[1:]
                used = loads(fwd.body)
                gone = [p for p in params if not used[p]]
                if gone:
                    self.dropped[s.name.value] = (params, gone)
        self.owner: dict[str, str] = {}

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.owner = {a: code(v.func) for a, v in init_assignments(node) if isinstance(v, cst.Call)}
        self.cls = node.name.value

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        cls = getattr(self, "cls", None)
        if updated.name.value != "forward" or cls not in self.dropped:
            return updated
        _, gone = self.dropped[cls]
        keep = [p for p in updated.params.params if p.name.value not in gone]
        keep[-1] = keep[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        self.note(original, f"{cls}.forward: dropped parameters {', '.join(gone)} (positions are given)")
        return updated.with_changes(params=updated.params.with_changes(params=keep))

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        target = self.owner.get(self_call_attr(updated) or "")
        if target not in self.dropped:
            return updated
        params, gone = self.dropped[target]
        args, pos = [], 0
        for a in updated.args:
            bound = a.keyword.value if a.keyword is not None else (params[pos] if pos < len(params) else None)
            pos += a.keyword is None
            if bound not in gone:
                args.append(a)
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        self.note(original, f"call to {target}: dropped the arguments of {', '.join(gone)}")
        return updated.with_changes(args=args)


def positions_given(module: cst.Module, ctx) -> cst.Module:
    return module.visit(PositionsGiven(ctx)) if "position_ids is" in module.code else module


def unused_embedding_inputs(module: cst.Module, ctx) -> cst.Module:
    return module.visit(UnusedEmbeddingInputs(ctx)) if ctx.roles.embedding_subclasses else module
