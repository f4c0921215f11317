"""Pass 8: tidy the module: drop module-level helpers nobody calls any more (eager attention,
repeat_kv, loggers), block attributes nobody reads, unused imports; add the engine imports the
rewritten code uses and the pattern of checkpoint keys `load_weights` skips."""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted, loads, methods, parse_stmt, self_attr
from porter.convert.specialise import DropDeadCode

ENGINE_IMPORTS = {
    "EngineConfig": "porter.engine.config",
    "Attention": "porter.engine.layers.attention",
    "ColumnParallelLinear": "porter.engine.layers.linear",
    "MergedColumnParallelLinear": "porter.engine.layers.linear",
    "QKVParallelLinear": "porter.engine.layers.linear",
    "ReplicatedLinear": "porter.engine.layers.linear",
    "RowParallelLinear": "porter.engine.layers.linear",
    "LogitsProcessor": "porter.engine.layers.logits_processor",
    "ParallelLMHead": "porter.engine.layers.vocab_embedding",
    "VocabParallelEmbedding": "porter.engine.layers.vocab_embedding",
    "CheckpointKeyError": "porter.engine.weight_utils",
    "default_weight_loader": "porter.engine.weight_utils",
    "persistent_buffers": "porter.engine.weight_utils",
    "Iterable": "collections.abc",
    "divide": "porter.engine.distributed",
    "get_tp_world_size": "porter.engine.distributed",
    "FusedMoE": "porter.engine.layers.fused_moe",
    "load_expert_weight": "porter.engine.layers.fused_moe",
    "shard_parameter": "porter.engine.layers.sharded_parameter",
}


def _defined(stmt) -> str | None:
    if isinstance(stmt, (cst.FunctionDef, cst.ClassDef)):
        return stmt.name.value
    if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign):
        t = stmt.body[0].targets[0].target
        return t.value if isinstance(t, cst.Name) else None
    return None


def _attr_reads(module: cst.Module) -> dict[str, set[str]]:
    """class -> attribute names read as `self.attr` in it; key "*" for reads through other objects
    (`self.qkv_proj.num_heads`, `module.scaling`); reads off plain names like `config.x` do not count."""
    out: dict[str, set[str]] = {"*": set()}

    class V(cst.CSTVisitor):
        cls = "*"

        def visit_ClassDef(self, node):
            self.cls = node.name.value
            out.setdefault(self.cls, set())

        def leave_ClassDef(self, node):
            self.cls = "*"

        def visit_AssignTarget(self, node):
            if isinstance(node.target, cst.Attribute):
                node.target.value.visit(self)
                return False
            return True

        def visit_Attribute(self, node):
            if isinstance(node.value, cst.Name):
                if node.value.value == "self":
                    out[self.cls].add(node.attr.value)
            else:
                out["*"].add(node.attr.value)

    module.visit(V())
    return out


def _is_module_ctor(value: cst.BaseExpression) -> bool:
    if not isinstance(value, cst.Call):
        return False
    last = (dotted(value.func) or "").split(".")[-1]
    return bool(last) and (last[0].isupper() or last in ("Parameter", "Buffer"))


