"""Pass: helpers written for `[batch, seq]` position ids get a batch of one.

The converter keeps HF helper modules (rotary embeddings above all) when their code is already right
for flat tensors. Some are not: the classic rotary forward does
`inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :]` and so
needs a batch dimension. Such a helper is called with `positions[None]` and its outputs lose the batch
dimension again, which keeps its (exact) HF arithmetic instead of rewriting it. A helper is batch-first
when its forward indexes a parameter as `p[:, ...]` or reads `p.shape[0]`.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as matchers

from porter.convert.context import Pass
from porter.convert.cst_util import classes, code, contains, dotted, init_assignments, methods, param_names, self_attr

_POSITION_NAMES = {"positions", "position_ids"}


def _reads_batch_dim(fn: cst.FunctionDef, param: str) -> bool:
    def is_batch_use(node: cst.CSTNode) -> bool:
        if isinstance(node, cst.Subscript) and isinstance(node.value, cst.Name) and node.value.value == param:
            first = node.slice[0].slice if node.slice else None
            return isinstance(first, cst.Slice) and first.lower is None and first.upper is None and len(node.slice) > 1
        if isinstance(node, cst.Subscript) and dotted(node.value) == f"{param}.shape" and node.slice:
            idx = node.slice[0].slice
            return isinstance(idx, cst.Index) and code(idx.value) == "0"
        return False

    return contains(fn.body, is_batch_use)


def _full_slice(element: cst.SubscriptElement) -> bool:
    sl = element.slice
    return isinstance(sl, cst.Slice) and sl.lower is None and sl.upper is None and sl.step is None


def _batch_first_subscript(fn: cst.FunctionDef) -> cst.Subscript | None:
    """In a function of positions, the first subscript that reads a tensor as [batch, seq, ...] (two or
    more full `:` slices, e.g. `scaling[:, None, :, None]`): a flat [tokens] tensor has one dimension."""
    if not any("position" in p for p in param_names(fn)):
        return None
    hits = [n for n in matchers.findall(fn.body, matchers.Subscript())
            if sum(_full_slice(e) for e in n.slice) >= 2]
    return hits[0] if hits else None


def _returns_tuple(fn: cst.FunctionDef) -> bool:
    return contains(fn.body, lambda n: isinstance(n, cst.Return) and isinstance(n.value, cst.Tuple))


class BatchOfOneHelpers(Pass):
    name = "flatten"
    scope = "classes"

    def visit_Module(self, node: cst.Module) -> None:
        # helper class -> (its batch-first positions parameter: index, name; returns a tuple)
        self.helpers: dict[str, tuple[int, str, bool]] = {}
        for name, cls in classes(node).items():
            forward = methods(cls).get("forward")
            if forward is None or name in self.ctx.roles.blocks:
                continue
            params = param_names(forward)[1:]
            for i, p in enumerate(params):
                if p in _POSITION_NAMES and _reads_batch_dim(forward, p):
                    self.helpers[name] = (i, p, _returns_tuple(forward))
        self._attrs: list[dict[str, str]] = []
        # module-level functions of positions that index batch-first: their results cannot be made flat
        self.batch_first_fns = {stmt.name.value: hit for stmt in node.body if isinstance(stmt, cst.FunctionDef)
                                for hit in [_batch_first_subscript(stmt)] if hit is not None}

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._attrs.append({a: dotted(v.func) for a, v in init_assignments(node)
                            if isinstance(v, cst.Call) and dotted(v.func) in self.helpers})

    def leave_ClassDef(self, original, updated):
        self._attrs.pop()
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        hit = self.batch_first_fns.get(dotted(updated.func) or "")
        if hit is not None:
            self.refuse(original, f"call `{code(original)}`",
                        f"`{dotted(updated.func)}` indexes `{code(hit)}`: it shapes its result for batch-first "
                        "[batch, heads, seq, dim] tensors, and the engine's are [tokens, heads, dim]")
            return updated
        if not self._attrs:
            return updated
        helper = self._attrs[-1].get(self_attr(updated.func) or "")
        if helper is None:
            return updated
        index, param, tuple_out = self.helpers[helper]
        positional = [a for a in updated.args if a.keyword is None]
        target = next((a for a in updated.args if a.keyword is not None and a.keyword.value == param),
                      positional[index] if index < len(positional) else None)
        if target is None or not (isinstance(target.value, cst.Name) and target.value.value in _POSITION_NAMES):
            self.refuse(original, f"call `{code(original)}`",
                        f"{helper}.forward expects [batch, seq] positions and this call's positions are not recognised")
            return updated
        batched = cst.Subscript(target.value, [cst.SubscriptElement(cst.Index(cst.Name("None")))])
        call = updated.with_changes(args=[a.with_changes(value=batched) if a is target else a for a in updated.args])
        if tuple_out:
            new = cst.parse_expression("[t[0] for t in CALL]").visit(_Substitute(call))
        else:
            new = cst.Subscript(call, [cst.SubscriptElement(cst.Index(cst.Integer("0")))])
        self.note(original, f"{helper} expects [batch, seq] positions: called on a batch of one "
                            f"`{code(new)}`")
        return new


class _Substitute(cst.CSTTransformer):
    def __init__(self, call: cst.Call):
        super().__init__()
        self.call = call

    def leave_Name(self, original, updated):
        return self.call if updated.value == "CALL" else updated
