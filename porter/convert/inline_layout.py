"""Flat-token rewrite of an attention block's batch-first code, with its inline attention found.

Every tensor's dims are tracked symbolically (batch B, sequence S, B merged with a head count, other
dims with their size expression) through view/reshape, transpose/permute, indexing, flatten, split and
the block's helper methods, and each op becomes its equivalent on the flat layout `[T, <the other dims in
HF order>]`: transposes that only move S become no-ops, views keep their non-batch dims. A reshape is
rewritten only when the dims before (or after) the sequence dim provably hold the same elements; the
token count is then written out, so a size mismatch fails loudly at run time.

`softmax(q @ k^T * scale + bias) @ v` (`matmul`, `@`, `bmm`, `baddbmm`, scaling before or after, the
attention mask added, dropout) and `F.scaled_dot_product_attention` are replaced by
`out, weights = attention_interface(self, q, k, v, None, scaling=..., alibi_slopes=..., num_heads=...,
num_kv_heads=..., head_size=...)` and `out = out.view_as(q)`, with the head counts read off the q/k
layouts. Anything else on tracked tensors raises `Refused` with the node.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as matchers

from porter.convert.cst_util import code, dotted, loads, param_names, self_attr
from porter.convert.specialise import NONE_PARAMS

_SOFTMAX = {"F.softmax", "torch.softmax", "nn.functional.softmax", "torch.nn.functional.softmax",
            "functional.softmax"}
_SDPA = {"F.scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention",
         "nn.functional.scaled_dot_product_attention", "scaled_dot_product_attention"}
_MATMUL = {"torch.matmul", "torch.bmm"}
_SAME_LAYOUT = {"contiguous", "float", "half", "bfloat16", "to", "type_as", "clone", "detach",  # elementwise
                "clamp", "clip", "tanh", "sigmoid", "neg", "abs", "exp", "sqrt", "pow"}


class Refused(Exception):
    def __init__(self, node: cst.CSTNode | None, construct: str, why: str):
        super().__init__(why)
        self.node, self.construct, self.why = node, construct, why


# ------------------------------------------------------------------ symbolic values
@dataclass(frozen=True)
class Dim:
    kind: str  # "B" batch, "S" sequence, "BX" batch merged with `size`, "O" any other dim
    size: str | None = None  # code of the size (of the non-batch part for BX); None unknown


@dataclass
class Tensor:
    dims: tuple[Dim, ...]

    def rest(self) -> list[int]:
        """Indices of the dims the flat layout keeps after the token dim, in order."""
        return [i for i, d in enumerate(self.dims) if d.kind not in ("B", "S")]

    def seq(self) -> int:
        idx = [i for i, d in enumerate(self.dims) if d.kind == "S"]
        if len(idx) != 1:
            raise ValueError("no single sequence dim")
        return idx[0]


@dataclass
class Size:  # a name bound to one dim's size
    dim: Dim


@dataclass
class Shape:  # `x.shape`
    tensor: Tensor
    flat: cst.BaseExpression


@dataclass
class Multi:  # a tuple of values
    items: list


@dataclass
class Scores:
    q: cst.BaseExpression
    k: cst.BaseExpression  # flat k (a transposed k is the same flat tensor)
    q_t: Tensor
    k_t: Tensor
    scale: list[str] = field(default_factory=list)
    bias: list[str] | None = None  # multipliers of the ALiBi bias, when one was added
    bias_param: str | None = None


@dataclass
class Probs:
    scores: Scores


class CoreDerived:  # e.g. `scores.dtype`: only meaningful inside the replaced region
    pass


class Conflict:  # bound to different layouts on two paths: an error only if read afterwards
    pass


@dataclass
class _Parts:  # `x.split(size)`: pieces of one layout, as many as the unpacking takes
    tensor: Tensor


def _product(dims) -> tuple[str, ...] | None:
    out = []
    for d in dims:
        if d.kind == "B":
            continue
        if d.size is None:
            return None
        if d.size != "1":
            out.append(d.size)
    return tuple(sorted(out))


def merge(a, b):
    """The value of a name after two branches that bound it differently (same kinds required)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if [d.kind for d in a.dims] != [d.kind for d in b.dims]:
            return None
        return Tensor(tuple(x if x == y else Dim(x.kind, None) for x, y in zip(a.dims, b.dims)))
    if isinstance(a, Multi) and isinstance(b, Multi) and len(a.items) == len(b.items):
        items = [merge(x, y) for x, y in zip(a.items, b.items)]
        return None if any(i is None for i in items) else Multi(items)
    if a is b or a == b:
        return a
    return None


