"""Pass: a gated MLP's `self.act_fn(gate) * up` over a fused gate_up -> the engine's `get_act_and_mul_fn`
(one Triton launch on CUDA, the same torch math on CPU).

A class qualifies, judged from its code: __init__ sets `self.A = ACT2FN[KEY]` (ACT2FN imported from
transformers.activations) and `self.P = MergedColumnParallelLinear(in, [n, n], ...)` (two equal halves, so
[gate | up] splits in the middle on every rank); forward does `GU, _ = self.P(...)`, `G, U =
GU.split(self.P.output_partition_sizes, dim=-1)` (or `GU.chunk(2, dim=-1)`) and uses G and U only in
`self.A(G) * U`, and nothing outside the class reads A. KEY is a string literal or a config field: the
engine's `get_act_and_mul_fn` takes any HF activation name (fused kernel where it has one, HF's own
activation otherwise), so the choice happens when the model is built from the checkpoint's config.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as matchers
from transformers.activations import ACT2FN

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted, loads, methods, same_code, self_attr
from porter.convert.engine_imports import add_import, bound_names

ENGINE_MODULE = "porter.engine.layers.activation"
ENGINE_NAME = "get_act_and_mul_fn"
NEW_ATTR = "act_and_mul"


def _act2fn_imported(module: cst.Module) -> bool:
    for stmt in module.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for s in stmt.body:
                if isinstance(s, cst.ImportFrom) and dotted(s.module) == "transformers.activations" and \
                        not isinstance(s.names, cst.ImportStar) and \
                        any(code(a.name) == "ACT2FN" and a.asname is None for a in s.names):
                    return True
    return False


def _init_facts(init: cst.FunctionDef):
    """{attr: ACT2FN key} and {attr: MergedColumnParallelLinear call} from __init__'s `self.attr = ...`."""
    acts, merged = {}, {}
    for stmt in init.body.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for s in stmt.body:
            if not (isinstance(s, cst.Assign) and len(s.targets) == 1 and self_attr(s.targets[0].target)):
                continue
            attr, v = self_attr(s.targets[0].target), s.value
            if isinstance(v, cst.Subscript) and dotted(v.value) == "ACT2FN" and len(v.slice) == 1 and \
                    isinstance(v.slice[0].slice, cst.Index):
                acts[attr] = (s, v.slice[0].slice.value)
            elif isinstance(v, cst.Call) and dotted(v.func) == "MergedColumnParallelLinear":
                merged[attr] = v
    return acts, merged


def _equal_halves(call: cst.Call) -> bool:
    sizes = next((a.value for a in call.args if a.keyword is not None and a.keyword.value == "output_sizes"), None)
    positional = [a.value for a in call.args if a.keyword is None and not a.star]
    sizes = sizes if sizes is not None else (positional[1] if len(positional) > 1 else None)
    return isinstance(sizes, (cst.List, cst.Tuple)) and len(sizes.elements) == 2 and \
        same_code(sizes.elements[0].value, sizes.elements[1].value)


def _split(s, merged_attr: str):
    """(gate, up, gate_up) names of `G, U = GU.split(self.P.output_partition_sizes, dim=-1)` / `.chunk(2, dim=-1)`."""
    if not (isinstance(s, cst.Assign) and len(s.targets) == 1 and isinstance(s.targets[0].target, cst.Tuple)):
        return None
    els = s.targets[0].target.elements
    v = s.value
    if len(els) != 2 or not all(isinstance(e.value, cst.Name) for e in els) or not isinstance(v, cst.Call) or \
            not isinstance(v.func, cst.Attribute) or not isinstance(v.func.value, cst.Name):
        return None
    args = "".join(code(cst.Call(func=cst.Name("f"), args=v.args)).split())
    ok = (v.func.attr.value == "split" and args == f"f(self.{merged_attr}.output_partition_sizes,dim=-1)") or \
        (v.func.attr.value == "chunk" and args == "f(2,dim=-1)")
    return (els[0].value.value, els[1].value.value, v.func.value.value) if ok else None


def _projection(s, merged_attr: str) -> str | None:
    """GU of `GU, _ = self.P(...)` or `GU = self.P(...)[0]`."""
    if not (isinstance(s, cst.Assign) and len(s.targets) == 1):
        return None
    t, v = s.targets[0].target, s.value
    if isinstance(t, cst.Tuple) and len(t.elements) == 2 and isinstance(t.elements[0].value, cst.Name) and \
            isinstance(v, cst.Call) and self_attr(v.func) == merged_attr:
        return t.elements[0].value.value
    if isinstance(t, cst.Name) and isinstance(v, cst.Subscript) and isinstance(v.value, cst.Call) and \
            self_attr(v.value.func) == merged_attr and len(v.slice) == 1 and code(v.slice[0]).strip() == "0":
        return t.value
    return None


class _ActMul(cst.CSTTransformer):
    """`self.A(G) * U` -> `self.act_and_mul(GU)`."""

    def __init__(self, act: str, gate: str, up: str, gate_up: str):
        super().__init__()
        self.act, self.gate, self.up, self.gate_up, self.count = act, gate, up, gate_up, 0

    def leave_BinaryOperation(self, original, updated):
        l, r = updated.left, updated.right
        if isinstance(updated.operator, cst.Multiply) and isinstance(l, cst.Call) and self_attr(l.func) == self.act \
                and len(l.args) == 1 and code(l.args[0].value) == self.gate and \
                isinstance(r, cst.Name) and r.value == self.up:
            self.count += 1
            return cst.parse_expression(f"self.{NEW_ATTR}({self.gate_up})").with_changes(
                lpar=updated.lpar, rpar=updated.rpar)
        return updated


