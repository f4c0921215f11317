"""Normalise mixture-of-experts blocks: a stacked-experts module becomes the engine's `FusedMoE`.

Recognised by structure, not by name: an *experts class* holds two 3-D `nn.Parameter`s, gate/up
`[E, 2*I, H]` and down `[E, H, I]`, and its forward loops over the experts computing
`gate, up = linear(x, gate_up[e]).chunk(2, dim=-1)`, `act(gate) * up`, `linear(., down[e])`, weighted
by the router's top-k weights and summed with `index_add_`. That is exactly what FusedMoE computes
from precomputed `topk_weights`/`topk_ids`, so the router (HF code, already right for flat tokens)
stays, and

    self.experts = FooExperts(config)              ->  self.experts = FusedMoE(num_experts=..., top_k=...,
                                                            hidden_size=..., intermediate_size=...,
                                                            activation=config.hidden_act)
    self.experts(hidden, top_k_index, top_k_weights) ->  self.experts(hidden, topk_weights=top_k_weights,
                                                                      topk_ids=top_k_index)

The sizes come from the experts class's own parameter shapes, with its `self.x` attributes and
constructor parameters substituted by the caller's expressions. Anything else that looks like experts
(per-expert biases, a transposed `[E, H, 2*I]` layout, experts as a ModuleList) is refused by name
and line. The checkpoint side (per-expert keys on disk) is in `expert_weights.py`. The router stays HF
code (greedy, grouped, sigmoid-with-bias routing, scaling: whatever the file computes); its persistent
buffers become frozen parameters, since the generated load_weights loads parameters.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as matchers

from porter.convert.context import Context
from porter.convert.cst_util import (
    classes,
    code,
    contains,
    dotted,
    init_assignments,
    methods,
    param_names,
    self_attr,
    self_call_attr,
)

_PARAM_CTORS = ("torch.empty", "torch.zeros", "torch.ones", "torch.randn", "torch.rand")


def _param_shape(value: cst.BaseExpression) -> list[cst.BaseExpression] | None:
    """`nn.Parameter(torch.empty(a, b, c))` -> [a, b, c]."""
    if not (isinstance(value, cst.Call) and (dotted(value.func) or "").endswith("Parameter") and value.args):
        return None
    inner = value.args[0].value
    if not (isinstance(inner, cst.Call) and dotted(inner.func) in _PARAM_CTORS):
        return None
    dims = [a.value for a in inner.args if a.keyword is None]
    return dims


class _Substitute(cst.CSTTransformer):
    """`self.attr` -> its __init__ value, constructor parameters -> the caller's arguments."""

    def __init__(self, attrs: dict[str, cst.BaseExpression], params: dict[str, cst.BaseExpression]):
        super().__init__()
        self.attrs, self.params = attrs, params

    def leave_Attribute(self, original, updated):
        a = self_attr(original)
        if a is not None and a in self.attrs:
            return self.attrs[a]
        return updated.with_changes(attr=original.attr)

    def leave_Name(self, original, updated):
        return self.params.get(original.value, updated)


def _resolve(expr: cst.BaseExpression, attrs, params) -> cst.BaseExpression:
    # attribute values may themselves read earlier attributes (self.intermediate_dim = self.x): iterate
    for _ in range(4):
        expr = expr.visit(_Substitute(attrs, {}))
    return expr.visit(_Substitute({}, params))


def _calls(node: cst.CSTNode, pred) -> list[cst.Call]:
    return [c for c in matchers.findall(node, matchers.Call()) if pred(c)]


class Experts:
    """What the converter needs to know about one experts class."""

    def __init__(self, cls: cst.ClassDef):
        self.cls = cls
        self.name = cls.name.value
        self.init = methods(cls)["__init__"]
        self.forward = methods(cls)["forward"]
        self.attrs = dict(init_assignments(cls))
        self.params3d = {a: s for a, v in self.attrs.items() if (s := _param_shape(v)) is not None and len(s) == 3}
        self.other_params = [a for a, v in self.attrs.items() if _param_shape(v) is not None and a not in self.params3d]


def find_experts(module: cst.Module) -> dict[str, cst.ClassDef]:
    """Classes holding stacked 3-D expert weights and looping over experts in forward."""
    out = {}
    for name, cls in classes(module).items():
        ms = methods(cls)
        if "__init__" not in ms or "forward" not in ms:
            continue
        shapes = [s for _, v in init_assignments(cls) if (s := _param_shape(v)) is not None and len(s) == 3]
        if len(shapes) >= 2 and contains(ms["forward"], lambda n: isinstance(n, cst.For)):
            out[name] = cls
    return out