class Tidy(Pass):
    name = "tidy"

    def __init__(self, ctx, skipped_keys: list[str]):
        super().__init__(ctx)
        self.skipped_keys = skipped_keys

    def run(self, module: cst.Module) -> cst.Module:
        module = self._unused_definitions(module)
        module = self._unused_attributes(module)
        module = module.visit(DropDeadCode(self.ctx))  # locals that only fed removed attributes
        module = self._unused_definitions(module)
        module = self._imports(module)
        return module

    def _unused_definitions(self, module: cst.Module) -> cst.Module:
        keep = {self.ctx.roles.causal_lm}
        while True:
            used = loads(module)
            body, removed = [], False
            for s in module.body:
                name = _defined(s)
                if name and name not in keep and not used[name] and not name.startswith("__"):
                    self.note(s, f"removed unused module-level `{name}`")
                    removed = True
                    continue
                body.append(s)
            module = module.with_changes(body=body)
            if not removed:
                return module

    def _unused_attributes(self, module: cst.Module) -> cst.Module:
        blocks = self.ctx.roles.blocks
        while True:
            reads = _attr_reads(module)
            removed = False
            new_body = []
            for s in module.body:
                if isinstance(s, cst.ClassDef) and s.name.value in blocks and "__init__" in methods(s):
                    init = methods(s)["__init__"]
                    kept = []
                    for stmt in init.body.body:
                        if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and \
                                isinstance(stmt.body[0], cst.Assign):
                            attr = self_attr(stmt.body[0].targets[0].target)
                            if attr and not (attr == "config" and s.name.value == self.ctx.roles.base) and \
                                    attr not in reads.get(s.name.value, ()) and \
                                    attr not in reads["*"] and \
                                    not _is_module_ctor(stmt.body[0].value):
                                self.ctx.report.change(self.name, self.ctx.lines.of(stmt, s.name.value),
                                                       f"{s.name.value}: removed unused attribute self.{attr}")
                                removed = True
                                continue
                        kept.append(stmt)
                    new_init = init.with_changes(body=init.body.with_changes(body=kept))
                    s = s.with_changes(body=s.body.with_changes(
                        body=[new_init if x is init else x for x in s.body.body]))
                new_body.append(s)
            module = module.with_changes(body=new_body)
            if not removed:
                return module

    def _imports(self, module: cst.Module) -> cst.Module:
        used = loads(module)
        body, last_import = [], -1
        for s in module.body:
            if isinstance(s, cst.SimpleStatementLine) and isinstance(s.body[0], (cst.Import, cst.ImportFrom)):
                imp = s.body[0]
                if isinstance(imp, cst.ImportFrom) and isinstance(imp.names, cst.ImportStar):
                    body.append(s)
                    last_import = len(body) - 1
                    continue
                names = []
                for a in imp.names:
                    local = code(a.asname.name) if a.asname else code(a.name).split(".")[0]
                    if used[local]:
                        names.append(a)
                    else:
                        self.note(s, f"removed unused import {code(a.name)}")
                if not names:
                    continue
                names[-1] = names[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                new_imp = imp.with_changes(names=names)
                if isinstance(imp, cst.ImportFrom):
                    new_imp = new_imp.with_changes(lpar=None, rpar=None) if len(names) < len(imp.names) else new_imp
                    if new_imp.lpar is None:
                        new_imp = new_imp.with_changes(names=[n.with_changes(comma=cst.Comma(
                            whitespace_after=cst.SimpleWhitespace(" "))) for n in names[:-1]] + [names[-1]])
                body.append(s.with_changes(body=[new_imp]))
                last_import = len(body) - 1
                continue
            body.append(s)
        wanted: dict[str, list[str]] = {}
        for name, mod in ENGINE_IMPORTS.items():
            if used[name]:
                wanted.setdefault(mod, []).append(name)
        first_import = next((i for i, s in enumerate(body) if isinstance(s, cst.SimpleStatementLine)
                             and isinstance(s.body[0], (cst.Import, cst.ImportFrom))), 0)
        for i, s in enumerate(body):  # merge into an existing `from mod import ...`
            imp = s.body[0] if isinstance(s, cst.SimpleStatementLine) else None
            if isinstance(imp, cst.ImportFrom) and not isinstance(imp.names, cst.ImportStar) and \
                    dotted(imp.module) in wanted:
                names = sorted({code(a.name) for a in imp.names} | set(wanted.pop(dotted(imp.module))), key=str.lower)
                body[i] = s.with_changes(body=[parse_stmt(
                    f"from {dotted(imp.module)} import {', '.join(names)}\n").body[0]])
        stdlib = [parse_stmt("import re\n")] if (used["re"] or used["_SKIPPED_KEYS"]) and not any(
            code(s).strip() == "import re" for s in body) else []
        stdlib += [parse_stmt(f"from {m} import {', '.join(sorted(n))}\n") for m, n in wanted.items()
                   if not m.startswith("porter")]
        ours = [parse_stmt(f"from {m} import {', '.join(sorted(n, key=str.lower))}\n")
                for m, n in sorted(wanted.items()) if m.startswith("porter")]
        if ours:
            ours[0] = ours[0].with_changes(leading_lines=[cst.EmptyLine()])
        body = body[:first_import] + stdlib + body[first_import:]
        last_import += len(stdlib)
        new = ours
        extra = []
        if used["_SKIPPED_KEYS"]:
            pattern = "|".join(self.skipped_keys)
            extra.append(parse_stmt(f'_SKIPPED_KEYS = re.compile(r"{pattern}")\n').with_changes(leading_lines=[
                cst.EmptyLine(), cst.EmptyLine(indent=False, comment=cst.Comment(
                    "# checkpoint keys that are derived buffers or declared ignorable, not parameters"))]))
        return module.with_changes(body=body[: last_import + 1] + new + extra + body[last_import + 1:])
