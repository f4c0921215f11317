"""Pass 2b: specialise the blocks for inference by partial evaluation.

Facts: `training` is False, there is no HF cache, no attention mask, no labels, no attention/hidden
state outputs, no gradient checkpointing and no extra `**kwargs`. The facts are substituted, branches
that become constant are folded, dropout becomes the identity, and the dead code left behind is
deleted: assignments nobody reads, empty branches, parameters nobody uses and the call-site arguments
that fed them.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as matchers

from porter.convert.context import Context, Pass
from porter.convert.cst_util import (
    code,
    dotted,
    fold_if,
    init_assignments,
    is_pure,
    loads,
    methods,
    self_attr,
    target_names,
    with_args,
    with_params,
)

NONE_PARAMS = {
    "attention_mask", "past_key_values", "past_key_value", "layer_past", "cache", "cache_position", "labels",
    "head_mask", "encoder_hidden_states", "encoder_attention_mask", "token_type_ids",
}
FALSE_PARAMS = {"use_cache", "output_attentions", "output_hidden_states"}
FALSE_ATTRS = {"training", "gradient_checkpointing"}


def _constant(node: cst.CSTNode) -> bool | None | str:
    """True/False/None literal -> its value; anything else -> the sentinel "?"."""
    if isinstance(node, cst.Name) and node.value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[node.value]
    return "?"


def _lit(value) -> cst.Name:
    return cst.Name(repr(value))


def _annotated_cache(param: cst.Param) -> bool:
    return param.annotation is not None and "Cache" in code(param.annotation.annotation)


def _block_body(stmts) -> list:
    return list(stmts) or [cst.SimpleStatementLine([cst.Pass()])]


class InferenceFacts(Pass):
    """Substitute the inference facts into block forwards, drop their parameters and fold constants."""

    name = "specialise"
    scope = "blocks"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self._cls: list[str] = []
        self._facts: list[dict[str, object]] = []
        self._elifs: set[int] = set()

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._cls.append(node.name.value)

    def leave_ClassDef(self, original, updated):
        self._cls.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        facts: dict[str, object] = {}
        if self._cls and self._cls[-1] in self.ctx.roles.blocks:
            for p in (*node.params.params, *node.params.kwonly_params):
                n = p.name.value
                if n in NONE_PARAMS or _annotated_cache(p):
                    facts[n] = None
                elif n in FALSE_PARAMS:
                    facts[n] = False
            if node.params.star_kwarg is not None:
                facts[node.params.star_kwarg.name.value] = "**"
        self._facts.append(facts)

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        facts = self._facts.pop()
        if not facts:
            return updated
        p = updated.params
        keep = [x for x in p.params if x.name.value not in facts]
        kw = [x for x in p.kwonly_params if x.name.value not in facts]
        dropped = [x.name.value for x in (*p.params, *p.kwonly_params) if x.name.value in facts]
        if p.star_kwarg is not None:
            dropped.append("**" + p.star_kwarg.name.value)
        self.note(original, f"{self._where(original)}: dropped parameters {', '.join(dropped)} "
                            "(inference: no cache, mask, labels or extra outputs)")
        if kw:  # keyword-only parameters that survive keep their `*` marker
            return updated.with_changes(params=p.with_changes(params=keep, kwonly_params=kw, star_kwarg=None))
        return updated.with_changes(params=with_params(p, keep))

    def _where(self, fn: cst.FunctionDef) -> str:
        return f"{self._cls[-1]}.{fn.name.value}" if self._cls else fn.name.value

    def _fact(self, name: str):
        return self._facts[-1].get(name, "?") if self._facts else "?"

    def leave_Name(self, original: cst.Name, updated: cst.Name):
        value = self._fact(original.value)
        if value is None or value is False:
            return _lit(value)
        return updated

    # names in these positions are not reads: undo the substitution
    def leave_Arg(self, original: cst.Arg, updated: cst.Arg):
        if original.keyword is not None:
            updated = updated.with_changes(keyword=original.keyword)
        return updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        updated = updated.with_changes(attr=original.attr)
        if self._facts and self._facts[-1] is not None and code(original.value) == "self" \
                and original.attr.value in FALSE_ATTRS and self._cls and self._cls[-1] in self.ctx.roles.blocks:
            return _lit(False)
        return updated

    def leave_AssignTarget(self, original, updated):
        return updated.with_changes(target=original.target) if target_names(original.target) else updated

    def leave_Param(self, original, updated):
        return updated.with_changes(name=original.name)

    # ---- folding
    def leave_Comparison(self, original, updated):
        if len(updated.comparisons) != 1:
            return updated
        left, comp = _constant(updated.left), updated.comparisons[0]
        right = _constant(comp.comparator)
        if left == "?" or right == "?":
            return updated
        if isinstance(comp.operator, cst.Is):
            return _lit(left is right)
        if isinstance(comp.operator, cst.IsNot):
            return _lit(left is not right)
        return updated

    def leave_Call(self, original, updated):
        if dotted(updated.func) == "isinstance" and updated.args and _constant(updated.args[0].value) is None:
            return _lit(False)
        kept = [a for a in updated.args if not (a.star == "**" and self._fact(code(a.value)) == "**")]
        return with_args(updated, kept) if len(kept) != len(updated.args) else updated

    def leave_UnaryOperation(self, original, updated):
        if isinstance(updated.operator, cst.Not):
            v = _constant(updated.expression)
            if v != "?":
                return _lit(not v)
        return updated

    def leave_BooleanOperation(self, original, updated):
        left, right = _constant(updated.left), _constant(updated.right)
        is_and = isinstance(updated.operator, cst.And)
        if left != "?":
            if is_and:
                return updated.right if left else _lit(left)
            return _lit(left) if left else updated.right
        if right != "?" and is_pure(updated.left):
            if is_and and not right:
                return _lit(right)
            if not is_and and right:
                return _lit(right)
        return updated

    def leave_IfExp(self, original, updated):
        v = _constant(updated.test)
        if v == "?":
            return updated
        return updated.body if v else updated.orelse

    def visit_If(self, node: cst.If) -> None:
        if isinstance(node.orelse, cst.If):
            self._elifs.add(id(node.orelse))

    def leave_If(self, original: cst.If, updated: cst.If):
        v = _constant(updated.test)
        if v == "?":
            return updated
        self.note(original, f"folded `if {code(original.test)}:` (always {bool(v)} at inference)")
        if id(original) in self._elifs:  # an `elif`: it can only become an `else` or disappear
            if v:
                return cst.Else(body=updated.body)
            return updated.orelse if updated.orelse is not None else cst.RemoveFromParent()
        return fold_if(updated, bool(v))

    def leave_IndentedBlock(self, original, updated):
        return updated.with_changes(body=_block_body(updated.body)) if not updated.body else updated


class DropDropout(Pass):
    """Dropout is the identity at inference: drop the modules and unwrap their calls."""

    name = "specialise"
    scope = "classes"  # dropout in any class (the engine never calls .eval())

    def visit_Module(self, node: cst.Module) -> None:
        self.dropout_attrs: set[str] = set()
        for s in node.body:
            if isinstance(s, cst.ClassDef):
                for attr, value in init_assignments(s):
                    if isinstance(value, cst.Call) and (dotted(value.func) or "").endswith("Dropout"):
                        self.dropout_attrs.add(attr)

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        attr = self_attr(updated.func)
        name = dotted(updated.func) or ""
        if (attr in self.dropout_attrs or name.endswith("functional.dropout") or name == "F.dropout") \
                and updated.args:
            self.note(original, f"dropout `{code(original.func)}` removed (identity at inference)")
            return updated.args[0].value
        return updated

    def leave_SimpleStatementLine(self, original, updated):
        body = []
        for small in updated.body:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                t = small.targets[0].target
                if self_attr(t) in self.dropout_attrs and isinstance(small.value, cst.Call):
                    continue
                if isinstance(t, cst.Name) and isinstance(small.value, cst.Name) and t.value == small.value.value:
                    continue  # `x = x` left by unwrapping a dropout call
            body.append(small)
        if not body:
            return cst.RemoveFromParent()
        return updated.with_changes(body=body)


# ---------------------------------------------------------------- call sites and dead code
def callee_map(module: cst.Module) -> dict[str, dict[str, str]]:
    """class -> {attribute: class constructed into it} (ModuleLists map to their item class)."""
    names = {s.name.value for s in module.body if isinstance(s, cst.ClassDef)}
    out: dict[str, dict[str, str]] = {}
    for s in module.body:
        if not isinstance(s, cst.ClassDef):
            continue
        attrs = {}
        for attr, value in init_assignments(s):
            if isinstance(value, cst.Call):
                ctor = dotted(value.func)
                if ctor in names:
                    attrs[attr] = ctor
                elif (ctor or "").endswith("ModuleList") and value.args:
                    inner = value.args[0].value
                    elt = inner.elt if isinstance(inner, (cst.ListComp, cst.GeneratorExp)) else None
                    if isinstance(elt, cst.Call) and dotted(elt.func) in names:
                        attrs[attr] = dotted(elt.func)
        out[s.name.value] = attrs
    return out


def forward_signature(cls: cst.ClassDef) -> tuple[list[str], bool] | None:
    fwd = methods(cls).get("forward")
    if fwd is None:
        return None
    p = fwd.params
    return [x.name.value for x in (*p.posonly_params, *p.params)][1:] + \
        [x.name.value for x in p.kwonly_params], p.star_kwarg is not None


class _CallSites(Pass):
    """Drops arguments that bind to parameters a callee no longer has (positional ones by the
    signature the call sites were written against)."""

    name = "specialise"
    scope = "blocks"  # callers of in-file classes are the blocks themselves

    def __init__(self, ctx, assumed: dict, current: dict, callees: dict):
        super().__init__(ctx)
        self.assumed, self.current, self.callees = assumed, current, callees
        self._cls: list[str] = []
        self._loop_vars: list[dict[str, str]] = []

    def visit_ClassDef(self, node):
        self._cls.append(node.name.value)

    def leave_ClassDef(self, original, updated):
        self._cls.pop()
        return updated

    def visit_FunctionDef(self, node):
        self._loop_vars.append({})

    def leave_FunctionDef(self, original, updated):
        self._loop_vars.pop()
        return updated

    def visit_For(self, node: cst.For) -> None:
        if not self._cls or not self._loop_vars:
            return
        attrs = self.callees.get(self._cls[-1], {})
        for n in _walk_attrs(node.iter):
            if n in attrs:
                targets = target_names(node.target) or []
                if targets:
                    self._loop_vars[-1][targets[-1]] = attrs[n]

    def _callee(self, call: cst.Call) -> str | None:
        attr = self_attr(call.func)
        if attr and self._cls:
            return self.callees.get(self._cls[-1], {}).get(attr)
        if isinstance(call.func, cst.Name) and self._loop_vars:
            return self._loop_vars[-1].get(call.func.value)
        return None

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        callee = self._callee(original)
        if callee is None or callee not in self.current:
            return updated
        assumed, _ = self.assumed[callee]
        params, has_kwargs = self.current[callee]
        args, dropped, pos = [], [], 0
        for a in updated.args:
            if a.star == "**":
                if has_kwargs:
                    args.append(a)
                else:
                    dropped.append(code(a.value))
                continue
            if a.star == "*":
                args.append(a)
                continue
            if a.keyword is None:
                bound = assumed[pos] if pos < len(assumed) else None
                pos += 1
            else:
                bound = a.keyword.value
            if bound in params or (a.keyword is not None and has_kwargs):
                args.append(a)
            else:
                dropped.append(bound or code(a.value))
        if not dropped:
            return updated
        self.note(original, f"call to {callee}: dropped arguments {', '.join(dropped)}")
        return with_args(updated, args)


def _walk_attrs(node: cst.CSTNode) -> list[str]:
    return [a for n in matchers.findall(node, matchers.Attribute()) if (a := self_attr(n))]


def _stored_names(target) -> list[str] | None:
    """Names an assignment writes: plain targets, or the container of `x[key] = ...`."""
    if isinstance(target, cst.Subscript) and isinstance(target.value, cst.Name):
        return [target.value.value]
    return target_names(target)


def _prune_block(stmts, used, notes) -> list:
    out = []
    for s in stmts:
        if isinstance(s, cst.SimpleStatementLine):
            body = []
            for small in s.body:
                if isinstance(small, (cst.Assign, cst.AnnAssign)) and small.value is not None:
                    targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
                    names = [n for t in targets for n in (_stored_names(t) or ["<complex>"])]
                    if "<complex>" not in names and not any(used[n] for n in names) and is_pure(small.value):
                        notes.append((s, f"removed dead assignment `{code(small).strip()[:60]}`"))
                        continue
                if isinstance(small, cst.Pass) and len(stmts) > 1:
                    continue
                body.append(small)
            if body:
                out.append(s.with_changes(body=body))
        elif isinstance(s, cst.If):
            body = _prune_block(s.body.body, used, notes)
            orelse = s.orelse
            if isinstance(orelse, cst.Else):
                rest = _prune_block(orelse.body.body, used, notes)
                orelse = orelse.with_changes(body=orelse.body.with_changes(body=_block_body(rest))) if rest else None
            elif isinstance(orelse, cst.If):
                pruned = _prune_block([orelse], used, notes)
                orelse = pruned[0] if pruned else None
            if not body and orelse is None and is_pure(s.test):
                notes.append((s, f"removed empty branch `if {code(s.test)[:60]}:`"))
                continue
            out.append(s.with_changes(body=s.body.with_changes(body=_block_body(body)), orelse=orelse))
        elif isinstance(s, (cst.For, cst.While, cst.With)):
            out.append(s.with_changes(body=s.body.with_changes(body=_block_body(
                _prune_block(s.body.body, used, notes)))))
        else:
            out.append(s)
    return out


class DropDeadCode(Pass):
    """Deletes assignments nobody reads (unless they run a submodule) and branches left empty."""

    name = "specialise"
    scope = "blocks"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._cls: list[str] = []

    def visit_ClassDef(self, node):
        self._cls.append(node.name.value)

    def leave_ClassDef(self, original, updated):
        self._cls.pop()
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if not self._cls or self._cls[-1] not in self.ctx.roles.blocks:
            return updated
        fn = updated
        while True:
            notes: list = []
            body = _prune_block(fn.body.body, loads(fn), notes)
            if not notes:
                return self._unused_params(original, fn)
            for node, msg in notes:
                self.ctx.report.change(self.name, self.line(node, self._cls[-1]), f"{self._cls[-1]}.{fn.name.value}: {msg}")
            fn = fn.with_changes(body=fn.body.with_changes(body=_block_body(body)))

    def _unused_params(self, original: cst.FunctionDef, fn: cst.FunctionDef) -> cst.FunctionDef:
        """Parameters a block's forward never reads go (the base model's signature is fixed)."""
        if fn.name.value != "forward" or self._cls[-1] == self.ctx.roles.base:
            return fn
        used = loads(fn.body)
        p = fn.params
        keep = [x for x in p.params if x.name.value == "self" or used[x.name.value]]
        if len(keep) == len(p.params):
            return fn
        gone = [x.name.value for x in p.params if x not in keep]
        self.note(original, f"{self._cls[-1]}.forward: dropped unused parameters {', '.join(gone)}")
        return fn.with_changes(params=with_params(p, keep))


def signatures(module: cst.Module) -> dict[str, tuple[list[str], bool]]:
    out = {}
    for s in module.body:
        if isinstance(s, cst.ClassDef):
            sig = forward_signature(s)
            if sig is not None:
                out[s.name.value] = sig
    return out


def prune(module: cst.Module, ctx: Context, assumed: dict) -> tuple[cst.Module, dict]:
    """Call-site cleanup, unused parameters and dead code, to a fixpoint. `assumed` is the signature
    each class's call sites were written against; returns the module and the now-current signatures."""
    callees = callee_map(module)
    module = module.visit(_CallSites(ctx, assumed, signatures(module), callees))
    assumed = signatures(module)
    for _ in range(8):
        before = len(ctx.report.changes)
        module = module.visit(DropDeadCode(ctx))
        module = module.visit(_CallSites(ctx, assumed, signatures(module), callees))
        assumed = signatures(module)
        if len(ctx.report.changes) == before:
            break
    return module, assumed
