"""Pass: per-head q/k norms just before the rotary are handed to the rotary call.

    query_states = self.q_norm(q.view(hidden_shape))          query_states = q.view(hidden_shape)
    key_states = self.k_norm(k.view(hidden_shape))      ->    key_states = k.view(hidden_shape)
    ...                                                        ...
    query_states, key_states = apply_rotary_cos_sin(           query_states, key_states = apply_rotary_cos_sin(
        query_states, key_states, cos, sin)                        query_states, key_states, cos, sin,
                                                                   q_norm=self.q_norm, k_norm=self.k_norm)

`apply_rotary_cos_sin(..., q_norm, k_norm)` is defined as `q_norm(q)`, `k_norm(k)` and then the rotary, so
the rewrite is exact; on CUDA, engine RMSNorms over the head dim run inside the rotary's launch (two
launches fewer a layer in a decode step of a few microseconds each). It applies where the two norm
statements are consecutive, the norms are engine norms built in the class's __init__, and nothing
between them and the rotary call reads or rebinds the two names.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import append_arg, dotted, loads, target_names
from porter.convert.engine_residual import _name, norm_assignment, rewrite_norm_classes

ROTARY = "apply_rotary_cos_sin"


def _rotary_call(stmt, q: str, k: str) -> cst.Call | None:
    """The `apply_rotary_cos_sin(q, k, cos, sin)` call of a `a, b = ...` statement."""
    if not (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign)):
        return None
    call = stmt.body[0].value
    if not isinstance(call, cst.Call) or dotted(call.func) != ROTARY or len(call.args) != 4 or \
            any(a.keyword is not None or a.star for a in call.args):
        return None
    return call if (_name(call.args[0].value), _name(call.args[1].value)) == (q, k) else None


def _touches(stmt, names: set[str]) -> bool:
    if set(loads(stmt)) & names:
        return True
    for node in ([stmt] if not isinstance(stmt, cst.SimpleStatementLine) else stmt.body):
        for target in getattr(node, "targets", []):
            if set(target_names(target.target) or []) & names:
                return True
    return not isinstance(stmt, cst.SimpleStatementLine)  # a compound statement: be conservative


class _FoldNorms(cst.CSTTransformer):
    def __init__(self, owner: "QkNormRotary", cls: str, norms: set[str]):
        super().__init__()
        self.owner, self.cls, self.norms = owner, cls, norms

    def leave_IndentedBlock(self, original, updated):
        body = list(updated.body)
        for i in range(len(body) - 2):
            first, second = norm_assignment(body[i], self.norms), norm_assignment(body[i + 1], self.norms)
            if not first or not second or first[0] == second[0]:
                continue
            j = next((j for j in range(i + 2, len(body)) if _rotary_call(body[j], first[0], second[0])
                      or _rotary_call(body[j], second[0], first[0]) or _touches(body[j], {first[0], second[0]})),
                     None)
            call = None if j is None else (_rotary_call(body[j], first[0], second[0])
                                           or _rotary_call(body[j], second[0], first[0]))
            if call is None:
                continue
            q, k = (first, second) if _name(call.args[0].value) == first[0] else (second, first)
            for n in (i, i + 1):
                name, _, arg = norm_assignment(body[n], self.norms)
                body[n] = body[n].with_changes(body=[body[n].body[0].with_changes(value=arg)])
            new_call = call
            for kw, attr in (("q_norm", q[1]), ("k_norm", k[1])):
                new_call = append_arg(new_call, cst.Arg(cst.parse_expression(f"self.{attr}"), keyword=cst.Name(kw),
                                                        equal=cst.AssignEqual(cst.SimpleWhitespace(""),
                                                                              cst.SimpleWhitespace(""))))
            body[j] = body[j].with_changes(body=[body[j].body[0].with_changes(value=new_call)])
            self.owner.note(original, f"{self.cls}: q/k norms `self.{q[1]}`, `self.{k[1]}` passed to {ROTARY} "
                                      "(one launch on CUDA)")
            return updated.with_changes(body=body)
        return updated


class QkNormRotary(Pass):
    name = "qk_norm_rotary"

    def run(self, module: cst.Module) -> cst.Module:
        if ROTARY not in module.code:
            return module
        return rewrite_norm_classes(module, lambda cls, norms: _FoldNorms(self, cls, norms), min_norms=2)


def qk_norm_rotary(module: cst.Module, ctx) -> cst.Module:
    return QkNormRotary(ctx).run(module)
