"""Attention computed inline (older files) rewritten into the attention-interface call the passes convert.

An attention block whose forward computes `softmax(q @ k^T * scale + bias) @ v` itself, or calls
`F.scaled_dot_product_attention`, gets in place of that region

    attention_interface = ALL_ATTENTION_FUNCTIONS["eager"]
    out, weights = attention_interface(self, q, k, v, None, scaling=..., alibi_slopes=..., num_kv_heads=...)
    out = out.view_as(q)

which the attention pass turns into the engine's `Attention`; its batch-first shape code (and that of
the helper methods it calls) is rewritten for flat tokens on the way (inline_layout.py). ALiBi biases
become slopes computed once (inline_alibi.py). Attention computed in both branches of a config test
(rotary or ALiBi) is one engine Attention whose arguments read the test. A dispatch table of attention
classes (`CLASSES[config._attn_implementation](config)`) constructs the converted class. Whatever is not
understood is refused, naming the block's line and the construct with its own line.
"""
from __future__ import annotations

import re

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import code, contains, dotted, init_assignments, loads, methods, param_names, self_attr
from porter.convert.inline_alibi import alibi_inputs, drop_bias
from porter.convert.inline_layout import Dim, FlatFunction, Refused, Tensor, core_statement, merge
from porter.convert.normalise_constants import normalise_constants
from porter.convert.specialise import FALSE_PARAMS, NONE_PARAMS

_INLINE = re.compile(r"softmax\(|scaled_dot_product_attention\(", re.IGNORECASE)  # a cheap text check first


def _computes_inline(node: cst.CSTNode) -> bool:
    """Calls softmax (function, method or nn.Softmax module) or SDPA, not just mentions them."""
    def hit(n) -> bool:
        if not isinstance(n, cst.Call):
            return False
        f = n.func.func if isinstance(n.func, cst.Call) else n.func
        name = f.attr.value if isinstance(f, cst.Attribute) else f.value if isinstance(f, cst.Name) else ""
        return name.lower() == "softmax" or name == "scaled_dot_product_attention"

    return _INLINE.search(code(node)) is not None and contains(node, hit)


class _Regenerate(cst.CSTTransformer):
    """The n-th interface call written again with the n-th core's final arguments."""

    def __init__(self, cores: list[dict]):
        super().__init__()
        self.cores = iter(cores)

    def leave_SimpleStatementLine(self, original, updated):
        small = updated.body[0]
        if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call) and \
                code(small.value.func) == "attention_interface":
            return core_statement(next(self.cores)).with_changes(leading_lines=updated.leading_lines)
        return updated