def _analyse_experts(ex: Experts, refuse) -> dict | None:
    """Match the gated-MLP-per-expert pattern; returns the roles of its parameters and inputs."""
    fwd = ex.forward
    if ex.other_params:
        refuse(ex.cls, f"expert parameters {', '.join(ex.other_params)} of `{ex.name}`",
               "FusedMoE has no per-expert biases or extra expert tensors")
        return None
    linear_of: dict[str, cst.Call] = {}
    for call in _calls(fwd, lambda n: (dotted(n.func) or "").endswith("functional.linear") or dotted(n.func) == "F.linear"):
        w = call.args[1].value if len(call.args) >= 2 else None
        if isinstance(w, cst.Subscript) and self_attr(w.value) in ex.params3d:
            linear_of[self_attr(w.value)] = call
    # gate_up: the linear whose output is chunked in two along the last dim, here or in a helper method
    # it is handed to (`self._apply_gate(linear(x, gate_up[e]))`)
    gate_up = down = None
    chunk, gate_fn = None, fwd
    for p, lin in linear_of.items():
        for fn, base in [(fwd, lin), *_helper_input(ex, fwd, lin)]:
            for call in _calls(fn, lambda n: isinstance(n.func, cst.Attribute) and n.func.attr.value == "chunk"):
                if (call.func.value is base or code(call.func.value) == base) and len(call.args) == 2 and \
                        code(call.args[0].value) == "2" and code(call.args[-1].value) in ("-1", "2"):
                    gate_up, chunk, gate_fn = p, call, fn
    rest = [p for p in linear_of if p != gate_up]
    if gate_up is None or len(rest) != 1 or set(ex.params3d) != {gate_up, rest[0]}:
        refuse(ex.cls, f"experts `{ex.name}`",
               "expected `gate, up = linear(x, gate_up[e]).chunk(2, dim=-1)` and `linear(h, down[e])` over two "
               "stacked [E, 2*I, H] / [E, H, I] parameters")
        return None
    down = rest[0]
    e1, two_i, h1 = ex.params3d[gate_up]
    e2, h2, i2 = ex.params3d[down]
    if not (isinstance(two_i, cst.BinaryOperation) and isinstance(two_i.operator, cst.Multiply)
            and code(two_i.left) == "2" and code(two_i.right) == code(i2) and code(e1) == code(e2)
            and code(h1) == code(h2)):
        refuse(ex.cls, f"expert weight layout of `{ex.name}`",
               f"{gate_up} is ({', '.join(code(d) for d in ex.params3d[gate_up])}) and {down} is "
               f"({', '.join(code(d) for d in ex.params3d[down])}); FusedMoE needs [E, 2*I, H] and [E, H, I]")
        return None
    # gate, up = ...chunk(...); act(gate) * up
    activation = _gated_activation(gate_fn, chunk, ex)
    if activation is None:
        refuse(ex.cls, f"experts `{ex.name}`", "the expert MLP is not `act(gate) * up` with act = ACT2FN[...]")
        return None
    inputs = param_names(fwd)[1:]
    if len(inputs) != 3:
        refuse(fwd, f"`{ex.name}.forward`", "expected forward(hidden_states, top_k_index, top_k_weights)")
        return None
    ids = [p for p in inputs[1:] if _calls(fwd, lambda n, p=p: (dotted(n.func) or "").endswith("one_hot")
                                           and n.args and code(n.args[0].value) == p)]
    weights = [p for p in inputs[1:] if p not in ids and contains(fwd, lambda n, p=p: isinstance(
        n, cst.BinaryOperation) and isinstance(n.operator, cst.Multiply) and isinstance(n.right, cst.Subscript)
        and code(n.right.value) == p)]
    if len(ids) != 1 or len(weights) != 1 or not contains(fwd, lambda n: isinstance(n, cst.Attribute)
                                                          and n.attr.value == "index_add_"):
        refuse(fwd, f"`{ex.name}.forward`", "could not tell the top-k ids (one_hot) from the top-k weights "
                                             "(multiplied into the expert outputs, summed by index_add_)")
        return None
    return {"gate_up": gate_up, "down": down, "num_experts": e1, "hidden": h1, "intermediate": i2,
            "activation": activation, "order": inputs, "ids": ids[0], "weights": weights[0]}


def _helper_input(ex: Experts, fwd: cst.FunctionDef, value: cst.Call) -> list[tuple[cst.FunctionDef, str]]:
    """(helper method, its parameter name) for a `self.helper(value)` call in forward."""
    out = []
    ms = methods(ex.cls)
    for call in _calls(fwd, lambda n: self_call_attr(n) in ms and len(n.args) == 1 and n.args[0].value is value):
        params = param_names(ms[self_call_attr(call)])[1:]
        if len(params) == 1:
            out.append((ms[self_call_attr(call)], params[0]))
    return out


