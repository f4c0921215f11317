"""Pass: HF's rotate-half rotary apply -> the engine's `apply_rotary_cos_sin` (one Triton launch for q and
k on CUDA, HF's torch expression on CPU).

Judged from the code, never from names. A module-level function qualifies when it is evaluated
symbolically to
    cos' = cos.unsqueeze(U); sin' = sin.unsqueeze(U)
    return q * cos' + R(q) * sin', k * cos' + R(k) * sin'        (+ and * in either order)
with R a module-level function whose body is the half-swap `cat((-x[..., d//2:], x[..., :d//2]), dim=-1)`,
and U the literal 1 or a parameter defaulting to 1. In converted files q/k are [T, H, D] and cos/sin
[T, D], so each call site that leaves U at 1 becomes `apply_rotary_cos_sin(q, k, cos, sin)`; the HF
function and R go once nothing else uses them. Casts, fp32 upcasts, interleaved rotate_half, partial
rotary that slices q itself, or another U are kept and noted.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.cst_util import code, dotted, loads, param_names
from porter.convert.context import Pass
from porter.convert.engine_imports import add_import, bound_names

ENGINE_MODULE = "porter.engine.layers.rotary"
ENGINE_NAME = "apply_rotary_cos_sin"


class _Unknown(Exception):
    pass


def _comm(op, a, b):
    return (op, *sorted((a, b), key=repr))


def _body(fn: cst.FunctionDef) -> list[cst.BaseSmallStatement]:
    """The function's statements without its docstring; _Unknown if any is compound or multi-statement."""
    out = []
    for stmt in fn.body.body:
        if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
            raise _Unknown(f"statement `{code(stmt).strip()[:50]}`")
        s = stmt.body[0]
        if isinstance(s, cst.Expr) and isinstance(s.value, (cst.SimpleString, cst.ConcatenatedString)):
            continue
        out.append(s)
    return out


def _plain_params(fn: cst.FunctionDef) -> bool:
    p = fn.params
    return p.star_arg in (cst.MaybeSentinel.DEFAULT, None) and p.star_kwarg is None and not p.kwonly_params \
        and not p.posonly_params and not fn.decorators and fn.asynchronous is None


def _run(fn: cst.FunctionDef, env: dict, eval_expr):
    """Straight-line evaluation: assignments to names, then one return."""
    for s in _body(fn):
        if isinstance(s, cst.Return) and s.value is not None:
            return eval_expr(s.value, env)
        if isinstance(s, cst.Assign) and len(s.targets) == 1 and isinstance(s.targets[0].target, cst.Name):
            env[s.targets[0].target.value] = eval_expr(s.value, env)
            continue
        raise _Unknown(f"statement `{code(s).strip()[:50]}`")
    raise _Unknown(f"{fn.name.value} returns nothing")


def is_rotate_half(fn: cst.FunctionDef) -> bool:
    """`x1 = x[..., : x.shape[-1] // 2]; x2 = x[..., x.shape[-1] // 2 :]; return torch.cat((-x2, x1), dim=-1)`,
    in any naming or with the halves inline."""
    names = param_names(fn)
    if len(names) != 1 or not _plain_params(fn) or fn.params.params[0].default is not None:
        return False
    x = names[0]
    half = f"{x}.shape[-1]//2"

    def ev(e, env):
        if isinstance(e, cst.Name) and e.value in env:
            return env[e.value]
        if isinstance(e, cst.UnaryOperation) and isinstance(e.operator, cst.Minus):
            return ("neg", ev(e.expression, env))
        if isinstance(e, cst.Subscript) and isinstance(e.value, cst.Name) and env.get(e.value.value) == ("x",) and \
                len(e.slice) == 2 and isinstance(e.slice[0].slice, cst.Index) and \
                isinstance(e.slice[0].slice.value, cst.Ellipsis) and isinstance(e.slice[1].slice, cst.Slice):
            sl = e.slice[1].slice
            lo, hi = ("".join(code(b).split()) if b is not None else None for b in (sl.lower, sl.upper))
            if sl.step is None and lo is None and hi == half:
                return ("lo",)
            if sl.step is None and lo == half and hi is None:
                return ("hi",)
        if isinstance(e, cst.Call) and dotted(e.func) == "torch.cat" and not any(a.star for a in e.args):
            pos = [a.value for a in e.args if a.keyword is None]
            kw = {a.keyword.value: a.value for a in e.args if a.keyword is not None}
            dim = kw.get("dim", pos[1] if len(pos) > 1 else None)
            if len(pos) + len(kw) == 2 and set(kw) <= {"dim"} and dim is not None and code(dim) == "-1" and \
                    isinstance(pos[0], (cst.Tuple, cst.List)) and len(pos[0].elements) == 2:
                return ("cat", *(ev(el.value, env) for el in pos[0].elements))
        raise _Unknown(code(e))

    try:
        return _run(fn, {x: ("x",)}, ev) == ("cat", ("neg", ("hi",)), ("lo",))
    except _Unknown:
        return False