# ------------------------------------------------------------------ one attention block
class _Block:
    def __init__(self, module: cst.Module, cls: cst.ClassDef, ctx: Context, alibi: dict[str, str],
                 flags: dict[str, str | None], other_bias: dict[str, str]):
        self.module, self.cls, self.ctx = module, cls, ctx
        self.other_bias = other_bias  # forward input -> why it is not ALiBi
        self.alibi = alibi  # ALiBi forward input -> the engine call computing its slopes
        self.flags = flags  # forward input -> config expression it is present under (None: always)
        self.flag_attrs: dict[str, str] = {}
        ctors = {a: dotted(v.func) or "" for a, v in init_assignments(cls) if isinstance(v, cst.Call)}
        self.linears = {a for a, c in ctors.items() if c.endswith(("Linear", "Conv1D"))}
        self.dropouts = {a for a, c in ctors.items() if c.endswith("Dropout")}
        self.helpers = {n: m for n, m in methods(cls).items() if n not in ("forward", "__init__")}
        self.rewritten: dict[str, tuple[cst.FunctionDef, str]] = {}

    def truth(self, test) -> bool | None:
        """The value of a branch test under the inference facts (None: depends on the config)."""
        if isinstance(test, cst.Name):
            if test.value in ("True", "False"):
                return test.value == "True"
            if test.value in FALSE_PARAMS:
                return False
            return None
        if self_attr(test) == "training":
            return False
        if isinstance(test, cst.UnaryOperation) and isinstance(test.operator, cst.Not):
            v = self.truth(test.expression)
            return None if v is None else not v
        if isinstance(test, cst.Comparison) and len(test.comparisons) == 1 and \
                code(test.comparisons[0].comparator) == "None" and isinstance(test.left, cst.Name) and \
                test.left.value in NONE_PARAMS:
            return isinstance(test.comparisons[0].operator, cst.Is)
        if isinstance(test, cst.BooleanOperation):
            a, b = self.truth(test.left), self.truth(test.right)
            if isinstance(test.operator, cst.And):
                return False if a is False or b is False else (True if a and b else None)
            return True if a is True or b is True else (False if a is False and b is False else None)
        return None

    def test(self, test, fn: FlatFunction):
        """`bias is None` on an ALiBi input becomes a read of the config flag that gates it."""

        block = self

        class Sub(cst.CSTTransformer):
            def leave_Comparison(self, o, u):
                if len(u.comparisons) == 1 and code(u.comparisons[0].comparator) == "None" and \
                        isinstance(u.left, cst.Name) and u.left.value in block.alibi and u.left.value not in fn.env:
                    is_none = isinstance(u.comparisons[0].operator, cst.Is)
                    flag = block.flags.get(u.left.value)
                    if flag is None:
                        return cst.Name(repr(not is_none))
                    attr = block.flag_attrs.get(u.left.value)
                    if attr is None:
                        taken = {a for a, _ in init_assignments(block.cls)}
                        attr = f"use_{u.left.value}"
                        while attr in taken:
                            attr += "_"
                        block.flag_attrs[u.left.value] = attr
                    return cst.parse_expression(f"not self.{attr}" if is_none else f"self.{attr}")
                return u

        return test.visit(Sub())

    def helper_call(self, fn: FlatFunction, node: cst.Call, name: str):
        args = []
        values = []
        for a in node.args:
            n, v = fn.ev(a.value)
            args.append(a.with_changes(value=n))
            values.append(v)
        helper = self.helpers[name]
        params = param_names(helper)[1:]
        if len(values) != len(params) or any(a.keyword is not None or a.star for a in node.args):
            fn.refuse(node, f"`{code(node)[:60]}`", "a helper call with keyword or missing arguments")
        bound = {p: v for p, v in zip(params, values) if v is not None}
        if not any(isinstance(v, Tensor) for v in bound.values()):
            fn.refuse(node, f"`{code(node)[:60]}`", "a helper call without tensor arguments")
        inner = FlatFunction(self, helper, bound)
        body = inner.stmts(helper.body.body)
        if inner.cores:
            fn.refuse(node, f"`{code(node)[:60]}`", "attention computed inside a helper method")
        result = None
        for r in inner.returns:
            result = r if result is None else merge(result, r)
            if result is None and r is not None:
                fn.refuse(node, f"`{name}`", "returns tensors of different layouts on its paths")
        new = helper.with_changes(body=helper.body.with_changes(body=body))
        key = repr(bound)
        if name in self.rewritten and self.rewritten[name][1] != key:
            fn.refuse(node, f"`{name}`", "a helper called with differently shaped tensors")
        self.rewritten[name] = (new, key)
        return node.with_changes(args=args), result

    def rewrite(self) -> cst.ClassDef | None:
        ms = methods(self.cls)
        fwd = ms.get("forward")
        if fwd is None or not _computes_inline(fwd):
            return None
        params = param_names(fwd)
        if len(params) < 2:
            return None
        fn = FlatFunction(self, fwd, {params[1]: Tensor((Dim("B"), Dim("S"), Dim("O", None)))})
        body = fn.stmts(fwd.body.body)
        if not fn.cores:
            return None
        _same_kwargs(fn)
        body = [s.visit(_Regenerate(fn.cores)) for s in body]
        new_fwd = fwd.with_changes(body=fwd.body.with_changes(body=[
            cst.parse_statement('attention_interface = ALL_ATTENTION_FUNCTIONS["eager"]\n'), *body]))
        init = ms["__init__"]
        init_params = param_names(init)
        cfg = init_params[1] if len(init_params) > 1 else "config"
        extra = [cst.parse_statement(f"self.{attr} = {self.flags[p].replace('{config}', cfg)}\n")
                 for p, attr in self.flag_attrs.items()]
        assigned = {a for a, _ in init_assignments(self.cls)}
        head_size = fn.cores[0]["kwargs"]["head_size"]
        if not assigned & {"head_dim", "head_size"} and "self." in head_size:
            # the head size read off q, under the attribute name the parallel pass looks for
            extra.append(cst.parse_statement(f"self.head_dim = {head_size}\n"))
        new_init = init.with_changes(body=init.body.with_changes(body=[*init.body.body, *extra]))
        out = []
        for s in self.cls.body.body:
            if s is fwd:
                out.append(new_fwd)
            elif s is init:
                out.append(new_init)
            elif isinstance(s, cst.FunctionDef) and s.name.value in self.rewritten:
                out.append(self.rewritten[s.name.value][0])
            else:
                out.append(s)
        for c in fn.cores:
            self.ctx.report.change("inline_attention", self.ctx.lines.of(self.cls),
                                   f"{self.cls.name.value}: inline attention -> attention-interface call "
                                   f"({c['q']}, {c['k']}, {c['v']}{''.join(f', {k}={v}' for k, v in c['kwargs'].items())})")
        return self.cls.with_changes(body=self.cls.body.with_changes(body=out))


