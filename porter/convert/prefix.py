"""Pass 6: thread `prefix` (the module's full state-dict path) through every constructor that builds an
engine layer, so attention layers register under unique names and quantization can match modules.
The base model takes `(*, engine_config, prefix="")` like the top-level model."""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import append_arg, code, contains, dotted, kwarg, methods, param_names, parse_stmt, self_attr

ENGINE_LAYERS = {
    "QKVParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear", "RowParallelLinear",
    "ReplicatedLinear", "VocabParallelEmbedding", "ParallelLMHead", "Attention", "FusedMoE",
}


def prefix_classes(module: cst.Module, ctx) -> set[str]:
    cls = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    needs = set(ctx.roles.embedding_subclasses) & set(cls)
    changed = True
    while changed:
        changed = False
        for name, c in cls.items():
            init = methods(c).get("__init__")
            if name in needs or init is None:
                continue
            if contains(init, lambda n: isinstance(n, cst.Call) and dotted(n.func) in ENGINE_LAYERS | needs):
                needs.add(name)
                changed = True
    return needs


class _PrefixArgs(cst.CSTTransformer):
    """Adds prefix=... to engine-layer / prefixed-class constructions inside one __init__."""

    def __init__(self, targets: set[str], embedding_subclass: bool):
        super().__init__()
        self.targets, self.embedding_subclass = targets, embedding_subclass
        self.attr: str | None = None
        self.comp_var: list[str] = []
        self.count = 0

    def visit_Assign(self, node: cst.Assign) -> None:
        self.attr = self_attr(node.targets[0].target)

    def leave_Assign(self, original, updated):
        self.attr = None
        return updated

    def visit_ListComp(self, node: cst.ListComp) -> None:
        self.comp_var.append(code(node.for_in.target))

    def leave_ListComp(self, original, updated):
        self.comp_var.pop()
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        if code(updated.func) == "super().__init__" and self.embedding_subclass:
            return append_arg(updated, cst.Arg(keyword=cst.Name("prefix"), value=cst.Name("prefix"),
                                               equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))))
        if dotted(updated.func) not in self.targets or kwarg(updated, "prefix") is not None or self.attr is None:
            return updated
        path = f"{{prefix}}.{self.attr}" + (f".{{{self.comp_var[-1]}}}" if self.comp_var else "")
        self.count += 1
        return append_arg(updated, cst.Arg(keyword=cst.Name("prefix"), value=cst.parse_expression(f'f"{path}"'),
                                           equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))))


class ThreadPrefix(Pass):
    name = "prefix"
    scope = "classes"

    def visit_Module(self, node: cst.Module) -> None:
        self.needs = prefix_classes(node, self.ctx)

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = updated.name.value
        if name not in self.needs:
            return updated
        init = methods(updated)["__init__"]
        v = _PrefixArgs(ENGINE_LAYERS | self.needs, name in self.ctx.roles.embedding_subclasses)
        new_init = init.visit(v)
        if name == self.ctx.roles.base:
            new_init = self._engine_signature(new_init)
            self.note(original, f"{name}.__init__(config) -> __init__(*, engine_config, prefix=\"\")")
        elif "prefix" not in param_names(new_init):
            p = new_init.params
            params = list(p.params)
            if params and not isinstance(params[-1].comma, cst.Comma):
                params[-1] = params[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
            params.append(cst.Param(cst.Name("prefix"), annotation=cst.Annotation(cst.Name("str")),
                                    default=cst.SimpleString('""'),
                                    equal=cst.AssignEqual(cst.SimpleWhitespace(" "), cst.SimpleWhitespace(" "))))
            new_init = new_init.with_changes(params=p.with_changes(params=params))
        self.note(original, f"{name}: prefix threaded into {v.count} submodule constructor(s)")
        body = [new_init if s is init else s for s in updated.body.body]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _engine_signature(self, init: cst.FunctionDef) -> cst.FunctionDef:
        cfg = param_names(init)[1] if len(param_names(init)) > 1 else "config"
        template = parse_stmt('def __init__(self, *, engine_config: EngineConfig, prefix: str = "") -> None:\n    pass\n')
        body = list(init.body.body)
        at = next((i + 1 for i, s in enumerate(body) if "super().__init__" in code(s)), 0)
        body.insert(at, parse_stmt(f"{cfg} = engine_config.hf_config\n"))
        return init.with_changes(params=template.params, returns=template.returns,
                                 body=init.body.with_changes(body=body))