def _int(node) -> int | None:
    try:
        v = ast.literal_eval(code(node))  # an integer literal like `-2`
    except (ValueError, SyntaxError, TypeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _slice_size(s: cst.Slice) -> str | None:
    """`[:n]` -> n, `[a:b]` -> (b) - (a) when both bounds count from the start; None otherwise."""
    lo, hi = s.lower, s.upper
    if s.step is not None or hi is None or code(hi).lstrip().startswith("-") or \
            lo is not None and code(lo).lstrip().startswith("-"):
        return None
    return code(hi) if lo is None or _int(lo) == 0 else f"({code(hi)}) - ({code(lo)})"


def _atom(src: str) -> str:
    """`src` parenthesised unless it is already one operand (a name, attribute, call, number)."""
    node = cst.parse_expression(src)
    simple = (cst.Name, cst.Attribute, cst.Call, cst.Subscript, cst.Integer, cst.Float)
    return src if isinstance(node, simple) and not node.lpar else f"({src})"


def _e(src: str) -> cst.BaseExpression:
    return cst.parse_expression(src)


# ------------------------------------------------------------------ one function
class FlatFunction:
    """Interprets one function of an attention block with the layouts of its tensor parameters and
    returns it rewritten for flat tokens."""

    def __init__(self, block: "object", fn: cst.FunctionDef, params: dict[str, object]):
        self.block, self.fn = block, fn
        self.env: dict[str, object] = dict(params)
        first = next(n for n, v in params.items() if isinstance(v, Tensor))
        self.tokens = f"{first}.shape[0]"
        self.pending: list[cst.BaseStatement] = []
        self.returns: list = []
        self.locals: dict[str, cst.BaseExpression] = {}  # untracked locals (for hoisting into __init__)
        self.cores: list[dict] = []
        self.weights: str | None = None
        self.conds: list[tuple[str, bool]] = []  # enclosing config tests and the branch taken
        self.hint: str | None = None  # the name the statement being read assigns
        self.bias_locals: dict[str, str] = {}  # locals computed from an ALiBi input only -> that input

    # ---- helpers
    def mentions(self, node) -> bool:
        return any(n in self.env for n in loads(node))

    def refuse(self, node, what: str, why: str):
        raise Refused(node, what, why)

    def fresh(self, base: str) -> str:
        taken = set(loads(self.fn)) | set(self.env) | {p for p in param_names(self.fn)}
        name = base
        while name in taken or any(c["out"] == name for c in self.cores):
            name += "_"
        return name

    # ---- expressions
    def ev(self, node: cst.BaseExpression):
        if not self.mentions(node):
            return node, None
        if isinstance(node, cst.Name):
            if isinstance(self.env[node.value], Conflict):
                self.refuse(node, f"`{node.value}`", "bound to tensors of different layouts on the paths here")
            return node, self.env[node.value]
        if isinstance(node, cst.Attribute):
            return self._attribute(node)
        if isinstance(node, cst.Subscript):
            return self._subscript(node)
        if isinstance(node, cst.Call):
            return self._call(node)
        if isinstance(node, cst.BinaryOperation):
            return self._binary(node)
        if isinstance(node, cst.UnaryOperation):
            inner, v = self.ev(node.expression)
            if isinstance(v, Tensor):
                return node.with_changes(expression=inner), v
        if isinstance(node, (cst.Tuple, cst.List)):
            out = [self.ev(e.value) for e in node.elements]
            return node.with_changes(elements=[e.with_changes(value=n) for e, (n, _) in zip(node.elements, out)]), \
                Multi([v for _, v in out])
        if isinstance(node, (cst.ListComp, cst.GeneratorExp)):
            return self._comprehension(node)
        if isinstance(node, cst.IfExp) and not self.mentions(node.test):
            truth = self.block.truth(node.test)  # `a if past is None else b`: a fact picks the branch
            if truth is not None:
                return self.ev(node.body if truth else node.orelse)
        self.refuse(node, f"`{code(node)[:60]}`", "a tensor expression the flat-layout rewrite does not know")

    def _attribute(self, node: cst.Attribute):
        base, v = self.ev(node.value)
        attr = node.attr.value
        if attr == "shape" and isinstance(v, Tensor):
            return node.with_changes(value=base), Shape(v, base)
        if attr in ("dtype", "device"):
            if isinstance(v, (Scores, Probs)):
                return node, CoreDerived()
            return node.with_changes(value=base), None
        self.refuse(node, f"`{code(node)[:60]}`", "an attribute of a tracked tensor the rewrite does not know")

    def _subscript(self, node: cst.Subscript):
        base, v = self.ev(node.value)
        if isinstance(v, Shape):
            if len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index):
                i = _int(node.slice[0].slice.value)
                if i is not None:
                    t = v.tensor
                    d = t.dims[i]
                    if d.kind == "O":
                        j = t.rest().index(i % len(t.dims)) + 1
                        return _e(f"{code(v.flat)}.shape[{j}]"), Size(d)
                    return node, Size(d)
            sl = node.slice[0].slice if len(node.slice) == 1 else None
            if isinstance(sl, cst.Slice) and sl.step is None and all(
                    b is None or _int(b) is not None for b in (sl.lower, sl.upper)):
                lo = _int(sl.lower) if sl.lower is not None else None
                hi = _int(sl.upper) if sl.upper is not None else None
                picked = list(range(len(v.tensor.dims)))[lo:hi]
                if all(v.tensor.dims[i].kind != "O" for i in picked):  # `b, s = x.shape[:2]`
                    return node, Multi([Size(v.tensor.dims[i]) for i in picked])
            self.refuse(node, f"`{code(node)[:60]}`", "a shape subscript other than one constant index")
        if isinstance(v, Multi):
            if len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index) and \
                    _int(node.slice[0].slice.value) is not None:
                return node.with_changes(value=base), v.items[_int(node.slice[0].slice.value)]
        if not isinstance(v, Tensor):
            self.refuse(node, f"`{code(node)[:60]}`", "indexing a value the rewrite does not track")
        return self._index(node, base, v)

    def _index(self, node: cst.Subscript, base, t: Tensor):
        elems = list(node.slice)
        ell = [i for i, e in enumerate(elems) if isinstance(e.slice, cst.Index) and code(e.slice.value) == "..."]
        if len(ell) > 1:
            self.refuse(node, f"`{code(node)[:60]}`", "more than one ellipsis")
        n = len(t.dims)
        if ell:
            before, after = elems[: ell[0]], elems[ell[0] + 1:]
            mapping = list(zip(range(len(before)), before)) + list(zip(range(n - len(after), n), after))
        else:
            mapping = list(zip(range(len(elems)), elems))
        by_dim = dict(mapping)
        new_dims, flat = [], []
        for i, d in enumerate(t.dims):
            e = by_dim.get(i)
            full = e is None or isinstance(e.slice, cst.Slice) and e.slice.lower is None and \
                e.slice.upper is None and e.slice.step is None
            if d.kind != "O":
                if not full:
                    self.refuse(node, f"`{code(node)[:60]}`", "indexes the batch or sequence dim")
                new_dims.append(d)
                if d.kind == "BX":
                    flat.append(":")
                continue
            if full:
                new_dims.append(d)
                flat.append(":")
                continue
            s = e.slice
            if isinstance(s, cst.Index):
                if code(s.value) == "None" or self.mentions(s.value):
                    self.refuse(node, f"`{code(node)[:60]}`", "inserts a dim or indexes with a tensor")
                if isinstance(s.value, cst.List):
                    new_dims.append(Dim("O", str(len(s.value.elements))))
                flat.append(code(s.value))  # an integer index drops the dim
                continue
            new_dims.append(Dim("O", _slice_size(s)))
            flat.append(code(cst.Subscript(cst.Name("x"), [e.with_changes(comma=cst.MaybeSentinel.DEFAULT)]))[2:-1])
        if all(f == ":" for f in flat):
            return base, Tensor(tuple(new_dims))
        if ell:  # keep the file's right-aligned `x[..., i, :]` form
            while flat[0] == ":":
                flat.pop(0)
            return _e(f"{code(base)}[..., {', '.join(flat)}]"), Tensor(tuple(new_dims))
        while flat[-1] == ":":
            flat.pop()
        return _e(f"{code(base)}[:, {', '.join(flat)}]"), Tensor(tuple(new_dims))

    def _comprehension(self, node):
        f = node.for_in
        if f.inner_for_in is not None or f.ifs or not isinstance(f.target, cst.Name) or \
                not isinstance(f.iter, (cst.Tuple, cst.List)):
            self.refuse(node, f"`{code(node)[:60]}`", "a comprehension over tensors other than `[f(x) for x in (a, b)]`")
        name = f.target.value
        outs, new_elt = [], None
        saved = self.env.get(name)
        for e in f.iter.elements:
            _, v = self.ev(e.value)
            if not isinstance(v, Tensor):
                self.refuse(node, f"`{code(node)[:60]}`", "iterates over values the rewrite does not track")
            self.env[name] = v
            elt, ev = self.ev(node.elt)
            if new_elt is not None and code(elt) != code(new_elt):
                self.refuse(node, f"`{code(node)[:60]}`", "the tensors it iterates over need different rewrites")
            new_elt = elt
            outs.append(ev)
        if saved is None:
            self.env.pop(name, None)
        else:
            self.env[name] = saved
        return node.with_changes(elt=new_elt), Multi(outs)

    def _binary(self, node: cst.BinaryOperation):
        op = node.operator
        if isinstance(op, cst.MatrixMultiply):
            return self._matmul(node, node.left, node.right)
        left, lv = self.ev(node.left)
        if isinstance(lv, Scores):
            return node, self._score_op(node, lv, op, node.right)
        if isinstance(op, cst.Add) and isinstance(self.ev(node.right)[1], Scores):
            return node, self._score_op(node, self.ev(node.right)[1], op, node.left)
        right, rv = self.ev(node.right)
        if all(not isinstance(v, (Size, Tensor, Scores, Probs, Shape, Multi)) or isinstance(v, Size) and v.dim.kind == "O"
               for v in (lv, rv)):  # arithmetic on a head or feature size (already the flat dim's size)
            return node.with_changes(left=left, right=right), None
        if isinstance(lv, Size) or isinstance(rv, Size):
            if isinstance(op, cst.FloorDivide) and isinstance(lv, Size) and lv.dim.kind == "BX" and rv is None \
                    and code(node.right) == lv.dim.size:
                return node, Size(Dim("B"))
            self.refuse(node, f"`{code(node)[:60]}`", "arithmetic on the batch or sequence size")
        if isinstance(lv, Tensor) and (rv is None or isinstance(rv, Tensor)):
            merged = lv if rv is None else merge(lv, rv)
            if merged is None:
                self.refuse(node, f"`{code(node)[:60]}`", "combines tensors of different layouts")
            if rv is None:
                self._check_broadcast(node, lv, node.right)
            return node.with_changes(left=left, right=right), merged
        if isinstance(rv, Tensor) and lv is None:
            self._check_broadcast(node, rv, node.left)
            return node.with_changes(left=left, right=right), rv
        self.refuse(node, f"`{code(node)[:60]}`", "an operation on attention scores or weights the rewrite does not know")

    def _check_broadcast(self, node, t: Tensor, other) -> None:
        """An untracked operand broadcasts the same way on the flat layout when the tensor is token-major
        ([B, S, ...]: flat drops only B); otherwise one shaped to broadcast over inner dims (`w[:, None]`,
        `.view(...)`, `.unsqueeze(...)`) would meet other dims on flat tokens."""
        kinds = [d.kind for d in t.dims]
        if kinds[:2] in (["B", "S"], ["BX", "S"]) or kinds[:1] == ["S"]:
            return
        shaped = "None" in {code(e.slice.value) for n in _subscripts(other) for e in n.slice
                            if isinstance(e.slice, cst.Index)} or \
            any(isinstance(c.func, cst.Attribute) and c.func.attr.value in ("view", "reshape", "unsqueeze", "expand")
                for c in _calls(other))
        if shaped:
            self.refuse(node, f"`{code(node)[:60]}`", "broadcasts a shaped tensor over a head-major layout")

    def _score_op(self, node, s: Scores, op, other) -> Scores:
        other_code = code(other)
        if isinstance(op, (cst.Multiply, cst.Divide)):
            if self.mentions(other) or self._forward_inputs(other):
                self.refuse(node, f"`{code(node)[:60]}`", "scales the scores by a forward-time value")
            factor = _atom(other_code) if isinstance(op, cst.Multiply) else f"(1 / {_atom(other_code)})"
            return Scores(s.q, s.k, s.q_t, s.k_t, s.scale + [factor],
                          None if s.bias is None else s.bias + [factor], s.bias_param)
        if isinstance(op, cst.Add):
            inputs = self._forward_inputs(other)
            if inputs and all(i in NONE_PARAMS for i in inputs):
                return s  # the attention mask: None at inference, the engine applies causality
            bias = [i for i in inputs if i in self.block.alibi]
            if len(inputs) == 1 and bias and s.bias is None:
                return Scores(s.q, s.k, s.q_t, s.k_t, s.scale, [], bias[0])
            why = "; ".join(f"`{i}`: {self.block.other_bias[i]}" for i in inputs if i in self.block.other_bias)
            self.refuse(node, f"`{code(node)[:60]}`", "adds a score bias that is neither the attention mask nor "
                                                      "standard ALiBi" + (f" ({why})" if why else ""))
        self.refuse(node, f"`{code(node)[:60]}`", "an operation on attention scores the rewrite does not know")

    def _forward_inputs(self, node) -> list[str]:
        """Forward inputs `node` reads (through locals computed from an ALiBi input too)."""
        params = set(param_names(self.fn)[1:])
        return list(dict.fromkeys(self.bias_locals.get(n, n) for n in loads(node)
                                  if n in self.bias_locals or n in params and n not in self.env))

    def _bias_plumbing(self, node) -> bool:
        """Reads an ALiBi input and no tracked tensor: code that only reshapes or slices the bias (it goes
        with the bias, which the engine's slopes replace)."""
        names = loads(node)
        if any(isinstance(self.env.get(n), (Tensor, Scores, Probs, Multi, Shape)) for n in names):
            return False
        return any(n in self.bias_locals or n in self.block.alibi and n not in self.env for n in names)

    def _matmul(self, node, a_node, b_node):
        a, av = self.ev(a_node)
        b, bv = self.ev(b_node)
        if isinstance(av, Tensor) and isinstance(bv, Tensor):
            if len(av.dims) >= 3 and av.dims[-2].kind == "S" and bv.dims[-1].kind == "S" and bv.dims[-2].kind != "S":
                k_dims = bv.dims[:-2] + (bv.dims[-1], bv.dims[-2])
                return node, Scores(a, b, av, Tensor(k_dims))
        if isinstance(av, Probs) and isinstance(bv, Tensor) and len(bv.dims) >= 3 and bv.dims[-2].kind == "S":
            return self._core(node, av.scores, b, bv)
        self.refuse(node, f"`{code(node)[:60]}`", "a matrix product that is not q @ k^T or weights @ v")

    # the replaced region: q, k, v go to the engine
    def _core(self, node, s: Scores, v, vt: Tensor):
        out_t = Tensor(s.q_t.dims[:-1] + (vt.dims[-1],))
        q = s.q
        if not isinstance(q, cst.Name):
            name = self.fresh("query_states")
            self.pending.append(cst.parse_statement(f"{name} = {code(q)}\n"))
            q = cst.Name(name)
        out = self.hint or self.fresh("attn_output")
        weights = self.weights or self.fresh("attn_weights")
        self.weights = weights
        kwargs: dict[str, str] = {}
        if s.scale:
            kwargs["scaling"] = " * ".join(s.scale)
        if s.bias_param is not None:
            heads = self._heads(s.q_t)
            if heads is None:
                self.refuse(node, "ALiBi attention", "cannot tell the query head count for its slopes")
            kwargs["alibi_slopes"] = " * ".join([self.block.alibi[s.bias_param].format(heads=heads), *s.bias])
        for key, t in (("num_heads", s.q_t), ("num_kv_heads", s.k_t)):
            heads = self._heads(t)
            if heads is None:
                self.refuse(node, f"`{code(node)[:60]}`", f"cannot tell the {'key' if t is s.k_t else 'query'} "
                                                          "head count from the code that shapes it")
            kwargs[key] = heads
        if s.q_t.dims[-1].size is None:
            self.refuse(node, f"`{code(node)[:60]}`", "cannot tell the head size from the code that shapes q")
        kwargs["head_size"] = self._hoist(s.q_t.dims[-1].size)
        core = {"out": out, "weights": weights, "q": code(q), "k": code(s.k), "v": code(v), "kwargs": kwargs,
                "conds": list(self.conds)}
        self.cores.append(core)
        self.pending.append(core_statement(core))
        self.pending.append(cst.parse_statement(f"{out} = {out}.view_as({code(q)})\n"))
        return cst.Name(out), out_t

    def _heads(self, t: Tensor) -> str | None:
        dims = [t.dims[i] for i in t.rest()[:-1]]
        sizes = [d.size for d in dims]
        if None in sizes:
            return None
        if not sizes:
            return "1"  # no head dim: one head
        return self._hoist(" * ".join(sizes) if len(sizes) > 1 else sizes[0])

    def _hoist(self, expr: str) -> str:
        """A size expression with the function's untracked locals replaced by their definitions, so the
        constructor can read it (the attention pass refuses it if it still reads forward-time values)."""
        node = _e(expr)
        names = [n for n in loads(node) if n in self.locals]
        if not names:
            return expr

        class Sub(cst.CSTTransformer):
            def leave_Name(s, o, u):
                return cst.parse_expression(f"({code(self.locals[u.value])})") if u.value in names else u

        return code(node.visit(Sub()))

    def _call(self, node: cst.Call):
        f = node.func
        name = dotted(f) or ""
        if isinstance(f, cst.Attribute) and f.attr.value == "baddbmm" and not self.mentions(f.value):
            return self._baddbmm(node, f.value, node.args)
        if name == "torch.baddbmm":
            return self._baddbmm(node, node.args[0].value, node.args[1:])
        if isinstance(f, cst.Attribute) and self.mentions(f.value):
            recv, rv = self.ev(f.value)
            if isinstance(rv, Tensor):
                return self._tensor_method(node, recv, rv, f.attr.value)
            if isinstance(rv, (Scores, Probs)):
                return self._core_method(node, rv, f.attr.value)
            self.refuse(node, f"`{code(node)[:60]}`", "a method of a value the rewrite does not track")
        if name in _MATMUL and len(node.args) == 2:
            return self._matmul(node, node.args[0].value, node.args[1].value)
        if name in _SOFTMAX or name.endswith("functional.softmax"):
            _, sv = self.ev(node.args[0].value)
            if isinstance(sv, Scores):
                self._check_last_dim(node, 1, sv)
                return node, Probs(sv)
        if isinstance(f, cst.Call) and (dotted(f.func) or "").endswith("Softmax") and len(node.args) == 1:
            _, sv = self.ev(node.args[0].value)  # `nn.Softmax(dim=-1)(scores)`
            if isinstance(sv, Scores):
                self._check_last_dim(f, 0, sv)
                return node, Probs(sv)
        if name in _SDPA or name.endswith(".scaled_dot_product_attention"):
            return self._sdpa(node)
        if name == "torch.broadcast_to" and len(node.args) == 2:
            x, xv = self.ev(node.args[0].value)
            shp, sv = self.ev(node.args[1].value)
            if isinstance(xv, Tensor) and isinstance(sv, Shape):
                return node.with_changes(args=[node.args[0].with_changes(value=x),
                                               node.args[1].with_changes(value=shp)]), sv.tensor
        attr = self_attr(f)
        if attr in self.block.dropouts or name in ("F.dropout", "nn.functional.dropout", "torch.nn.functional.dropout"):
            x, xv = self.ev(node.args[0].value)
            return x, xv
        if attr in self.block.linears and len(node.args) == 1:
            x, xv = self.ev(node.args[0].value)
            if isinstance(xv, Tensor):
                return node.with_changes(args=[node.args[0].with_changes(value=x)]), \
                    Tensor(xv.dims[:-1] + (Dim("O", None),))
        if attr in self.block.helpers:
            return self.block.helper_call(self, node, attr)
        if attr is not None or (isinstance(f, cst.Attribute) and self.mentions(f)):
            self.refuse(node, f"`{code(node)[:60]}`", "a call on tensors the flat-layout rewrite does not know")
        # any other function: taken to act per element or on the last dim of its tensor arguments (HF's
        # rotary apply, dropout_add, F.linear), as the rest of the converter assumes; one given a dim,
        # an axis or integer sizes may reshape, and is refused
        if any(a.keyword is not None and a.keyword.value in ("dim", "axis", "dims", "size", "shape") or
               _int(a.value) is not None or isinstance(a.value, (cst.Tuple, cst.List)) for a in node.args):
            self.refuse(node, f"`{code(node)[:60]}`", "a function given dims or sizes of batch-first tensors")
        args, tracked = [], []
        for a in node.args:
            n, v = self.ev(a.value)
            args.append(a.with_changes(value=n))
            if isinstance(v, (Scores, Probs, Size, Shape, Multi)):
                self.refuse(node, f"`{code(node)[:60]}`", "passes attention internals or sizes to a function")
            if isinstance(v, Tensor):
                tracked.append(v)
        if not tracked:
            return node.with_changes(args=args), None
        # one tensor: its layout; several (`q, k = apply_rotary(q, k, cos, sin)`): each keeps its own
        return node.with_changes(args=args), tracked[0] if len(tracked) == 1 else Multi(tracked)

    def _check_last_dim(self, node, index, s):
        dim = next((a.value for a in node.args if a.keyword is not None and a.keyword.value == "dim"), None)
        if dim is None and len(node.args) > index and node.args[index].keyword is None:
            dim = node.args[index].value
        if dim is None or _int(dim) != -1 and _int(dim) != len(s.q_t.dims) - 1:
            self.refuse(node, f"`{code(node)[:60]}`", "a softmax over another dim than the keys")

    def _baddbmm(self, node, bias, args):
        kw = {a.keyword.value: a.value for a in args if a.keyword is not None}
        pos = [a.value for a in args if a.keyword is None]
        b1 = kw.get("batch1", pos[0] if pos else None)
        b2 = kw.get("batch2", pos[1] if len(pos) > 1 else None)
        if b1 is None or b2 is None:
            self.refuse(node, f"`{code(node)[:60]}`", "baddbmm without its two batches")
        _, s = self._matmul(node, b1, b2)
        beta, alpha = kw.get("beta"), kw.get("alpha")
        scale = [_atom(code(alpha))] if alpha is not None else []
        inputs = self._forward_inputs(bias)
        if not (len(inputs) == 1 and inputs[0] in self.block.alibi):
            self.refuse(node, f"`{code(node)[:60]}`", "a baddbmm bias that is not standard ALiBi")
        return node, Scores(s.q, s.k, s.q_t, s.k_t, scale, [_atom(code(beta))] if beta is not None else [], inputs[0])

    def _sdpa(self, node: cst.Call):
        pos = [a.value for a in node.args if a.keyword is None]
        kw = {a.keyword.value: a.value for a in node.args if a.keyword is not None}
        if len(pos) < 3:
            self.refuse(node, f"`{code(node)[:60]}`", "expected positional query, key, value")
        (q, qv), (k, kv), (v, vv) = (self.ev(x) for x in pos[:3])
        if not all(isinstance(t, Tensor) for t in (qv, kv, vv)):
            self.refuse(node, f"`{code(node)[:60]}`", "query/key/value layouts unknown")
        mask = kw.get("attn_mask", pos[3] if len(pos) > 3 else None)
        if mask is not None and code(mask) != "None" and not all(i in NONE_PARAMS for i in self._forward_inputs(mask)):
            self.refuse(node, f"`{code(node)[:60]}`", "an attention mask that is not the (absent) HF mask")
        if "is_causal" in kw and code(kw["is_causal"]) == "False":
            self.refuse(node, f"`{code(node)[:60]}`", "non-causal attention (the engine's attention is causal)")
        for key in kw:
            if key not in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"):
                self.refuse(node, f"`{code(node)[:60]}`", f"keyword `{key}` has no engine equivalent")
        s = Scores(q, k, qv, kv, [_atom(code(kw["scale"]))] if "scale" in kw and code(kw["scale"]) != "None" else [])
        return self._core(node, s, v, vv)

    def _core_method(self, node, v, m):
        if m in ("view", "reshape", "to", "float", "contiguous", "type", "half", "bfloat16"):
            return node, v
        if m == "softmax" and isinstance(v, Scores):
            self._check_last_dim(node, 0, v)
            return node, Probs(v)
        if m == "masked_fill" and isinstance(v, Scores):
            if all(i in NONE_PARAMS for i in self._forward_inputs(node.args[0].value)) and \
                    self._forward_inputs(node.args[0].value):
                return node, v
        self.refuse(node, f"`{code(node)[:60]}`", "an operation on attention scores the rewrite does not know")

    # ---- tensor methods
    def _tensor_method(self, node: cst.Call, recv, t: Tensor, m: str):
        if m in ("view", "reshape"):
            return self._reshape(node, recv, t)
        if m == "size" and not node.args:
            return node.with_changes(func=node.func.with_changes(value=recv)), Shape(t, recv)
        if m in _SAME_LAYOUT:
            args = [a.with_changes(value=self.ev(a.value)[0]) for a in node.args]
            return node.with_changes(func=node.func.with_changes(value=recv), args=args), t
        ints = [_int(a.value) for a in node.args]
        if m in ("transpose", "permute", "flatten") and None in ints:
            self.refuse(node, f"`{code(node)[:60]}`", "non-constant dims")
        n = len(t.dims)
        if m == "transpose" and len(ints) == 2:
            a, b = (i % n for i in ints)
            order = list(range(n))
            order[a], order[b] = order[b], order[a]
            return self._permuted(node, recv, t, order)
        if m == "permute":
            return self._permuted(node, recv, t, [i % n for i in ints])
        if m == "flatten" and len(ints) == 2:
            a, b = (i % n for i in ints)
            group = t.dims[a:b + 1]
            kinds = [d.kind for d in group]
            if "S" in kinds:
                self.refuse(node, f"`{code(node)[:60]}`", "merges the sequence dim with others")
            if "B" in kinds or "BX" in kinds:
                if kinds.count("B") + kinds.count("BX") != 1 or kinds[0] not in ("B", "BX"):
                    self.refuse(node, f"`{code(node)[:60]}`", "merges the batch dim in an unknown way")
                sizes = [d.size for d in group if d.kind != "B"]
                size = None if None in sizes else " * ".join(sizes) if sizes else None
                new = Tensor(t.dims[:a] + (Dim("BX", size),) + t.dims[b + 1:])
                if group[0].kind == "B" and len(group) == 1:
                    new = t
                return recv, new
            rest = t.rest()
            fa, fb = rest.index(a) + 1, rest.index(b) + 1
            sizes = [d.size for d in group]
            new = Tensor(t.dims[:a] + (Dim("O", None if None in sizes else " * ".join(sizes)),) + t.dims[b + 1:])
            return _e(f"{code(recv)}.flatten({fa}, {fb})"), new
        if m in ("split", "chunk") and node.args:
            dim = next((a.value for a in node.args if a.keyword is not None and a.keyword.value == "dim"),
                       node.args[1].value if len(node.args) > 1 and node.args[1].keyword is None else None)
            d = _int(dim) if dim is not None else 0
            if d is None or t.dims[d % n].kind != "O":
                self.refuse(node, f"`{code(node)[:60]}`", "splits the batch or sequence dim")
            fd = t.rest().index(d % n) + 1
            args = [a.with_changes(value=_e(str(fd))) if a.value is dim else a for a in node.args]
            if dim is None:
                args.append(cst.Arg(_e(str(fd)), keyword=cst.Name("dim")))
            parts = Tensor(t.dims[: d % n] + (Dim("O", None),) + t.dims[d % n + 1:])
            count = _int(node.args[0].value) if m == "chunk" else None
            if count is None and isinstance(node.args[0].value, (cst.Tuple, cst.List)):
                count = len(node.args[0].value.elements)
            # as many parts as the unpacking names (a split size leaves the count to the tensor)
            return node.with_changes(func=node.func.with_changes(value=recv), args=args), \
                Multi([parts] * count) if count else _Parts(parts)
        self.refuse(node, f"`{code(node)[:60]}`", f"`.{m}(...)` on a batch-first tensor")

    def _permuted(self, node, recv, t: Tensor, order: list[int]):
        new = Tensor(tuple(t.dims[i] for i in order))
        old_rest = t.rest()
        new_rest = [order[i] for i in new.rest()]
        if new_rest == old_rest:
            return recv, new  # only the batch/sequence dims moved: nothing to do on flat tokens
        perm = [0] + [old_rest.index(i) + 1 for i in new_rest]
        return _e(f"{code(recv)}.permute({', '.join(map(str, perm))})"), new

    def _reshape(self, node: cst.Call, recv, t: Tensor):
        args = [a for a in node.args]
        if len(args) == 1 and isinstance(args[0].value, (cst.Tuple, cst.List)):
            args = [cst.Arg(e.value) for e in args[0].value.elements]
        if any(a.star or a.keyword is not None for a in args):
            self.refuse(node, f"`{code(node)[:60]}`", "a view/reshape with starred or keyword sizes")
        dims: list[Dim | None] = []
        for a in args:
            dims.append(self._size_arg(a.value))
        if "S" not in [d.kind for d in dims if d is not None]:
            if dims.count(None) != 1:
                self.refuse(node, f"`{code(node)[:60]}`", "cannot tell which size is the sequence")
            dims[dims.index(None)] = Dim("S")
        has_b = any(d.kind in ("B", "BX") for d in t.dims)
        if has_b != any(d is not None and d.kind in ("B", "BX") for d in dims):
            self.refuse(node, f"`{code(node)[:60]}`", "moves the batch dim in an unknown way")
        new = Tensor(tuple(d if d is not None else Dim("O", None) for d in dims))
        try:
            s_old, s_new = t.seq(), new.seq()
        except ValueError:
            self.refuse(node, f"`{code(node)[:60]}`", "no single sequence dim")
        pre_ok = _product(t.dims[:s_old]) is not None and _product(t.dims[:s_old]) == _product(new.dims[:s_new])
        post_ok = _product(t.dims[s_old + 1:]) is not None and \
            _product(t.dims[s_old + 1:]) == _product(new.dims[s_new + 1:])
        if not (pre_ok or post_ok):
            self.refuse(node, f"`{code(node)[:60]}`", "cannot prove it keeps the sequence dim apart from the others")
        rest = [self._arg_code(args, dims, i) for i, d in enumerate(dims) if d is None or d.kind not in ("B", "S")]
        tokens = "-1" if pre_ok and post_ok and "-1" not in rest else self.tokens
        return _e(f"{code(recv)}.reshape({', '.join([tokens, *rest])})"), new

    def _arg_code(self, args, dims, i) -> str:
        d = dims[i]
        if d is not None and d.kind == "BX":
            return d.size
        return code(args[i].value)

    def _size_arg(self, node) -> Dim | None:
        """The dim a view/reshape size argument stands for; None for -1."""
        if _int(node) == -1:
            return None
        if isinstance(node, cst.Name) and isinstance(self.env.get(node.value), Size):
            return self.env[node.value].dim
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
            for x, y in ((node.left, node.right), (node.right, node.left)):
                if isinstance(x, cst.Name) and isinstance(self.env.get(x.value), Size) and \
                        self.env[x.value].dim.kind == "B" and not self.mentions(y):
                    return Dim("BX", code(y))
        if self.mentions(node):
            self.refuse(node, f"`{code(node)[:60]}`", "a size computed from the batch or sequence size")
        v = _int(node)
        return Dim("O", str(v) if v is not None else code(node))

    # ---- statements
    def stmts(self, stmts) -> list:
        out = []
        for stmt in stmts:
            new = self.statement(stmt)
            out.extend(self.pending)
            self.pending = []
            if new is not None:
                out.extend(new if isinstance(new, list) else [new])
        return out

    def statement(self, stmt):
        if isinstance(stmt, cst.SimpleStatementLine):
            body = []
            for small in stmt.body:
                r = self.small(small, stmt)
                if r is not None:
                    body.append(r)
            if not body:
                return None
            return stmt.with_changes(body=body)
        if isinstance(stmt, cst.If):
            return self._if(stmt)
        if isinstance(stmt, cst.For):
            if self.mentions(stmt.iter) or self.mentions(stmt.target):
                self.refuse(stmt, "loop over tensors", "not rewritten")
            body = self.stmts(stmt.body.body)
            return stmt.with_changes(body=stmt.body.with_changes(body=body))
        if self.mentions(stmt):
            self.refuse(stmt, f"`{code(stmt).strip()[:60]}`", "a statement on tensors the rewrite does not know")
        return stmt

    def _if(self, stmt: cst.If):
        unknown = [n for n in loads(stmt.test) if n in self.block.other_bias and n not in self.env]
        if unknown:  # `if bias is not None:` guarding the code that adds a non-ALiBi bias
            self.refuse(stmt, f"score bias `{unknown[0]}`", self.block.other_bias[unknown[0]])
        test = self.block.test(stmt.test, self)
        if self._bias_plumbing(test):  # e.g. a rank check of the bias before slicing it
            return None
        truth = self.block.truth(test)
        if truth is not None:  # an inference fact (or an ALiBi input always passed): fold to the live branch
            if truth:
                return self.stmts(stmt.body.body)
            if stmt.orelse is None:
                return None
            if isinstance(stmt.orelse, cst.If):
                return self._if(stmt.orelse)
            return self.stmts(stmt.orelse.body.body)
        if self.mentions(stmt.test):
            if not any(isinstance(self.env.get(n), (CoreDerived, Scores, Probs)) for n in loads(stmt.test)):
                self.refuse(stmt, f"`if {code(stmt.test)[:50]}`", "a test on tensors")
        before = dict(self.env)
        self.conds.append((code(test), True))
        body = self.stmts(stmt.body.body)
        self.conds[-1] = (code(test), False)
        env_body = self.env
        self.env = dict(before)
        orelse = None
        if stmt.orelse is not None:
            if isinstance(stmt.orelse, cst.If):
                orelse = self._if(stmt.orelse)
            else:
                orelse = stmt.orelse.with_changes(body=stmt.orelse.body.with_changes(
                    body=self.stmts(stmt.orelse.body.body) or [cst.SimpleStatementLine([cst.Pass()])]))
        self.conds.pop()
        env_else = self.env
        self.env = {}
        for n in set(env_body) | set(env_else):
            a, b = env_body.get(n), env_else.get(n)
            if a is None or b is None:
                self.env[n] = a if b is None else b
                continue
            m = merge(a, b)
            if m is None and not (isinstance(a, (Scores, Probs, CoreDerived)) or isinstance(b, (Scores, Probs, CoreDerived))):
                m = Conflict()
            self.env[n] = m if m is not None else a
        if self.mentions(stmt.test) and not body and (orelse is None or not orelse.body.body):
            return None  # a dtype test of the replaced region, with nothing left in it
        if not body:
            body = [cst.SimpleStatementLine([cst.Pass()])]
        return stmt.with_changes(test=test, body=stmt.body.with_changes(body=body), orelse=orelse)

    def small(self, small, stmt):
        if isinstance(small, cst.Assign):
            return self._assign(small, stmt)
        if isinstance(small, cst.AugAssign):
            target = small.target
            if isinstance(target, cst.Name) and isinstance(self.env.get(target.value), Scores):
                op = {cst.MultiplyAssign: cst.Multiply(), cst.DivideAssign: cst.Divide(),
                      cst.AddAssign: cst.Add()}.get(type(small.operator))
                if op is None:
                    self.refuse(stmt, f"`{code(small)}`", "an in-place operation on scores")
                self.env[target.value] = self._score_op(stmt, self.env[target.value], op, small.value)
                return None
            if self.mentions(small):
                _, tv = self.ev(target)
                value, v = self.ev(small.value)
                if isinstance(tv, Tensor):
                    return small.with_changes(value=value)
                self.refuse(stmt, f"`{code(small)}`", "an in-place operation the rewrite does not know")
            return small
        if isinstance(small, cst.Return):
            if small.value is None or not self.mentions(small.value):
                self.returns.append(None)
                return small
            value, v = self._return_value(small.value)
            self.returns.append(v)
            return small.with_changes(value=value)
        if isinstance(small, cst.Expr):
            if self.mentions(small.value):
                value, _ = self.ev(small.value)
                return small.with_changes(value=value)
            return small
        if self.mentions(small):
            self.refuse(stmt, f"`{code(small)[:60]}`", "a statement on tensors the rewrite does not know")
        return small

    def _return_value(self, node):
        if isinstance(node, cst.Tuple):
            items, values = [], []
            for e in node.elements:
                _, v = self.ev(e.value) if self.mentions(e.value) else (e.value, None)
                if isinstance(v, (Scores, Probs)):
                    items.append(e.with_changes(value=cst.Name(self.weights or "None")))
                    values.append(None)
                    continue
                n, v = self.ev(e.value)
                items.append(e.with_changes(value=n))
                values.append(v)
            return node.with_changes(elements=items), Multi(values)
        return self.ev(node)

    def _assign(self, small: cst.Assign, stmt):
        if len(small.targets) != 1:
            if self.mentions(small.value):
                self.refuse(stmt, f"`{code(small)[:60]}`", "chained assignment of tensors")
            return small
        target = small.targets[0].target
        if self._bias_plumbing(small.value):
            source = next(self.bias_locals.get(n, n) for n in loads(small.value)
                          if n in self.bias_locals or n in self.block.alibi)
            for n in target_names_of(target):
                if n != source:
                    self.bias_locals[n] = source
            return None
        if not self.mentions(small.value):
            for n in target_names_of(target):
                self.env.pop(n, None)
                if isinstance(target, cst.Name):
                    self.locals[n] = small.value
            return small
        if isinstance(target, cst.Name) and not loads(small.value)[target.value]:
            self.hint = target.value
        value, v = self.ev(small.value)
        self.hint = None
        if isinstance(target, cst.Name):
            name = target.value
            if isinstance(value, cst.Name) and value.value == name:
                self.env[name] = v
                return None  # `x = x` left where the op is a no-op on flat tokens
            if isinstance(v, (Scores, Probs, CoreDerived)):
                self.env[name] = v
                if isinstance(v, Probs):
                    self.weights = name
                return None
            if isinstance(v, Size):
                if v.dim.kind != "O":
                    self.env[name] = v
                    return None
                self.env.pop(name, None)
                return small.with_changes(value=value)
            if v is None:
                self.env.pop(name, None)
                return small.with_changes(value=value)
            self.env[name] = v
            return small.with_changes(value=value)
        if isinstance(target, (cst.Tuple, cst.List)):
            names = [e.value for e in target.elements]
            if isinstance(v, Shape):
                return self._shape_unpack(small, stmt, names, v)
            items = [v.tensor] * len(names) if isinstance(v, _Parts) else v.items if isinstance(v, Multi) else None
            if items is None or len(items) < len(names):
                self.refuse(stmt, f"`{code(small)[:60]}`", "unpacks a value the rewrite does not track")
            if all(isinstance(i, Size) and i.dim.kind != "O" for i in items) and len(items) == len(names):
                for e, item in zip(names, items):
                    self.env[e.value] = item
                return None  # batch/sequence sizes: only their uses in shape ops matter
            for e, item in zip(names, items):
                if not isinstance(e, cst.Name):
                    self.refuse(stmt, f"`{code(small)[:60]}`", "unpacks into something other than names")
                if item is None:
                    self.env.pop(e.value, None)
                else:
                    self.env[e.value] = item
            return small.with_changes(value=value)
        self.refuse(stmt, f"`{code(small)[:60]}`", "assigns a tensor through an attribute or subscript")

    def _shape_unpack(self, small, stmt, names, v: Shape):
        t = v.tensor
        if len(names) != len(t.dims) or not all(isinstance(e, cst.Name) for e in names):
            self.refuse(stmt, f"`{code(small)[:60]}`", "a shape unpacking of another rank")
        kept = []
        for i, (e, d) in enumerate(zip(names, t.dims)):
            if d.kind == "O":
                self.env.pop(e.value, None)
                if e.value != "_" and loads(self.fn)[e.value]:
                    kept.append(f"{e.value} = {code(v.flat)}.shape[{t.rest().index(i) + 1}]")
            else:
                self.env[e.value] = Size(d)
        if not kept:
            return None
        return cst.parse_statement("; ".join(kept) + "\n").body[0] if len(kept) == 1 else \
            self.refuse(stmt, f"`{code(small)[:60]}`", "binds several non-batch sizes")


def _subscripts(node) -> list[cst.Subscript]:
    return list(matchers.findall(node, matchers.Subscript()))


def _calls(node) -> list[cst.Call]:
    return list(matchers.findall(node, matchers.Call()))


def target_names_of(target) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for e in target.elements for n in target_names_of(e.value)]
    return []


def core_statement(core: dict) -> cst.BaseStatement:
    kwargs = "".join(f", {k}={v}" for k, v in core["kwargs"].items())
    return cst.parse_statement(f"{core['out']}, {core['weights']} = attention_interface(self, {core['q']}, "
                               f"{core['k']}, {core['v']}, None{kwargs})\n")