def _strip_casts(node: cst.BaseExpression) -> str:
    """`x.float()` / `x.to(dtype)` -> "x": dtype casts around the gate do not change the math's shape."""
    while isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and node.func.attr.value in ("float", "to"):
        node = node.func.value
    return code(node)


_ACT_FUNCTIONS = {"silu": "silu", "gelu": "gelu"}


def _gated_activation(fwd, chunk: cst.Call, ex: Experts) -> cst.BaseExpression | None:
    gate = up = None

    class Chunked(cst.CSTVisitor):
        def visit_Assign(self, n: cst.Assign):
            nonlocal gate, up
            t = n.targets[0].target
            if n.value is chunk and isinstance(t, cst.Tuple) and len(t.elements) == 2:
                gate, up = (code(e.value) for e in t.elements)

    fwd.visit(Chunked())
    if gate is None:
        return None
    found: list[str] = []

    class Product(cst.CSTVisitor):
        def visit_BinaryOperation(self, n: cst.BinaryOperation):
            if isinstance(n.operator, cst.Multiply) and _strip_casts(n.right) == up and isinstance(n.left, cst.Call) \
                    and len(n.left.args) == 1 and _strip_casts(n.left.args[0].value) == gate and self_call_attr(n.left):
                found.append(self_call_attr(n.left))

    fwd.visit(Product())
    act = ex.attrs.get(found[0]) if found else None
    if isinstance(act, cst.Subscript) and (dotted(act.value) or "").endswith("ACT2FN") and len(act.slice) == 1:
        return act.slice[0].slice.value
    name = (dotted(act) or "").rsplit(".", 1)[-1] if act is not None else ""
    if (dotted(act) or "").startswith(("F.", "nn.functional.", "torch.nn.functional.")) and name in _ACT_FUNCTIONS:
        return cst.SimpleString(f'"{_ACT_FUNCTIONS[name]}"')
    return None


class _RewriteUsers(cst.CSTTransformer):
    """In classes that build an experts class: construct FusedMoE instead and call it with keywords."""

    def __init__(self, ctx: Context, experts: dict[str, Experts], info: dict[str, dict], top_k_of):
        super().__init__()
        self.ctx, self.experts, self.info, self.top_k_of = ctx, experts, info, top_k_of
        self.cls: list[str] = []
        self.attr_kind: dict[str, str] = {}  # attribute -> experts class, in the current class

    def note(self, node, msg):
        self.ctx.report.change("moe", self.ctx.lines.of(node), msg)

    def refuse(self, node, construct, why):
        self.ctx.report.refuse(construct, self.ctx.lines.of(node), why)

    def visit_ClassDef(self, node: cst.ClassDef):
        self.cls.append(node.name.value)
        self.attr_kind = {a: dotted(v.func) for a, v in init_assignments(node)
                          if isinstance(v, cst.Call) and dotted(v.func) in self.info}

    def leave_ClassDef(self, original, updated):
        self.cls.pop()
        return updated

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        attr = self_attr(updated.targets[0].target)
        kind = self.attr_kind.get(attr)
        if kind is None or not isinstance(updated.value, cst.Call):
            return updated
        if attr != "experts":
            self.refuse(original, f"experts attribute `{attr}`",
                        "the per-expert checkpoint keys are matched under `.experts.`; other names are not supported")
            return updated
        ex, info = self.experts[kind], self.info[kind]
        call = updated.value
        init_params = param_names(ex.init)[1:]
        bound: dict[str, cst.BaseExpression] = {}
        positional = [a for a in call.args if a.keyword is None]
        for p, a in zip(init_params, positional):
            bound[p] = a.value
        for a in call.args:
            if a.keyword is not None:
                bound[a.keyword.value] = a.value
        missing = [p for p in init_params if p not in bound and not _has_default(ex.init, p)]
        top_k = self.top_k_of(self.cls[-1])
        if missing or top_k is None:
            self.refuse(original, f"`{code(original).strip()}`",
                        "could not bind the experts constructor" if missing else
                        "no `self.top_k = ...` in the MoE block or its router")
            return updated
        attrs = ex.attrs
        args = {k: code(_resolve(info[k], attrs, bound)) for k in ("num_experts", "hidden", "intermediate",
                                                                   "activation")}
        # one line, so the line numbers of everything after it stay those of the source
        src = (f"FusedMoE(num_experts={args['num_experts']}, top_k={top_k}, hidden_size={args['hidden']}, "
               f"intermediate_size={args['intermediate']}, activation={args['activation']})")
        self.note(original, f"self.{attr} = {kind}(...) -> FusedMoE(num_experts={args['num_experts']}, "
                            f"intermediate_size={args['intermediate']}, activation={args['activation']})")
        return updated.with_changes(value=cst.parse_expression(src))

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        attr = self_call_attr(updated)
        kind = self.attr_kind.get(attr) if attr else None
        if kind is None:
            return updated
        info = self.info[kind]
        if any(a.keyword is not None or a.star for a in updated.args) or len(updated.args) != 3:
            self.refuse(original, f"`{code(original)}`", "expected self.experts(hidden, top_k_index, top_k_weights)")
            return updated
        by_name = dict(zip(info["order"], (a.value for a in updated.args)))
        new = cst.parse_expression(
            f"self.{attr}({code(by_name[info['order'][0]])}, topk_weights={code(by_name[info['weights']])}, "
            f"topk_ids={code(by_name[info['ids']])})")
        self.note(original, f"`{code(original)}` -> `{code(new)}`")
        return new


