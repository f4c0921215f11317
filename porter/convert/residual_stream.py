"""Pass: thread the residual stream through the decoder layers (vLLM's `layer(h, residual) -> (h, residual)`).

A pre-norm HF decoder layer begins `residual = h; h = self.input_norm(h)` and ends
`h = residual + h; return h`, so between two layers the add and the next layer's norm run as two
kernels. With the engine's RMSNorm that takes a residual, the add moves into the next layer's norm:

    def forward(self, h, ..., residual=None):
        if residual is None:                       # first layer
            residual = h
            h = self.input_norm(h)
        else:                                      # the previous layer's add, fused into this norm
            h, residual = self.input_norm(h, residual)
        ...
        return h, residual                         # the add is left to the next norm

and the base model's loop and final norm become

    residual = None
    for layer in self.layers:
        h, residual = layer(h, ..., residual=residual)
    h, _ = self.norm(h, residual)

Equivalence: the fused norm computes `x + residual` rounded to the dtype and normalises that, exactly
what the layer's own add followed by the next norm computed. The pass keys on those statement shapes
only: a layer or loop written any other way (parallel attention and MLP, extra statements in the loop,
no final norm, a layer class used anywhere else) is left as it was, which is correct, one launch
slower per layer.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.convert.context import Pass
from porter.convert.cst_util import RenameName, append_arg, dotted, init_assignments, methods, param_names, self_attr
from porter.convert.engine_residual import _engine_norm_names, _name, _single, engine_norm_attrs, norm_assignment

RESIDUAL = "residual"


def _body(fn: cst.FunctionDef) -> list[cst.BaseStatement]:
    """The statements of fn, without a docstring."""
    body = list(fn.body.body)
    if body and isinstance(body[0], cst.SimpleStatementLine) and isinstance(body[0].body[0], cst.Expr) and \
            isinstance(body[0].body[0].value, (cst.SimpleString, cst.ConcatenatedString)):
        body = body[1:]
    return body


def _norm_call(stmt, h: str, norms: set[str]) -> str | None:
    """The norm attribute of `h = self.<norm>(h)`."""
    found = norm_assignment(stmt, norms)
    return found[1] if found and found[0] == h and _name(found[2]) == h else None


def _layer_shape(cls: cst.ClassDef, norm_classes: set[str]):
    """(h, residual name, input norm attr) when cls.forward is a pre-norm layer of the documented shape."""
    fn = methods(cls).get("forward")
    if fn is None or RESIDUAL in param_names(fn) or not fn.params.params or len(fn.params.params) < 2:
        return None
    h = fn.params.params[1].name.value
    body = _body(fn)
    if len(body) < 4:
        return None
    first, ret = _single(body[0]), body[-1]
    if not first or _name(first[1]) != h:
        return None
    residual = first[0]
    norm = _norm_call(body[1], h, engine_norm_attrs(cls, norm_classes))
    add = _single(body[-2])
    if norm is None or not add or add[0] != h or not isinstance(add[1], cst.BinaryOperation) or \
            not isinstance(add[1].operator, cst.Add) or {_name(add[1].left), _name(add[1].right)} != {h, residual}:
        return None
    if not (isinstance(ret, cst.SimpleStatementLine) and isinstance(ret.body[0], cst.Return)
            and _name(ret.body[0].value) == h):
        return None
    # `residual` must mean the stream throughout: no other binding of that name in the layer
    if residual != RESIDUAL and m.findall(fn, m.Name(RESIDUAL)):
        return None
    return h, residual, norm


def _layer_class_of(cls: cst.ClassDef, layers_attr: str) -> str | None:
    """The class built in `self.<layers_attr> = nn.ModuleList([C(...) for ...])`."""
    for attr, value in init_assignments(cls):
        if attr != layers_attr or not isinstance(value, cst.Call) or not value.args:
            continue
        inner = value.args[0].value
        if isinstance(inner, cst.ListComp) and isinstance(inner.elt, cst.Call):
            return dotted(inner.elt.func)
    return None


def _loop_shape(fn: cst.FunctionDef):
    """(index of the loop in the body, h, layers attr, norm attr) for `for ... in ...self.<layers>...:
    h = <loop var>(h, ...)` directly followed by `h = self.<norm>(h)`, in the top level of fn."""
    body = list(fn.body.body)
    for i, stmt in enumerate(body[:-1]):
        if not isinstance(stmt, cst.For) or stmt.orelse is not None or len(stmt.body.body) != 1:
            continue
        attrs = {self_attr(a) for a in m.findall(stmt.iter, m.Attribute())} - {None}
        one = _single(stmt.body.body[0])
        loop_vars = {n.value for n in m.findall(stmt.target, m.Name())}
        if len(attrs) == 0 or not one or not isinstance(one[1], cst.Call) or _name(one[1].func) not in loop_vars:
            continue
        h, call = one
        args = call.args
        if not args or args[0].keyword is not None or args[0].star or _name(args[0].value) != h:
            continue
        after = _single(body[i + 1])
        if not after or after[0] != h or not isinstance(after[1], cst.Call):
            continue
        norm = self_attr(after[1].func)
        if norm is None or len(after[1].args) != 1 or _name(after[1].args[0].value) != h:
            continue
        layers = [a for a in attrs if a != "config"]
        if len(layers) == 1:
            return i, h, layers[0], norm
    return None


def _thread_layer(fn: cst.FunctionDef, h: str, residual: str, norm: str, annotate: bool) -> cst.FunctionDef:
    body = _body(fn)
    start = len(fn.body.body) - len(body)
    head = cst.parse_statement(
        f"if {RESIDUAL} is None:\n"
        f"    {RESIDUAL} = {h}\n"
        f"    {h} = self.{norm}({h})\n"
        f"else:\n"
        f"    {h}, {RESIDUAL} = self.{norm}({h}, {RESIDUAL})\n")
    head = head.with_changes(leading_lines=body[0].leading_lines)
    ret = cst.parse_statement(f"return {h}, {RESIDUAL}\n").with_changes(leading_lines=body[-1].leading_lines)
    middle = body[2:-2]
    if residual != RESIDUAL:
        middle = [s.visit(RenameName(residual, RESIDUAL)) for s in middle]
    new_body = [*fn.body.body[:start], head, *middle, ret]
    annotation = cst.Annotation(cst.parse_expression("torch.Tensor | None")) if annotate else None
    param = cst.Param(cst.Name(RESIDUAL), annotation=annotation, default=cst.Name("None"),
                      equal=cst.AssignEqual(cst.SimpleWhitespace(" "), cst.SimpleWhitespace(" ")) if annotate
                      else cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
    params = fn.params
    if isinstance(params.star_arg, cst.Param) or params.kwonly_params:
        params = params.with_changes(kwonly_params=[*params.kwonly_params, param])
    else:  # appended like append_arg: the new last parameter takes over the closing layout
        ps = list(params.params)
        if isinstance(ps[-1].comma, cst.Comma):
            param = param.with_changes(comma=ps[-1].comma)
        sep = ps[-2].comma if isinstance(ps[-2].comma, cst.Comma) else cst.Comma(
            whitespace_after=cst.SimpleWhitespace(" "))
        ps[-1] = ps[-1].with_changes(comma=sep)
        params = params.with_changes(params=[*ps, param])
    returns = fn.returns
    if returns is not None:
        returns = returns.with_changes(annotation=cst.parse_expression("tuple[torch.Tensor, torch.Tensor]")) \
            if annotate else None
    return fn.with_changes(params=params, returns=returns, body=fn.body.with_changes(body=new_body))


def _thread_loop(fn: cst.FunctionDef, index: int, h: str, norm: str) -> cst.FunctionDef:
    body = list(fn.body.body)
    loop = body[index]
    line = loop.body.body[0]
    call = line.body[0].value
    new_line = line.with_changes(body=[cst.Assign(
        targets=[cst.AssignTarget(cst.parse_expression(f"{h}, {RESIDUAL}"))],
        value=append_arg(call, cst.Arg(cst.Name(RESIDUAL), keyword=cst.Name(RESIDUAL),
                                       equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))))])
    loop = loop.with_changes(body=loop.body.with_changes(body=[new_line]))
    start = cst.parse_statement(f"{RESIDUAL} = None\n").with_changes(leading_lines=body[index].leading_lines)
    final = cst.parse_statement(f"{h}, _ = self.{norm}({h}, {RESIDUAL})\n").with_changes(
        leading_lines=body[index + 1].leading_lines)
    body[index:index + 2] = [start, loop.with_changes(leading_lines=[]), final]
    return fn.with_changes(body=fn.body.with_changes(body=body))


class ResidualStream(Pass):
    name = "residual_stream"

    def run(self, module: cst.Module) -> cst.Module:
        norm_classes = _engine_norm_names(module)
        by_name = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
        if not norm_classes:
            return module
        for base in by_name.values():
            fn = methods(base).get("forward")
            loop = _loop_shape(fn) if fn is not None else None
            if loop is None or m.findall(fn, m.Name(RESIDUAL)):
                continue
            index, h, layers_attr, final_norm = loop
            layer_name = _layer_class_of(base, layers_attr)
            layer = by_name.get(layer_name)
            if layer is None or final_norm not in engine_norm_attrs(base, norm_classes) or \
                    len(m.findall(module, m.Call(func=m.Name(layer_name)))) != 1:
                continue  # the layer class is built (and so maybe called) elsewhere too
            shape = _layer_shape(layer, norm_classes)
            if shape is None:
                continue
            lh, residual, norm = shape
            annotate = any(isinstance(s, cst.SimpleStatementLine) and isinstance(s.body[0], cst.Import)
                           and any(dotted(a.name) == "torch" and a.asname is None for a in s.body[0].names)
                           for s in module.body)
            layer_fn = methods(layer)["forward"]
            module = module.visit(_Replace({
                layer_fn: _thread_layer(layer_fn, lh, residual, norm, annotate),
                fn: _thread_loop(fn, index, h, final_norm)}))
            self.note(fn, f"{layer_name}: the residual add moves into the next layer's `{norm}` "
                          f"(layers return (h, residual); {base.name.value} ends with `self.{final_norm}(h, residual)`)")
            by_name = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
        return module


class _Replace(cst.CSTTransformer):
    """Swaps nodes (by identity) for their replacements."""

    def __init__(self, replacements: dict):
        super().__init__()
        self.replacements = {id(old): new for old, new in replacements.items()}

    def on_visit(self, node):
        return id(node) not in self.replacements and super().on_visit(node)

    def on_leave(self, original, updated):
        return self.replacements.get(id(original), updated)


def residual_stream(module: cst.Module, ctx) -> cst.Module:
    return ResidualStream(ctx).run(module)
