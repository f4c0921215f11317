"""Pass: HF RMSNorm classes -> the engine's `RMSNorm` (a Triton kernel on CUDA, HF numerics on CPU).

A class is swapped only when its code computes exactly what the engine layer computes, judged from the
code, never from names: `__init__(hidden, eps)` creates one `weight` parameter `torch.ones(hidden)`
(or `torch.zeros(hidden)` for the `(1 + weight)` form) and stores eps; `forward(x)` evaluates
symbolically to one of
    weight * (x32 * rsqrt(mean(x32^2, -1, keepdim) + eps)).to(x.dtype)           (Llama numerics)
    (x32 * rsqrt(mean(x32^2, -1, keepdim) + eps) * (1 + weight.float())).to(x.dtype)  (unit_offset)
with x32 = x in fp32. Anything else (weight cast first, other reduction dim, mean subtracted, sqrt
division) is kept and noted. Constructions become `RMSNorm(hidden, eps=..., prefix=...)` on the same
attribute, so state-dict names stay; the class goes once nothing else names it.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted, loads, methods, param_names, self_attr
from porter.convert.engine_imports import add_import, statement_names

ENGINE_MODULE = "porter.engine.layers.layernorm"
_MODULE_BASES = {"nn.Module", "torch.nn.Module"}
_F32 = {"torch.float32", "torch.float"}
# methods a norm class may have besides __init__/forward and the helpers forward calls
_INERT_METHODS = {"extra_repr"}

# symbolic values: tuples (op, *children); leaves ("x",), ("w",), ("eps",), ("const", v), dtypes
X, W, EPS, X_DTYPE, F32 = ("x",), ("w",), ("eps",), ("dtype", "x"), ("dtype", "f32")


def _cast32(v):
    return v if v[0] == "f32" else ("f32", v)


def _comm(op, a, b):
    """Addition and multiplication commute exactly in IEEE arithmetic (and in torch's type promotion)."""
    return (op, *sorted((a, b), key=repr))


_NORMED = ("mul", *sorted((_cast32(X), ("rsqrt", _comm("add", ("mean", ("pow2", _cast32(X))), EPS))), key=repr))
PLAIN = _comm("mul", W, ("castx", _NORMED))
OFFSET = ("castx", _comm("mul", _NORMED, _comm("add", ("const", 1.0), _cast32(W))))


def render(v) -> str:
    if not isinstance(v, tuple):
        return "?"
    if len(v) == 1:
        return v[0]
    if v[0] in ("const", "dtype"):
        return str(v[1])
    return f"{v[0]}({', '.join(render(c) for c in v[1:])})"


class _Unknown(Exception):
    pass


class _Forward:
    """Straight-line symbolic evaluation of a norm forward (and the same-class helpers it calls)."""

    def __init__(self, cls_methods: dict[str, cst.FunctionDef], eps_attrs: set[str]):
        self.methods, self.eps_attrs, self.depth = cls_methods, eps_attrs, 0

    def call(self, fn: cst.FunctionDef, args: list):
        names = param_names(fn)[1:]
        if len(names) != len(args) or fn.params.star_arg not in (cst.MaybeSentinel.DEFAULT, None) or \
                fn.params.star_kwarg is not None:
            raise _Unknown(f"{fn.name.value} signature")
        env = dict(zip(names, args))
        for stmt in fn.body.body:
            if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
                raise _Unknown(f"statement `{code(stmt).strip()[:50]}`")
            s = stmt.body[0]
            if isinstance(s, cst.Expr) and isinstance(s.value, (cst.SimpleString, cst.ConcatenatedString)):
                continue  # docstring
            if isinstance(s, cst.Return) and s.value is not None:
                return self.eval(s.value, env)
            target = s.targets[0].target if isinstance(s, cst.Assign) and len(s.targets) == 1 else \
                s.target if isinstance(s, cst.AnnAssign) and s.value is not None else None
            if not isinstance(target, cst.Name):
                raise _Unknown(f"statement `{code(s).strip()[:50]}`")
            env[target.value] = self.eval(s.value, env)
        raise _Unknown(f"{fn.name.value} returns nothing")

    def eval(self, e: cst.BaseExpression, env: dict):
        if isinstance(e, cst.Name):
            if e.value in env:
                return env[e.value]
            raise _Unknown(f"name `{e.value}`")
        if isinstance(e, (cst.Integer, cst.Float)):
            return ("const", float(e.evaluated_value))
        if isinstance(e, cst.Attribute):
            d = dotted(e)
            if d in _F32:
                return F32
            if self_attr(e) == "weight":
                return W
            if self_attr(e) in self.eps_attrs:
                return EPS
            if e.attr.value == "dtype" and self.eval(e.value, env) == X:
                return X_DTYPE
            raise _Unknown(f"`{code(e)}`")
        if isinstance(e, cst.BinaryOperation):
            a, b = self.eval(e.left, env), self.eval(e.right, env)
            if isinstance(e.operator, cst.Add):
                return _comm("add", a, b)
            if isinstance(e.operator, cst.Multiply):
                return _comm("mul", a, b)
            if isinstance(e.operator, cst.Power) and b == ("const", 2.0):
                return ("pow2", a)
            raise _Unknown(f"`{code(e)}`")
        if isinstance(e, cst.Call):
            return self._call(e, env)
        raise _Unknown(f"`{code(e)}`")

    def _call(self, e: cst.Call, env: dict):
        if any(a.star for a in e.args):
            raise _Unknown(f"`{code(e)}`")
        pos = [a.value for a in e.args if a.keyword is None]
        kw = {a.keyword.value: a.value for a in e.args if a.keyword is not None}
        f = dotted(e.func)
        if f == "torch.rsqrt" and len(pos) == 1 and not kw:
            return ("rsqrt", self.eval(pos[0], env))
        if f == "torch.pow" and len(pos) == 2 and not kw and self.eval(pos[1], env) == ("const", 2.0):
            return ("pow2", self.eval(pos[0], env))
        if f == "torch.mean" and pos:
            return self._mean(self.eval(pos[0], env), pos[1:], kw, e)
        helper = self_attr(e.func)
        if helper in self.methods and helper not in ("forward", "__init__") and self.depth < 4:
            if kw:
                raise _Unknown(f"`{code(e)}`")
            self.depth += 1
            try:
                return self.call(self.methods[helper], [self.eval(a, env) for a in pos])
            finally:
                self.depth -= 1
        if not isinstance(e.func, cst.Attribute) or (f or "").startswith(("torch.", "nn.", "F.")):
            raise _Unknown(f"`{code(e)}`")
        v, method = self.eval(e.func.value, env), e.func.attr.value
        if method == "float" and not pos and not kw:
            return _cast32(v)
        if method in ("to", "type") and len(pos) + len(kw) == 1 and set(kw) <= {"dtype"}:
            dtype = self.eval(pos[0] if pos else kw["dtype"], env)
            if dtype == F32:
                return _cast32(v)
            if dtype == X_DTYPE:
                return ("castx", v)
        if method == "type_as" and len(pos) == 1 and not kw and self.eval(pos[0], env) == X:
            return ("castx", v)
        if method == "pow" and len(pos) == 1 and not kw and self.eval(pos[0], env) == ("const", 2.0):
            return ("pow2", v)
        if method == "square" and not pos and not kw:
            return ("pow2", v)
        if method == "rsqrt" and not pos and not kw:
            return ("rsqrt", v)
        if method == "mean":
            return self._mean(v, pos, kw, e)
        raise _Unknown(f"`{code(e)}`")

    def _mean(self, v, pos, kw, e):
        dims = pos[:1] or [kw.get("dim")]
        keep = pos[1] if len(pos) > 1 else kw.get("keepdim")
        if len(pos) > 2 or set(kw) - {"dim", "keepdim"} or dims[0] is None or keep is None or \
                code(dims[0]) != "-1" or code(keep) != "True":
            raise _Unknown(f"`{code(e)}` (not a mean over the last dim with keepdim)")
        return ("mean", v)


def _init_shape(cls: cst.ClassDef):
    """(hidden param, eps param, eps attrs, weight init "ones"/"zeros", eps default) or a reason string."""
    init = methods(cls).get("__init__")
    if init is None:
        return "no __init__"
    names = param_names(init)
    if init.params.star_arg not in (cst.MaybeSentinel.DEFAULT, None) or init.params.star_kwarg is not None:
        return "__init__ takes *args/**kwargs"
    weight, attrs = None, {}
    for stmt in init.body.body:
        if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
            return f"__init__ statement `{code(stmt).strip()[:50]}`"
        s = stmt.body[0]
        if isinstance(s, cst.Expr) and isinstance(s.value, (cst.SimpleString, cst.ConcatenatedString)):
            continue
        if isinstance(s, cst.Expr) and code(s.value).replace(" ", "") in (
                "super().__init__()", f"super({cls.name.value},self).__init__()"):
            continue
        attr = self_attr(s.targets[0].target) if isinstance(s, cst.Assign) and len(s.targets) == 1 else None
        if attr == "weight" and isinstance(s.value, cst.Call) and dotted(s.value.func) in ("nn.Parameter",
                                                                                             "torch.nn.Parameter"):
            inner = s.value.args[0].value if len(s.value.args) == 1 else None
            if isinstance(inner, cst.Call) and dotted(inner.func) in ("torch.ones", "torch.zeros") and \
                    len(inner.args) == 1 and isinstance(inner.args[0].value, cst.Name) and \
                    inner.args[0].keyword is None:
                weight = (inner.args[0].value.value, dotted(inner.func).split(".")[1])
                continue
            return f"weight `{code(s.value)}` is not torch.ones/zeros(hidden)"
        if attr and isinstance(s.value, cst.Name) and s.value.value in names[1:]:
            attrs.setdefault(s.value.value, set()).add(attr)
            continue
        return f"__init__ statement `{code(s).strip()[:50]}`"
    if weight is None:
        return "no `self.weight = nn.Parameter(...)`"
    hidden, init_fill = weight
    rest = [n for n in names[1:] if n != hidden]
    if len(rest) != 1 or len(names) != 3 or not attrs.get(rest[0]):
        return "__init__ does not take exactly (hidden, eps)"
    eps = rest[0]
    default = next((p.default for p in (*init.params.params, *init.params.kwonly_params) if p.name.value == eps), None)
    return hidden, eps, attrs[eps], init_fill, default


def recognise(cls: cst.ClassDef):
    """(hidden param, eps param, eps default, unit_offset) when the class is the engine RMSNorm's math,
    else a reason string."""
    if not any(dotted(b.value) in _MODULE_BASES for b in cls.bases) or len(cls.bases) != 1 or cls.decorators:
        return "not a plain nn.Module subclass"
    shape = _init_shape(cls)
    if isinstance(shape, str):
        return shape
    hidden, eps, eps_attrs, init_fill, default = shape
    ms = methods(cls)
    if "forward" not in ms:
        return "no forward"
    evaluator = _Forward(ms, eps_attrs)
    try:
        result = evaluator.call(ms["forward"], [X])
    except _Unknown as e:
        return f"forward not understood at {e}"
    used_helpers = {m for m in ms if m not in ("__init__", "forward") and f"self.{m}(" in code(ms["forward"])}
    extra = set(ms) - {"__init__", "forward"} - _INERT_METHODS - used_helpers
    if extra:
        return f"has other methods {sorted(extra)}"
    if result == PLAIN and init_fill == "ones":
        return hidden, eps, default, False
    if result == OFFSET and init_fill == "zeros":
        return hidden, eps, default, True
    return f"forward computes {render(result)} with weight = {init_fill}(hidden)"


def _is_norm_like(cls: cst.ClassDef) -> bool:
    """Worth a note when kept: it has a weight parameter and normalises (rsqrt or a mean of squares)."""
    text = code(cls)
    return "self.weight" in text and ("rsqrt" in text or "pow(2)" in text or "variance" in text)


class _Constructions(cst.CSTTransformer):
    """Rewrites `Norm(args)` into `RMSNorm(hidden, eps=..., [unit_offset=True,] prefix=...)`."""

    def __init__(self, norms: dict[str, tuple], engine_name: str):
        super().__init__()
        self.norms, self.engine_name = norms, engine_name
        self.fn: list[cst.FunctionDef] = []
        self.paths: dict[int, str] = {}  # id(original call) -> prefix f-string body
        self.count: dict[str, int] = {}

    def visit_FunctionDef(self, node):
        self.fn.append(node)

    def leave_FunctionDef(self, original, updated):
        self.fn.pop()
        return updated

    def visit_Assign(self, node):
        """`self.attr = Norm(...)` -> prefix "{prefix}.attr"; `self.attr = nn.ModuleList([Norm(...) for i
        in ...])` -> "{prefix}.attr.{i}"; a norm anywhere else gets no prefix."""
        attr = self_attr(node.targets[0].target) if len(node.targets) == 1 else None
        v = node.value
        if attr is None or not isinstance(v, cst.Call):
            return
        self.paths[id(v)] = f"{{prefix}}.{attr}"
        comp = v.args[0].value if len(v.args) == 1 else None
        if isinstance(comp, cst.ListComp) and isinstance(comp.for_in.target, cst.Name) and \
                comp.for_in.inner_for_in is None:
            self.paths[id(comp.elt)] = f"{{prefix}}.{attr}.{{{comp.for_in.target.value}}}"

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        name = dotted(updated.func)
        if name not in self.norms:
            return updated
        params, hidden, eps, default, offset = self.norms[name]
        bound: dict[str, cst.BaseExpression] = {}
        for i, a in enumerate(updated.args):
            key = a.keyword.value if a.keyword is not None else (params[i] if i < len(params) else None)
            if a.star or key not in params or key in bound:
                raise ValueError(f"`{code(original)}` does not bind to {name}({', '.join(params)})")
            bound[key] = a.value
        if hidden not in bound or (eps not in bound and default is None):
            raise ValueError(f"`{code(original)}` misses an argument of {name}({', '.join(params)})")
        eq = cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))
        args = [cst.Arg(bound[hidden]), cst.Arg(bound.get(eps, default), keyword=cst.Name("eps"), equal=eq)]
        if offset:
            args.append(cst.Arg(cst.Name("True"), keyword=cst.Name("unit_offset"), equal=eq))
        fn = self.fn[-1] if self.fn else None
        path = self.paths.get(id(original))
        if fn is not None and fn.name.value == "__init__" and "prefix" in param_names(fn) and path:
            args.append(cst.Arg(cst.parse_expression(f'f"{path}"'), keyword=cst.Name("prefix"), equal=eq))
        sep = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        args = [a.with_changes(comma=sep) for a in args[:-1]] + [args[-1]]
        self.count[name] = self.count.get(name, 0) + 1
        return updated.with_changes(func=cst.Name(self.engine_name), args=args,
                                    whitespace_before_args=cst.SimpleWhitespace(""))