def _has_default(fn: cst.FunctionDef, name: str) -> bool:
    return any(p.name.value == name and p.default is not None for p in (*fn.params.params, *fn.params.kwonly_params))


def _top_k_finder(module: cst.Module, info: dict[str, dict]):
    """The `self.top_k = <expr>` of a MoE block, or of a child it constructs (its router), resolved
    against the config parameter the block passes down."""
    cls_map = classes(module)

    def find(block: str) -> str | None:
        cls = cls_map[block]
        attrs = dict(init_assignments(cls))
        if "top_k" in attrs:
            return code(attrs["top_k"])
        for _, v in attrs.items():
            if isinstance(v, cst.Call) and dotted(v.func) in cls_map and dotted(v.func) not in info:
                child = cls_map[dotted(v.func)]
                cattrs = dict(init_assignments(child))
                if "top_k" in cattrs and "__init__" in methods(child):
                    params = param_names(methods(child)["__init__"])[1:]
                    bound = {p: a.value for p, a in zip(params, v.args) if a.keyword is None}
                    return code(_resolve(cattrs["top_k"], cattrs, bound))
        return None

    return find


class _BufferToParameter(cst.CSTTransformer):
    """`self.x = nn.Buffer(t)` (persistent: saved in checkpoints) -> `nn.Parameter(t, requires_grad=False)`."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def leave_Assign(self, original, updated):
        v = updated.value
        if self_attr(updated.targets[0].target) and isinstance(v, cst.Call) and \
                (dotted(v.func) or "").endswith(("nn.Buffer", "torch.nn.Buffer")) and len(v.args) == 1:
            self.names.append(self_attr(updated.targets[0].target))
            return updated.with_changes(value=cst.parse_expression(
                f"nn.Parameter({code(v.args[0].value)}, requires_grad=False)"))
        return updated


def _router_buffers_as_parameters(module: cst.Module, ctx: Context) -> cst.Module:
    """A router's persistent buffers (e.g. a routing-score correction bias) are checkpoint tensors, and the
    generated load_weights loads parameters: they become frozen parameters in the classes a FusedMoE block
    constructs (its router)."""
    cls_map = classes(module)
    routers = {dotted(v.func) for c in cls_map.values() if any(
        isinstance(v, cst.Call) and dotted(v.func) == "FusedMoE" for _, v in init_assignments(c))
        for _, v in init_assignments(c) if isinstance(v, cst.Call) and dotted(v.func) in cls_map}
    body = []
    for s in module.body:
        if isinstance(s, cst.ClassDef) and s.name.value in routers:
            v = _BufferToParameter()
            new = s.visit(v)
            if v.names:
                ctx.report.change("moe", ctx.lines.of(s), f"{s.name.value}: persistent buffer(s) "
                                  f"{', '.join(v.names)} -> frozen nn.Parameter (loaded from the checkpoint)")
                s = new
        body.append(s)
    return module.with_changes(body=body)


def normalise_moe(module: cst.Module, ctx: Context) -> cst.Module:
    """Rewrite every recognised experts class to FusedMoE; sets ctx.moe_normalised when it did."""
    found = find_experts(module)
    if not found:
        return module
    experts = {n: Experts(c) for n, c in found.items()}
    info = {}
    for name, ex in experts.items():
        got = _analyse_experts(ex, lambda node, c, w: ctx.report.refuse(c, ctx.lines.of(node), w))
        if got is not None:
            info[name] = got
            ctx.report.change("moe", ctx.lines.of(ex.cls), f"{name}: stacked experts ({got['gate_up']} "
                                                          f"[E, 2*I, H], {got['down']} [E, H, I]) -> FusedMoE")
    ctx.report.raise_if_refused()
    module = module.visit(_RewriteUsers(ctx, experts, info, _top_k_finder(module, info)))
    ctx.report.raise_if_refused()
    module = _router_buffers_as_parameters(module, ctx)
    ctx.moe_experts = {info[n]["gate_up"]: info[n]["down"] for n in info}
    return module
