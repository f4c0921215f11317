"""Pass 2a: drop HF training/hub plumbing: other task heads, the PreTrainedModel base class, hub
decorators, `__all__`, post_init, weight-init and embedding getter/setter methods. Blocks become plain
`nn.Module`s; a base class that came from PreTrainedModel gets the `self.config` it relied on."""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, contains, dotted, methods, parse_stmt, self_attr
from porter.convert.imports import import_origins

# decorators that change behaviour and must stay (rope scaling updates, no_grad, python builtins)
_KEEP_DECORATOR_ORIGINS = ("transformers.modeling_rope_utils",)


def _decorator_root(dec: cst.Decorator) -> str:
    expr = dec.decorator.func if isinstance(dec.decorator, cst.Call) else dec.decorator
    return (dotted(expr) or "").split(".")[0]


class DropPlumbing(Pass):
    name = "plumbing"

    def visit_Module(self, node: cst.Module) -> None:
        self.origins = import_origins(node)
        cls = {s.name.value: s for s in node.body if isinstance(s, cst.ClassDef)}
        for name in sorted(self.ctx.roles.pretrained) + [self.ctx.roles.causal_lm]:
            for stmt in cls[name].body.body if name in cls else []:
                if isinstance(stmt, cst.SimpleStatementLine):
                    for small in stmt.body:
                        if isinstance(small, cst.Assign) and code(small.targets[0].target) == \
                                "_keys_to_ignore_on_load_unexpected" and isinstance(small.value, cst.List):
                            for el in small.value.elements:
                                if isinstance(el.value, cst.SimpleString):
                                    self.ctx.ignore_unexpected.append(el.value.evaluated_value)

    def _hf_origin(self, name: str) -> bool:
        origin = self.origins.get(name, "")
        return origin.startswith("transformers.") and not origin.startswith(_KEEP_DECORATOR_ORIGINS)

    def _keep_decorators(self, node, decorators):
        kept = []
        for d in decorators:
            if self._hf_origin(_decorator_root(d)):
                self.note(d, f"dropped decorator @{code(d.decorator)}")
            else:
                kept.append(d)
        return kept

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        return updated.with_changes(decorators=self._keep_decorators(original, updated.decorators))

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        roles, name = self.ctx.roles, original.name.value
        if name in roles.dropped or name in roles.pretrained:
            self.note(original, f"removed class {name} (not needed for causal-LM inference)")
            return cst.RemoveFromParent()
        updated = updated.with_changes(decorators=self._keep_decorators(original, updated.decorators))
        bases = [b for b in updated.bases if not self._is_hf_base(b)]
        had_pretrained = any((dotted(b.value) or "") in roles.pretrained for b in updated.bases)
        if len(bases) != len(updated.bases):
            self.note(original, f"{name}: base classes {', '.join(code(b.value) for b in updated.bases)} -> "
                                f"{', '.join(code(b.value) for b in bases) or 'nn.Module'}")
            updated = updated.with_changes(bases=bases or [cst.Arg(cst.parse_expression("nn.Module"))])
        if name in roles.blocks or name == roles.causal_lm:
            updated = self._trim_methods(updated, original)
        if had_pretrained:
            updated = self._own_config(updated, original)
        return updated

    def _is_hf_base(self, base: cst.Arg) -> bool:
        name = dotted(base.value) or ""
        return name in self.ctx.roles.pretrained or self._hf_origin(name.split(".")[0])

    def _trim_methods(self, cls: cst.ClassDef, original: cst.ClassDef) -> cst.ClassDef:
        """Keep __init__, forward and the helper methods they call; drop getters/setters/init hooks."""
        ms = methods(cls)
        keep = {"__init__", "forward"}
        changed = True
        while changed:
            changed = False
            for m in list(keep):
                if m not in ms:
                    continue
                for other in ms:
                    if other not in keep and contains(ms[m], lambda n, o=other: self_attr(n) == o):
                        keep.add(other)
                        changed = True
        body = []
        for stmt in cls.body.body:
            if isinstance(stmt, cst.FunctionDef) and stmt.name.value not in keep:
                self.note(stmt, f"{cls.name.value}.{stmt.name.value}: HF plumbing method dropped")
                continue
            body.append(stmt)
        return cls.with_changes(body=cls.body.with_changes(body=body))

    def _own_config(self, cls: cst.ClassDef, original: cst.ClassDef) -> cst.ClassDef:
        """PreTrainedModel provided `self.config` and `post_init()`; a plain module sets the former itself."""
        ms = methods(cls)
        init = ms.get("__init__")
        if init is None:
            return cls
        params = [p.name.value for p in init.params.params]
        cfg = params[1] if len(params) > 1 else None
        assigns_config = contains(init, lambda n: isinstance(n, cst.AssignTarget) and self_attr(n.target) == "config")
        body = []
        for stmt in init.body.body:
            if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Expr):
                call = stmt.body[0].value
                if isinstance(call, cst.Call) and self_attr(call.func) == "post_init":
                    self.note(stmt, f"{cls.name.value}: dropped self.post_init() (PreTrainedModel weight init)")
                    continue
                if isinstance(call, cst.Call) and isinstance(call.func, cst.Attribute) and \
                        code(call.func) == "super().__init__" and call.args:
                    stmt = stmt.with_changes(body=[stmt.body[0].with_changes(value=call.with_changes(args=[]))])
                    body.append(stmt)
                    if cfg and not assigns_config:
                        body.append(parse_stmt(f"self.config = {cfg}\n"))
                    continue
            body.append(stmt)
        new_init = init.with_changes(body=init.body.with_changes(body=body))
        return cls.with_changes(body=cls.body.with_changes(
            body=[new_init if s is init else s for s in cls.body.body]))

    def leave_SimpleStatementLine(self, original, updated):
        for small in updated.body:
            if isinstance(small, cst.Assign) and code(small.targets[0].target) == "__all__":
                self.note(original, "dropped __all__")
                return cst.RemoveFromParent()
        return updated