def recognise(fn: cst.FunctionDef, rotate_halves: set[str]):
    """(params, name of the unsqueeze_dim parameter or None) when fn is the plain rotate-half apply, else a
    reason string."""
    names = param_names(fn)
    if not _plain_params(fn):
        return "signature has */**/keyword-only parameters or decorators"
    if len(names) not in (4, 5):
        return f"takes {len(names)} parameters, not (q, k, cos, sin[, unsqueeze_dim])"
    q, k, cos, sin = (("q",), ("k",), ("cos",), ("sin",))
    env = dict(zip(names[:4], (q, k, cos, sin)))
    unsq_param = None
    if len(names) == 5:
        p = fn.params.params[4]
        if p.default is None or code(p.default) != "1":
            return f"parameter `{names[4]}` does not default to 1"
        unsq_param = names[4]
        env[unsq_param] = ("const", 1)
    if any(p.default is not None for p in fn.params.params[:4]):
        return "q/k/cos/sin have defaults"

    def ev(e, env):
        if isinstance(e, cst.Name):
            if e.value in env:
                return env[e.value]
            raise _Unknown(f"name `{e.value}`")
        if isinstance(e, cst.Integer):
            return ("const", int(e.value))
        if isinstance(e, cst.BinaryOperation) and isinstance(e.operator, (cst.Add, cst.Multiply)):
            return _comm("add" if isinstance(e.operator, cst.Add) else "mul", ev(e.left, env), ev(e.right, env))
        if isinstance(e, cst.Tuple) and len(e.elements) == 2 and not any(isinstance(el, cst.StarredElement)
                                                                          for el in e.elements):
            return ("tuple", *(ev(el.value, env) for el in e.elements))
        if isinstance(e, cst.Call) and len(e.args) == 1 and e.args[0].keyword is None and not e.args[0].star:
            arg = ev(e.args[0].value, env)
            if isinstance(e.func, cst.Name) and e.func.value in rotate_halves:
                return ("rot", arg)
            if isinstance(e.func, cst.Attribute) and e.func.attr.value == "unsqueeze":
                base = ev(e.func.value, env)
                if arg != ("const", 1):
                    raise _Unknown(f"`{code(e)}` (unsqueezes at {arg[-1]}, not 1)")
                return ("unsq", base)
        raise _Unknown(f"`{code(e)}`")

    try:
        result = _run(fn, env, ev)
    except _Unknown as e:
        return f"body not understood at {e}"

    def rotated(x):
        return _comm("add", _comm("mul", x, ("unsq", cos)), _comm("mul", ("rot", x), ("unsq", sin)))

    if result != ("tuple", rotated(q), rotated(k)):
        return "does not return (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)"
    return names, unsq_param


class _CallSites(cst.CSTTransformer):
    def __init__(self, applies: dict[str, tuple], engine_name: str):
        super().__init__()
        self.applies, self.engine_name = applies, engine_name
        self.swapped: dict[str, int] = {}
        self.kept: list[tuple[cst.Call, str]] = []

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        if not isinstance(updated.func, cst.Name) or updated.func.value not in self.applies:
            return updated
        names, unsq = self.applies[updated.func.value]
        bound = {}
        for i, a in enumerate(updated.args):
            key = a.keyword.value if a.keyword is not None else (names[i] if i < len(names) else None)
            if a.star or key not in names or key in bound:
                self.kept.append((original, "arguments do not bind"))
                return updated
            bound[key] = a.value
        if len(bound) < 4 or any(n not in bound for n in names[:4]):
            self.kept.append((original, "missing arguments"))
            return updated
        if unsq is not None and unsq in bound and code(bound[unsq]) != "1":
            self.kept.append((original, f"{unsq}={code(bound[unsq])} (only 1 fits flat [T, H, D] q/k)"))
            return updated
        sep = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        args = [cst.Arg(bound[n], comma=sep) for n in names[:3]] + [cst.Arg(bound[names[3]])]
        self.swapped[updated.func.value] = self.swapped.get(updated.func.value, 0) + 1
        return updated.with_changes(func=cst.Name(self.engine_name), args=args)


class EngineRotary(Pass):
    name = "engine_rotary"

    def run(self, module: cst.Module) -> cst.Module:
        fns = {s.name.value: s for s in module.body if isinstance(s, cst.FunctionDef)}
        halves = {n for n, f in fns.items() if is_rotate_half(f)}
        applies = {}
        for name, fn in fns.items():
            found = recognise(fn, halves)
            if not isinstance(found, str):
                applies[name] = found
            elif self._rotary_like(fn, fns):
                self.note(fn, f"{name} kept: not the plain rotate-half apply ({found})")
        if not applies:
            return module
        engine_name = ENGINE_NAME if ENGINE_NAME not in bound_names(module) else "engine_" + ENGINE_NAME
        v = _CallSites(applies, engine_name)
        module = module.visit(v)
        for call, why in v.kept:
            self.note(None, f"`{code(call).strip()[:70]}` kept: {why}")
        if not v.swapped:
            return module
        used = loads(module)
        dropped = {n for n in applies if not used[n]}
        body = [s for s in module.body if not (isinstance(s, cst.FunctionDef) and s.name.value in dropped)]
        module = module.with_changes(body=body)
        used = loads(module)
        dropped |= {n for n in halves if not used[n]}
        module = module.with_changes(body=[s for s in module.body if not (isinstance(s, cst.FunctionDef)
                                                                          and s.name.value in dropped)])
        for name, count in v.swapped.items():
            gone = f"; dropped {', '.join(sorted(dropped & ({name} | halves)))}" if dropped else ""
            self.note(fns[name], f"{name} -> engine {ENGINE_NAME} at {count} call site(s){gone}")
        return add_import(module, ENGINE_MODULE, ENGINE_NAME, engine_name)

    @staticmethod
    def _rotary_like(fn: cst.FunctionDef, fns: dict[str, cst.FunctionDef]) -> bool:
        """Worth a note when kept: it unsqueezes and calls a one-argument module-level helper that
        concatenates or stacks (a rotate_half of some kind)."""
        text = code(fn)
        return ".unsqueeze(" in text and any(
            f"{n}(" in text and len(param_names(h)) == 1 and ("torch.cat" in code(h) or "torch.stack" in code(h))
            for n, h in fns.items() if h is not fn)


def engine_rotary(module: cst.Module, ctx) -> cst.Module:
    return EngineRotary(ctx).run(module)