class EngineNorms(Pass):
    name = "engine_norms"

    def run(self, module: cst.Module) -> cst.Module:
        classes = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
        norms: dict[str, tuple] = {}
        for name, cls in classes.items():
            found = recognise(cls)
            if isinstance(found, str):
                if _is_norm_like(cls):
                    self.note(cls, f"{name} kept: normalises but is not the engine RMSNorm ({found})")
                continue
            hidden, eps, default, offset = found
            why = self._blocked(module, cls)
            if why:
                self.note(cls, f"{name} kept although it is the engine RMSNorm's math: {why}")
                continue
            norms[name] = (param_names(methods(cls)["__init__"])[1:], hidden, eps, default, offset)
        if not norms:
            return module
        defined = {n for s in module.body for n in statement_names(s)}
        engine_name = "RMSNorm" if "RMSNorm" not in defined - set(norms) else "EngineRMSNorm"
        v = _Constructions(norms, engine_name)
        try:
            module = module.visit(v)
        except ValueError as e:
            self.refuse(None, "RMSNorm construction", str(e))
            return module
        used = loads(module)
        body = []
        for s in module.body:
            name = s.name.value if isinstance(s, cst.ClassDef) else None
            if name in norms:
                offset = " (unit_offset: (1 + weight) form)" if norms[name][4] else ""
                self.note(classes[name], f"{name} -> engine RMSNorm{offset} in {v.count.get(name, 0)} "
                                         f"construction(s); class dropped")
                if not used[name]:
                    continue
            body.append(s)
        return add_import(module.with_changes(body=body), ENGINE_MODULE, "RMSNorm", engine_name)

    def _blocked(self, module: cst.Module, cls: cst.ClassDef) -> str | None:
        """Why swapping would change behaviour elsewhere: the class named other than in calls (isinstance,
        subclassing), or its attributes other than `weight` read from outside."""
        name = cls.name.value
        outside = module.with_changes(body=[s for s in module.body if s is not cls])
        calls = _CallCount(name)
        outside.visit(calls)
        if loads(outside)[name] != calls.count:
            return f"`{name}` is used other than as a constructor"
        own = {a for n, fn in methods(cls).items() for a in _self_attrs(fn)} | set(methods(cls))
        own = {a for a in own if not a.startswith("__")} - {"weight", "forward"}
        read = _foreign_attr_reads(outside)
        if own & read:
            return f"its attribute(s) {sorted(own & read)} are read from outside"
        return None


class _CallCount(cst.CSTVisitor):
    def __init__(self, name: str):
        super().__init__()
        self.name, self.count = name, 0

    def visit_Call(self, node: cst.Call) -> None:
        if isinstance(node.func, cst.Name) and node.func.value == self.name:
            self.count += 1


def _self_attrs(fn: cst.FunctionDef) -> set[str]:
    out: set[str] = set()

    class V(cst.CSTVisitor):
        def visit_Attribute(self, node):
            if self_attr(node):
                out.add(node.attr.value)

    fn.visit(V())
    return out


def _foreign_attr_reads(module: cst.Module) -> set[str]:
    """Attribute names read other than as `self.attr` (`self.norm.eps`, `layer.eps`)."""
    out: set[str] = set()

    class V(cst.CSTVisitor):
        def visit_Attribute(self, node):
            if not (isinstance(node.value, cst.Name) and node.value.value == "self"):
                out.add(node.attr.value)

    module.visit(V())
    return out


def engine_norms(module: cst.Module, ctx) -> cst.Module:
    return EngineNorms(ctx).run(module)