class EngineActivation(Pass):
    name = "engine_activation"

    def run(self, module: cst.Module) -> cst.Module:
        if not _act2fn_imported(module):
            return module
        foreign = _foreign_attr_reads(module)
        self.engine_name = ENGINE_NAME if ENGINE_NAME not in bound_names(module) else "engine_" + ENGINE_NAME
        body, changed = [], False
        for stmt in module.body:
            if isinstance(stmt, cst.ClassDef):
                new = self._class(stmt, foreign)
                changed |= new is not stmt
                stmt = new
            body.append(stmt)
        if not changed:
            return module
        module = module.with_changes(body=body)
        if not loads(module)["ACT2FN"]:
            module = _drop_act2fn_import(module)
        return add_import(module, ENGINE_MODULE, ENGINE_NAME, self.engine_name)

    def _class(self, cls: cst.ClassDef, foreign: set[str]) -> cst.ClassDef:
        ms = methods(cls)
        if "__init__" not in ms or "forward" not in ms:
            return cls
        acts, merged = _init_facts(ms["__init__"])
        fwd = ms["forward"]
        for act, (init_stmt, key) in acts.items():
            for p, call in merged.items():
                found = self._match(fwd, act, p)
                if found is None:
                    continue
                gate, up, gate_up, split_line = found
                why = self._blocked(cls, act, call, key, foreign)
                if why:
                    self.note(cls, f"{cls.name.value}: `self.{act}({gate}) * {up}` kept: {why}")
                    return cls
                return self._swap(cls, act, key, init_stmt, gate, up, gate_up, split_line)
        return cls

    @staticmethod
    def _match(fwd: cst.FunctionDef, act: str, merged_attr: str):
        lines = [s for s in fwd.body.body if isinstance(s, cst.SimpleStatementLine) and len(s.body) == 1]
        projected = {_projection(s.body[0], merged_attr) for s in lines} - {None}
        for line in lines:
            names = _split(line.body[0], merged_attr)
            if names and names[2] in projected:
                v = _ActMul(act, *names)
                fwd.visit(v)
                used = loads(fwd.body)
                if v.count == 1 and used[names[0]] == 1 and used[names[1]] == 1:
                    return (*names, line)
        return None

    def _blocked(self, cls, act, merged_call, key, foreign) -> str | None:
        if act in foreign:
            return f"`{act}` is read from outside the class"
        if NEW_ATTR in {self_attr(n) for n in _attributes(cls)} - {None}:
            return f"the class already has an attribute `{NEW_ATTR}`"
        if loads(cls).get("ACT2FN", 0) != 1 or sum(1 for n in _attributes(cls) if self_attr(n) == act) != 2:
            return f"`self.{act}` or ACT2FN is used elsewhere in the class"
        if not _equal_halves(merged_call):
            return "gate_up's two output sizes are not the same expression"
        if isinstance(key, (cst.SimpleString, cst.ConcatenatedString)):
            name = key.evaluated_value
            if not isinstance(name, str) or name not in ACT2FN:
                return f"activation {code(key)} is not one HF's ACT2FN knows"
        elif not isinstance(key, cst.Attribute):
            return f"activation `{code(key)}` is not a literal or a config field"
        return None

    def _swap(self, cls, act, key, init_stmt, gate, up, gate_up, split_line) -> cst.ClassDef:
        new_init = init_stmt.with_changes(
            targets=[cst.AssignTarget(cst.parse_expression(f"self.{NEW_ATTR}"))],
            value=cst.Call(func=cst.Name(self.engine_name), args=[cst.Arg(key)]))

        class Edit(cst.CSTTransformer):
            def leave_Assign(self, original, updated):
                return new_init if original is init_stmt else updated

            def leave_SimpleStatementLine(self, original, updated):
                return cst.RemovalSentinel.REMOVE if original is split_line else updated

        cls = cls.visit(Edit())
        fwd = methods(cls)["forward"]
        cls = cls.deep_replace(fwd, fwd.visit(_ActMul(act, gate, up, gate_up)))
        self.note(cls, f"{cls.name.value}: `self.{act}({gate}) * {up}` -> engine {ENGINE_NAME}({code(key)}) "
                       f"on {gate_up}")
        return cls


def _drop_act2fn_import(module: cst.Module) -> cst.Module:
    body = []
    for stmt in module.body:
        s = stmt.body[0] if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 else None
        if isinstance(s, cst.ImportFrom) and dotted(s.module) == "transformers.activations" and \
                not isinstance(s.names, cst.ImportStar):
            names = [a for a in s.names if code(a.name) != "ACT2FN"]
            if not names:
                continue
            stmt = stmt.with_changes(body=[s.with_changes(names=[*names[:-1], names[-1].with_changes(
                comma=cst.MaybeSentinel.DEFAULT)])])
        body.append(stmt)
    return module.with_changes(body=body)


def _attributes(node: cst.CSTNode) -> list[cst.Attribute]:
    return list(matchers.findall(node, matchers.Attribute()))


def _foreign_attr_reads(module: cst.Module) -> set[str]:
    """Attribute names read other than as `self.attr` (`self.mlp.act_fn`, `layer.act_fn`)."""
    return {a.attr.value for a in _attributes(module)
            if not (isinstance(a.value, cst.Name) and a.value.value == "self")}


def engine_activation(module: cst.Module, ctx) -> cst.Module:
    return EngineActivation(ctx).run(module)