def _same_kwargs(fn: FlatFunction) -> None:
    """Attention computed in both branches of a config test (rotary or ALiBi) is one engine Attention:
    its constructor arguments become `A if test else B` where the branches differ."""
    cores = fn.cores
    if len(cores) < 2:
        return
    if len(cores) > 2:
        if any(c["kwargs"] != cores[0]["kwargs"] for c in cores):
            raise Refused(None, "attention computed in more than two places", "with different arguments")
        return
    a, b = cores
    i = next((i for i, (x, y) in enumerate(zip(a["conds"], b["conds"])) if x != y), None)
    if i is None or a["conds"][i][0] != b["conds"][i][0]:
        raise Refused(None, "attention computed twice", "not in the two branches of one config test")
    test = a["conds"][i][0]
    yes, no = (a, b) if a["conds"][i][1] else (b, a)
    for key in set(a["kwargs"]) | set(b["kwargs"]):
        x, y = yes["kwargs"].get(key), no["kwargs"].get(key)
        if x != y:
            yes["kwargs"][key] = no["kwargs"][key] = f"{x or 'None'} if {test} else {y or 'None'}"


# ------------------------------------------------------------------ the pass
def normalise_inline_attention(module: cst.Module, ctx: Context) -> cst.Module:
    text = module.code
    if "ALL_ATTENTION_FUNCTIONS" in text or not _INLINE.search(text):
        return module
    # facts the rewrite relies on (the engine's own attention runs: `_attn_implementation` tests fold)
    module = normalise_constants(module, ctx)
    new_body = list(module.body)
    changed = False
    biases: set[str] = set()
    for i, stmt in enumerate(module.body):
        if not isinstance(stmt, cst.ClassDef) or "forward" not in methods(stmt) or "__init__" not in methods(stmt):
            continue
        if not _computes_inline(methods(stmt)["forward"]):
            helper = next((m for n, m in methods(stmt).items() if n != "forward" and _computes_inline(m)
                           and f"self.{n}(" in code(methods(stmt)["forward"])), None)
            if helper is not None:
                ctx.report.refuse(f"inline attention in `{stmt.name.value}`", ctx.lines.of(stmt),
                                  f"computed in its helper method `{helper.name.value}` (line "
                                  f"{ctx.lines.of(helper)}), which the forward calls; only attention computed in "
                                  "the forward itself is rewritten")
            continue
        try:
            alibi, flags, other_bias = alibi_inputs(module, stmt)
            new = _Block(module, stmt, ctx, alibi, flags, other_bias).rewrite()
        except Refused as r:
            where = ctx.lines.of(r.node, stmt.name.value) if r.node is not None else None
            at = f" (line {where})" if where is not None else ""
            ctx.report.refuse(f"inline attention in `{stmt.name.value}`", ctx.lines.of(stmt),
                              f"{r.construct}{at}: {r.why}, so it cannot become an attention interface call")
            continue
        if new is not None:
            new_body[i] = new
            changed = True
            unread = [p for p in alibi if not loads(methods(new)["forward"].body)[p]]
            biases |= set(unread)
    if not changed:
        return module
    converted = {s.name.value for s, old in zip(new_body, module.body) if s is not old}
    module = module.with_changes(body=new_body)
    for name in sorted(biases):
        module = drop_bias(module, name, converted, ctx)
    return _pick_dispatch(module, converted, ctx)


def _pick_dispatch(module: cst.Module, converted: set[str], ctx: Context) -> cst.Module:
    """`CLASSES = {"eager": FooAttention, "flash_attention_2": FooFlash}` then `CLASSES[impl](config)`:
    the engine runs its own attention, so the call constructs the converted class directly."""
    tables: dict[str, str] = {}
    for stmt in module.body:
        if isinstance(stmt, cst.SimpleStatementLine) and isinstance(stmt.body[0], cst.Assign) and \
                isinstance(stmt.body[0].value, cst.Dict) and isinstance(stmt.body[0].targets[0].target, cst.Name):
            values = {code(e.value) for e in stmt.body[0].value.elements if isinstance(e, cst.DictElement)}
            hit = values & converted
            if len(hit) == 1:
                tables[stmt.body[0].targets[0].target.value] = hit.pop()
    if not tables:
        return module

    class Pick(cst.CSTTransformer):
        def leave_Call(self, original, updated):
            f = updated.func
            if isinstance(f, cst.Subscript) and isinstance(f.value, cst.Name) and f.value.value in tables:
                ctx.report.change("inline_attention", ctx.lines.of(original),
                                  f"`{code(f)}(...)` -> `{tables[f.value.value]}(...)` (the engine's attention runs)")
                return updated.with_changes(func=cst.Name(tables[f.value.value]))
            return updated

    return module.visit(Pick())
