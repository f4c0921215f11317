"""Normalise multi-head latent attention (MLA): low-rank compressed q/kv projections become flat per-head
q/k/v for the engine's paged `Attention`.

Recognised by dataflow in an attention class (one that calls transformers' attention interface), not by
names:
- latent kv: `c = self.A(hidden)`, `latent, k_pe = split(c, [R, P], dim=-1)`, `self.N(latent)` (a norm),
  then `self.B(...)` on it, viewed per head and split `[NOPE, V]` into k_nope and the value (in forward or
  in a helper method it calls);
- q: one statement binding one name from the other linears of `hidden` (a plain `self.q(hidden)` or a
  low-rank `self.qb(self.norm(self.qa(hidden)))`, possibly chosen by an `if`), viewed per head and split
  `[NOPE, P]`;
- rope: `q_pe, k_pe = rope(q_pe, k_pe, ...)` (possibly an if/else between rope functions), on the rope
  parts only; the functions are kept as written (HF's convention: per-token cos/sin broadcast over a head
  dim at 1 holds on flat [tokens, heads, dim] too);
- `out, w = attention_interface(self, q, k, v, ...)`, then one output linear.
The forward is rewritten on flat tokens: q = cat(q_nope, q_pe) and k = cat(k_nope, k_pe shared by every
head); q, k and v are zero-padded to one head size (the engine Attention's contract), the output sliced
back. Any other computation in the forward is refused, never dropped. The paged cache stores the full
per-head k and v, not the compressed latent (a follow-up). The projections that
produce whole heads (q, kv_b) become column-parallel, the latent down-projections replicated, the output
projection row-parallel, so tensor parallelism splits heads cleanly. The rope function's
`view_as_real(..).flatten(3)` (which assumed [batch, heads, seq, dim]) becomes `flatten(-2)`.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as matchers

from porter.convert.context import Context
from porter.convert.cst_util import calls_of, classes, code, contains, dotted, loads, methods, param_names, self_attr, \
    is_pure, self_call_attr, target_names
from porter.convert.specialise import NONE_PARAMS

_LINEAR = ("nn.Linear", "torch.nn.Linear", "Linear")
_INTERFACE = "ALL_ATTENTION_FUNCTIONS"
_SHAPE_METHODS = {"view", "reshape", "transpose", "contiguous"}


class Unsupported(Exception):
    """An MLA-looking class whose code does not match the recognised dataflow: (node, why)."""

    def __init__(self, node: cst.CSTNode, why: str):
        super().__init__(why)
        self.node, self.why = node, why


def _linear_calls(value: cst.BaseExpression) -> list[cst.Call]:
    """nn.Linear constructions in an __init__ value (also the branches of `a if c else None`)."""
    return [c for c in matchers.findall(value, matchers.Call()) if dotted(c.func) in _LINEAR]


def _statements(node: cst.CSTNode) -> list[cst.BaseSmallStatement]:
    """Every simple statement in `node` (a function or a statement), nested ones included, in order."""
    out: list[cst.BaseSmallStatement] = []

    class V(cst.CSTVisitor):
        def visit_SimpleStatementLine(self, n):
            out.extend(n.body)
            return False

    node.visit(V())
    return out


def _assigns(fn: cst.FunctionDef) -> dict[str, list[cst.BaseExpression]]:
    """name -> the values assigned to it (plain names and tuple targets; a tuple target records the whole value)."""
    out: dict[str, list[cst.BaseExpression]] = {}
    for small in _statements(fn):
        if isinstance(small, cst.Assign):
            for t in small.targets:
                names = [t.target] if isinstance(t.target, cst.Name) else \
                    [e.value for e in t.target.elements] if isinstance(t.target, cst.Tuple) else []
                for n in names:
                    if isinstance(n, cst.Name):
                        out.setdefault(n.value, []).append(small.value)
    return out


def _origin(assigns, expr: cst.BaseExpression, seen: set[str] | None = None) -> set[str]:
    """`self.X` submodules called anywhere upstream of `expr` (through the names it reads)."""
    seen = set() if seen is None else seen
    found = {a for c in matchers.findall(expr, matchers.Call()) if (a := self_call_attr(c))}
    for name in loads(expr):
        if name not in seen and name in assigns:
            seen.add(name)
            for value in assigns[name]:
                found |= _origin(assigns, value, seen)
    return found


def _split(value: cst.BaseExpression) -> tuple[cst.BaseExpression, list[cst.BaseExpression]] | None:
    """`torch.split(x, [a, b], dim=-1)` / `x.split([a, b], dim=-1)` -> (x, [a, b])."""
    if not isinstance(value, cst.Call):
        return None
    args = list(value.args)
    if dotted(value.func) == "torch.split" and len(args) >= 2:
        src, rest = args[0].value, args[1:]
    elif isinstance(value.func, cst.Attribute) and value.func.attr.value == "split" and args:
        src, rest = value.func.value, args
    else:
        return None
    sizes = rest[0].value
    dim = [a for a in rest[1:] if a.keyword is None or a.keyword.value == "dim"]
    if not isinstance(sizes, (cst.List, cst.Tuple)) or len(dim) != 1 or code(dim[0].value) not in ("-1", "3"):
        return None
    return src, [e.value for e in sizes.elements]


def _splits(fn: cst.FunctionDef) -> list[tuple[list[str], cst.BaseExpression, list[cst.BaseExpression]]]:
    """(target names, split source, sizes) of every two-way split assignment in `fn`."""
    out = []
    for small in _statements(fn):
        if isinstance(small, cst.Assign) and isinstance(small.targets[0].target, cst.Tuple):
            names = [e.value.value for e in small.targets[0].target.elements if isinstance(e.value, cst.Name)]
            got = _split(small.value)
            if got and len(names) == 2 and len(got[1]) == 2:
                out.append((names, got[0], got[1]))
    return out


class MLA:
    """The recognised parts of one MLA attention class."""

    def __init__(self, cls: cst.ClassDef):
        self.cls = cls
        ms = methods(cls)
        if "__init__" not in ms or "forward" not in ms:
            raise Unsupported(cls, "it has no __init__ or forward")
        self.init, self.fwd = ms["__init__"], ms["forward"]
        self.linears = {a: _linear_calls(s.value) for a, s in _linear_attrs(cls)}
        params = param_names(self.fwd)
        if len(params) < 2:
            raise Unsupported(self.fwd, "forward takes no hidden states")
        self.hidden = params[1]
        self._match()

    def _match(self) -> None:
        fwd, assigns = self.fwd, _assigns(self.fwd)
        self.assigns = assigns
        # latent kv split: the first part goes through a norm submodule
        latent = None
        for names, src, sizes in _splits(fwd):
            srcs = _origin(assigns, src) & set(self.linears)
            if len(srcs) == 1 and self._norm_of(names[0]) is not None:
                latent = (names, srcs.pop(), sizes)
                break
        if latent is None:
            raise Unsupported(fwd, "no latent kv projection split into [latent, rope] with the latent normed")
        (self.latent, self.k_pe), self.kv_a, (self.rank, self.rope) = latent
        self.kv_norm = self._norm_of(self.latent)
        self._check_latent_only_normed()
        self._check_reads_hidden(self.kv_a)
        # the interface call and the output projection
        self.iface_stmt, self.iface_lookup = self._interface()
        target = self.iface_stmt.targets[0].target
        if not (isinstance(target, cst.Tuple) and len(target.elements) == 2):
            raise Unsupported(self.iface_stmt, "expected `out, weights = attention_interface(...)`")
        self.out, self.weights = (code(e.value) for e in target.elements)
        outs = [a for a in self.linears if any(self.out in loads(c) for c in calls_of(fwd, a))]
        if len(outs) != 1:
            raise Unsupported(fwd, "no single output projection of the attention output")
        self.o = outs[0]
        # q: one statement binding one name from the remaining linears of the hidden states
        self.q_stmt, self.q_name, self.q_linears = self._q_statement()
        rest = [a for a in self.linears if a not in (self.kv_a, self.o, *self.q_linears)]
        if len(rest) != 1:
            raise Unsupported(self.cls, f"expected one latent-to-heads kv projection, found {rest or 'none'}")
        self.kv_b = rest[0]
        kv_split = [(n, sizes) for fn in methods(self.cls).values() for n, src, sizes in _splits(fn)
                    if self.kv_b in _origin(_assigns(fn), src)]
        if len(kv_split) != 1:
            raise Unsupported(self.cls, f"the output of `self.{self.kv_b}` is not split once into [k_nope, v]")
        (self.k_nope, self.v), (self.nope, self.v_dim) = kv_split[0]
        q_split = [(n, sizes) for n, src, sizes in _splits(fwd) if self.q_name in loads(src) or
                   self.q_name in {v for x in loads(src) for v in _names_upstream(assigns, x)}]
        if len(q_split) != 1 or not _same(q_split[0][1], [self.nope, self.rope]):
            raise Unsupported(self.q_stmt, f"q is not split once into [{code(self.nope)}, {code(self.rope)}] "
                                           "(nope part, rope part)")
        self.q_nope, self.q_pe = q_split[0][0]
        self.rope_stmt, self.rope_prelude, self.rope_calls = self._rope()
        for e in (self.rank, self.rope, self.nope, self.v_dim):
            if set(loads(e)) & set(assigns):
                raise Unsupported(e, f"head-part size `{code(e)}` depends on forward-time values")
        self.heads = self._heads()
        self._check_nothing_else()

    def _check_latent_only_normed(self) -> None:
        """The un-normed latent feeds the norm and nothing else (until its name is rebound)."""
        live = False
        for stmt in self.fwd.body.body:
            smalls = _statements(stmt)
            if not live:
                live = any(isinstance(x, cst.Assign) and self.latent in (target_names(x.targets[0].target) or [])
                           for x in smalls)
                continue
            normed = sum(1 for c in calls_of(stmt, self.kv_norm) if loads(c)[self.latent])
            if loads(stmt)[self.latent] != normed:
                raise Unsupported(stmt, f"the latent `{self.latent}` is read other than by `self.{self.kv_norm}`")
            if any(isinstance(x, cst.Assign) and self.latent in (target_names(x.targets[0].target) or [])
                   for x in smalls):
                return

    def _check_nothing_else(self) -> None:
        """The rewrite regenerates the forward from the parts above, so every other statement of it (and of
        the helper methods it calls) must be batch-shape bookkeeping, a re-layout of a tensor, the HF cache
        branch, or the q/k assembly: anything that computes on tensors otherwise is refused, never dropped."""
        known = {id(s) for s in (self.q_stmt, self.rope_source, *self.rope_prelude, *self.iface_lookup)}
        modules = {self.kv_norm, *self.linears}
        helpers = {self_call_attr(c) for c in self._calls_of_any(self.fwd)} & set(methods(self.cls)) - {"forward"}
        for fn in [self.fwd, *(methods(self.cls)[h] for h in sorted(helpers))]:
            tensors = {p for p in param_names(fn)[1:]}
            for stmt in fn.body.body:
                checked = not (id(stmt) in known or _cache_branch(stmt))
                for small in _statements(stmt) if isinstance(stmt, cst.SimpleStatementLine) or not checked else [stmt]:
                    why = checked and small is not self.iface_stmt and _unmodelled(small, tensors, modules | helpers)
                    if why:
                        raise Unsupported(small, f"`{code(small).strip()[:70]}` {why}; the latent-attention "
                                                 "rewrite would drop it")
                    if isinstance(small, cst.Assign) and _reads_tensor(small.value, tensors):
                        for t in small.targets:
                            tensors |= set(target_names(t.target) or [])

    def _norm_of(self, name: str) -> str | None:
        for call in self._calls_of_any(self.fwd):
            a = self_call_attr(call)
            if a not in self.linears and len(call.args) == 1 and code(call.args[0].value) == name:
                return a
        return None

    def _calls_of_any(self, fn) -> list[cst.Call]:
        out = []

        class V(cst.CSTVisitor):
            def visit_Call(self, n):
                if self_call_attr(n):
                    out.append(n)

        fn.visit(V())
        return out

    def _check_reads_hidden(self, attr: str) -> None:
        for call in calls_of(self.fwd, attr):
            if [code(a.value) for a in call.args] != [self.hidden]:
                raise Unsupported(call, f"`self.{attr}` does not read the block input `{self.hidden}`")

    def _interface(self) -> tuple[cst.Assign, list[cst.BaseStatement]]:
        lookup, iface_vars = [], set()
        for s in self.fwd.body.body:
            if isinstance(s, cst.SimpleStatementLine) and contains(
                    s, lambda n: isinstance(n, cst.Name) and n.value == _INTERFACE):
                lookup.append(s)
                for small in s.body:
                    if isinstance(small, (cst.Assign, cst.AnnAssign)):
                        t = small.targets[0].target if isinstance(small, cst.Assign) else small.target
                        iface_vars.add(code(t))
        for small in _statements(self.fwd):
            if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call) and \
                    code(small.value.func) in iface_vars:
                return small, lookup
        raise Unsupported(self.fwd, "no `out, weights = attention_interface(...)` call")

    def _q_statement(self):
        """The first statement (or if/else) whose every assignment binds one name to a projection chain of
        the block input, e.g. `q = self.qb(self.norm(self.qa(x))).view(shape).transpose(1, 2)`."""
        others = [a for a in self.linears if a not in (self.kv_a, self.o)]
        for s in self.fwd.body.body:
            used = [a for a in others if calls_of(s, a)]
            if not used or not isinstance(s, (cst.If, cst.SimpleStatementLine)):
                continue
            assigns = _statements(s)
            chains = [self._chain(small.value) if isinstance(small, cst.Assign) else None for small in assigns]
            bound = {code(small.targets[0].target) for small in assigns if isinstance(small, cst.Assign)}
            if None in chains or len(bound) != 1:
                continue  # not (only) a projection of the block input
            self.q_column = {self_call_attr(c) for c in chains}
            if not self.q_column <= set(self.linears):
                raise Unsupported(s, "the q projection chain must end in a linear")
            return s, bound.pop(), used
        raise Unsupported(self.fwd, "no q projection of the block input (`q = self.proj(hidden)` or a low-rank "
                                    "chain of projections and a norm)")

    def _chain(self, value: cst.BaseExpression) -> cst.Call | None:
        """`self.a(self.n(self.b(hidden))).view(..).transpose(..)` -> the `self.a(...)` call: submodule calls
        down to the block input, with only shape methods after them (flat tokens do not need those)."""
        while isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and \
                value.func.attr.value in _SHAPE_METHODS and not self_call_attr(value):
            value = value.func.value
        inner = value
        while isinstance(inner, cst.Call) and self_call_attr(inner) and len(inner.args) == 1:
            inner = inner.args[0].value
        if inner is value or code(inner) != self.hidden:
            return None
        return value

    def _rope(self) -> tuple[cst.BaseStatement, list[cst.BaseStatement], list[cst.Call]]:
        """The forward statement (or if/else choosing between rope functions) whose every assignment is
        `q_pe, k_pe = rope(q_pe, k_pe, ...)`, the earlier statements binding the rest of its arguments from
        the forward's inputs only (`cos, sin = position_embeddings`), and its rope calls."""
        params = set(param_names(self.fwd))
        for s in self.fwd.body.body:
            calls = []
            for small in _statements(s):
                v = small.value if isinstance(small, cst.Assign) else None
                if isinstance(v, cst.Call) and isinstance(v.func, cst.Name) and len(v.args) >= 2 and \
                        code(v.args[0].value) == self.q_pe and self.k_pe in self._upstream(v.args[1].value):
                    calls.append((small, v))
            if not calls:
                continue
            if not isinstance(s, (cst.If, cst.SimpleStatementLine)) or len(calls) != len(_statements(s)) or \
                    any(not (isinstance(a.targets[0].target, cst.Tuple) and len(a.targets[0].target.elements) == 2)
                        for a, _ in calls):
                raise Unsupported(s, "expected only `q_pe, k_pe = rope(q_pe, k_pe, ...)` assignments")
            flat = s.visit(_KeyRopeArg(self.k_pe))  # what the rewrite keeps of it
            prelude, bound = [], set()
            for p in self.fwd.body.body:
                if p is s:
                    break
                small = p.body[0] if isinstance(p, cst.SimpleStatementLine) and len(p.body) == 1 else None
                targets = set(target_names(small.targets[0].target) or []) if isinstance(small, cst.Assign) else set()
                if targets and is_pure(small.value) and not (set(loads(small.value)) & set(self.assigns) - params) \
                        and targets & (set(loads(flat)) - {self.q_pe, self.k_pe}):
                    prelude.append(p)
                    bound |= targets
            reads = set(loads(flat)) - {self.q_pe, self.k_pe, "self"} - params - bound
            if reads & set(self.assigns):
                raise Unsupported(s, f"the rope call reads forward-time values ({', '.join(sorted(reads & set(self.assigns)))})")
            self.rope_source = s
            return flat, prelude, [v for _, v in calls]
        raise Unsupported(self.fwd, f"no `q_pe, k_pe = rope({self.q_pe}, {self.k_pe}, ...)` on the rope parts")

    def rope_calls_targets(self) -> list[cst.BaseElement]:
        small = next(x for x in _statements(self.rope_stmt) if isinstance(x, cst.Assign))
        return list(small.targets[0].target.elements)

    def _upstream(self, expr: cst.BaseExpression) -> set[str]:
        names = set(loads(expr))
        return names | {u for n in names for u in _names_upstream(self.assigns, n)}

    def _heads(self) -> str:
        """The head count: the left factor of the q projection's output size, which kv_b and the output
        projection must share."""
        def factor(call: cst.Call, index: int) -> str | None:
            arg = [a.value for a in call.args if a.keyword is None]
            size = arg[index] if len(arg) > index else None
            if isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply):
                return code(size.left)
            return None

        heads = {factor(c, 1) for a in self.q_column for c in self.linears[a]}
        heads |= {factor(c, 1) for c in self.linears[self.kv_b]} | {factor(c, 0) for c in self.linears[self.o]}
        if len(heads) != 1 or None in heads:
            raise Unsupported(self.cls, "the q, kv_b and output projections are not sized `heads * head_dim` "
                                        "with one head count")
        return heads.pop()


_LAYOUT_CALLS = {"view", "reshape", "transpose", "contiguous", "expand", "unsqueeze", "flatten", "new_empty",
                 "copy_", "split", "torch.split", "torch.cat"}


def _cache_branch(stmt: cst.BaseStatement) -> bool:
    """`if past_key_values is not None: ...` without else: HF's cache, which inference folds away."""
    t = stmt.test if isinstance(stmt, cst.If) and stmt.orelse is None else None
    return isinstance(t, cst.Comparison) and isinstance(t.left, cst.Name) and t.left.value in NONE_PARAMS and \
        len(t.comparisons) == 1 and isinstance(t.comparisons[0].operator, cst.IsNot) and \
        code(t.comparisons[0].comparator) == "None"


def _reads_tensor(expr: cst.CSTNode, tensors: set[str]) -> bool:
    """Whether `expr` reads a tensor other than through its `.shape` (shape bookkeeping is not)."""
    found = []

    class V(cst.CSTVisitor):
        def visit_Attribute(self, n):
            return n.attr.value != "shape"

        def visit_Call(self, n):
            return not (isinstance(n.func, cst.Attribute) and n.func.attr.value in ("size", "dim"))

        def visit_Name(self, n):
            if n.value in tensors:
                found.append(n)

    expr.visit(V())
    return bool(found)


def _unmodelled(small: cst.CSTNode, tensors: set[str], modules: set[str]) -> str | None:
    """Why `small` computes something the rewrite does not model (None when it does not)."""
    if isinstance(small, cst.Return):
        return None
    if not isinstance(small, (cst.Assign, cst.Expr)):
        return "is not an assignment"
    if isinstance(small, cst.Assign) and any(target_names(t.target) is None for t in small.targets):
        return "writes into a tensor"
    bad: list[str] = []

    class V(cst.CSTVisitor):
        def visit_Call(self, n):
            name = dotted(n.func) or (n.func.attr.value if isinstance(n.func, cst.Attribute) else code(n.func))
            if self_call_attr(n) in modules or name in _LAYOUT_CALLS or \
                    isinstance(n.func, cst.Attribute) and n.func.attr.value in _LAYOUT_CALLS:
                return True
            if not _reads_tensor(n, tensors):
                return True
            bad.append(f"calls `{name}`")
            return False

        def visit_BinaryOperation(self, n):
            if _reads_tensor(n, tensors):
                bad.append("computes on a tensor")
                return False
            return True

    small.visit(V())
    return bad[0] if bad else None


def _names_upstream(assigns, name: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    for value in assigns.get(name, []):
        for n in loads(value):
            if n not in seen:
                seen.add(n)
                _names_upstream(assigns, n, seen)
    return seen


def _same(a: list[cst.BaseExpression], b: list[cst.BaseExpression]) -> bool:
    return len(a) == len(b) and all("".join(code(x).split()) == "".join(code(y).split()) for x, y in zip(a, b))


class _Layers(cst.CSTTransformer):
    """nn.Linear -> the engine layer of its role, in place (same lines)."""

    def __init__(self, kinds: dict[str, str]):
        super().__init__()
        self.kinds, self.attr = kinds, None

    def visit_Assign(self, node):
        self.attr = self_attr(node.targets[0].target)

    def leave_Call(self, original, updated):
        if dotted(updated.func) in _LINEAR and self.attr in self.kinds:
            return updated.with_changes(func=cst.Name(self.kinds[self.attr]))
        return updated


class _FirstOutput(cst.CSTTransformer):
    """`self.lin(x)` -> `self.lin(x)[0]`: engine linears return (output, bias)."""

    def __init__(self, attrs):
        super().__init__()
        self.attrs = set(attrs)

    def leave_Call(self, original, updated):
        if self_call_attr(updated) in self.attrs:
            return cst.Subscript(updated, [cst.SubscriptElement(cst.Index(cst.Integer("0")))])
        return updated


def _fresh(base: str, used: set[str]) -> str:
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


class _KeyRopeArg(cst.CSTTransformer):
    """The second argument of each rope call -> `k_pe.unsqueeze(1)` (the file's own view of it was batch-shaped)."""

    def __init__(self, k_pe: str):
        super().__init__()
        self.k_pe = k_pe

    def leave_Assign(self, original, updated):
        call = updated.value
        args = list(call.args)
        args[1] = args[1].with_changes(value=cst.parse_expression(f"{self.k_pe}.unsqueeze(1)"))
        return updated.with_changes(value=call.with_changes(args=args))


class _QChains(cst.CSTTransformer):
    """In the q statement: each assignment keeps only its projection chain (no batch-shaped views), and
    engine linears' (output, bias) pairs give their output."""

    def __init__(self, m: MLA):
        super().__init__()
        self.m = m

    def leave_Assign(self, original, updated):
        return updated.with_changes(value=self.m._chain(original.value).visit(_FirstOutput(self.m.q_linears)))


def _forward_body(m: MLA) -> list[cst.BaseStatement]:
    nope, rope, v_dim, rank = (code(e) for e in (m.nope, m.rope, m.v_dim, m.rank))
    rq, rk = (code(e.value) for e in m.rope_calls_targets())
    iface = m.iface_stmt.value
    used = set(m.assigns) | {m.k_nope, m.v}
    names = [code(a.value) if isinstance(a.value, cst.Name) else fresh
             for a, fresh in zip(iface.args[1:4], ("query_states", "key_states", "value_states"))]
    if any(not isinstance(a.value, cst.Name) and n in used for a, n in zip(iface.args[1:4], names)):
        raise Unsupported(m.iface_stmt, "the attention-interface call's q/k/v expressions need names the forward uses")
    q_arg, k_arg, v_arg = names
    iface = iface.with_changes(args=[iface.args[0], *(a.with_changes(value=cst.Name(n)) for a, n in zip(
        iface.args[1:4], names)), *iface.args[4:]])
    qk, kv, head = _fresh("qk_head_size", used), _fresh("kv", used), _fresh("head_size", used)
    src = f"""
{qk} = {nope} + {rope}
{m.q_nope}, {m.q_pe} = torch.split({m.q_name}.unflatten(-1, (-1, {qk})), [{nope}, {rope}], dim=-1)
{m.latent}, {m.k_pe} = torch.split(self.{m.kv_a}({m.hidden})[0], [{rank}, {rope}], dim=-1)
{kv} = self.{m.kv_b}(self.{m.kv_norm}({m.latent}))[0].unflatten(-1, (-1, {nope} + {v_dim}))
{m.k_nope}, {m.v} = torch.split({kv}, [{nope}, {v_dim}], dim=-1)
{q_arg} = torch.cat(({m.q_nope}, {rq}), dim=-1)
{k_arg} = torch.cat(({m.k_nope}, {rk}.expand(-1, {m.k_nope}.shape[1], -1)), dim=-1)
# the engine's Attention has one head size for q, k and v: all are zero-padded to the larger of the q/k and
# v head sizes. Zero columns of q and k add nothing to the scores; those of v give zero output columns,
# sliced off after it.
{head} = max({qk}, {v_dim})
if {head} > {qk}:
    {q_arg} = torch.nn.functional.pad({q_arg}, (0, {head} - {qk}))
    {k_arg} = torch.nn.functional.pad({k_arg}, (0, {head} - {qk}))
{v_arg} = torch.nn.functional.pad({m.v}, (0, {head} - {v_dim}))
"""
    tail = f"""
{m.out} = {m.out}.unflatten(-1, (-1, {head}))[..., : {v_dim}].flatten(-2)
{m.out} = self.{m.o}({m.out})[0]
return {m.out}, {m.weights}
"""
    q_stmt = m.q_stmt.visit(_QChains(m))
    parsed = list(cst.parse_module(src).body)
    first, rest = parsed[:3], parsed[3:]
    # the rope statement as written (it may choose between rope functions), the key's rope part viewed as
    # one head shared by all: [T, 1, rope]
    rope_stmt = m.rope_stmt.with_changes(leading_lines=[])
    prelude = [p.with_changes(leading_lines=[]) for p in m.rope_prelude]
    body = [q_stmt.with_changes(leading_lines=[]), *first, *prelude, rope_stmt, *rest]
    body += [*m.iface_lookup, cst.SimpleStatementLine([m.iface_stmt.with_changes(value=iface)])]
    return body + list(cst.parse_module(tail).body)


def _rewrite_class(m: MLA) -> cst.ClassDef:
    kinds = {a: "ColumnParallelLinear" for a in (*m.q_column, m.kv_b)}
    kinds |= {a: "ReplicatedLinear" for a in (m.kv_a, *[a for a in m.q_linears if a not in m.q_column])}
    kinds[m.o] = "RowParallelLinear"
    init = m.init.visit(_Layers(kinds))
    body = _forward_body(m)
    fwd = m.fwd.with_changes(body=m.fwd.body.with_changes(body=body))
    # helper methods only the old forward called (e.g. a latent expansion) go with it
    helpers = {self_call_attr(c) for c in m._calls_of_any(m.fwd)} & set(methods(m.cls))
    others = [s for s in m.cls.body.body if isinstance(s, cst.FunctionDef) and s is not m.fwd]
    dropped = {h for h in helpers if not any(contains(s, lambda n, h=h: self_call_attr(n) == h) for s in others)}

    def build(fwd):
        kept = [init if s is m.init else fwd if s is m.fwd else s for s in m.cls.body.body
                if not (isinstance(s, cst.FunctionDef) and s.name.value in dropped)]
        return m.cls.with_changes(body=m.cls.body.with_changes(body=kept))

    cls = build(fwd)
    # pad to the original line count so the lines later passes report stay those of the source;
    # drop_line_padding removes the padding once the converter has indexed the lines
    lost = code(m.cls).count("\n") - code(cls).count("\n")
    if lost > 0:
        body[-1] = body[-1].with_changes(leading_lines=[*body[-1].leading_lines, *[_PAD] * lost])
        cls = build(fwd.with_changes(body=fwd.body.with_changes(body=body)))
    return cls


_PAD = cst.EmptyLine(indent=False, comment=cst.Comment("# porter: line padding"))


def _is_pad(line: cst.EmptyLine) -> bool:
    return line.comment is not None and line.comment.value == _PAD.comment.value


class _DropPadding(cst.CSTTransformer):
    def on_leave(self, original, updated):
        lines = getattr(updated, "leading_lines", None)
        if lines and any(_is_pad(x) for x in lines):
            updated = updated.with_changes(leading_lines=[x for x in lines if not _is_pad(x)])
        return super().on_leave(original, updated)


def drop_line_padding(module: cst.Module) -> cst.Module:
    """Remove the blank padding normalise_mla kept the line numbers with (after lines are indexed). Only
    the padded classes are rebuilt: every other node keeps its identity, and so its indexed line."""
    marker = _PAD.comment.value
    body = [s.visit(_DropPadding()) if isinstance(s, cst.ClassDef) and marker in code(s) else s for s in module.body]
    return module.with_changes(body=body)


class _FlattenLastPair(cst.CSTTransformer):
    """`torch.view_as_real(z).flatten(3)` -> `.flatten(-2)`: merge the (real, imag) pair into the last dim
    whatever the rank (the HF code assumed [batch, heads, seq, dim // 2, 2])."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def leave_Call(self, original, updated):
        f = updated.func
        if isinstance(f, cst.Attribute) and f.attr.value == "flatten" and isinstance(f.value, cst.Call) and \
                dotted(f.value.func) == "torch.view_as_real" and [code(a) for a in updated.args] == ["3"]:
            self.count += 1
            return updated.with_changes(args=[cst.Arg(cst.UnaryOperation(cst.Minus(), cst.Integer("2")))])
        return updated


def _looks_like_attention(cls: cst.ClassDef) -> bool:
    return contains(cls, lambda n: isinstance(n, cst.Name) and n.value == _INTERFACE)


def _linear_attrs(cls):
    init = methods(cls).get("__init__")
    if init is None:
        return []
    return [(self_attr(s.targets[0].target), s) for s in _statements(init)
            if isinstance(s, cst.Assign) and self_attr(s.targets[0].target) and _linear_calls(s.value)]


def is_mla(cls: cst.ClassDef) -> bool:
    """Cheap structural pre-check: an attention class with a two-way split whose first part is normed
    before a second projection."""
    if not _looks_like_attention(cls) or "forward" not in methods(cls):
        return False
    fwd = methods(cls)["forward"]
    linears = {a for a, _ in _linear_attrs(cls)}
    assigns = _assigns(fwd)
    for names, src, _ in _splits(fwd):
        if _origin(assigns, src) & linears and contains(fwd, lambda n, x=names[0]: isinstance(n, cst.Call) and bool(
                self_call_attr(n)) and self_call_attr(n) not in linears and len(n.args) == 1 and
                code(n.args[0].value) == x):
            return True
    return False


def normalise_mla(module: cst.Module, ctx: Context) -> cst.Module:
    """Rewrite every recognised MLA attention class; records its (local heads, kv heads, head size) in
    ctx.attn_heads, which also tells analyse that the class was converted."""
    rewritten: dict[str, cst.ClassDef] = {}
    rope_fns: set[str] = set()
    for name, cls in classes(module).items():
        if not is_mla(cls):
            continue
        try:
            m = MLA(cls)
            rewritten[name] = _rewrite_class(m)
        except Unsupported as e:
            ctx.report.refuse(f"multi-head latent attention `{name}`", ctx.lines.of(e.node, name) or ctx.lines.of(cls),
                              e.why)
            continue
        rope_fns |= {code(c.func) for c in m.rope_calls}
        heads = f"divide({m.heads}, get_tp_world_size())"
        ctx.attn_heads[name] = (heads, heads, f"max({code(m.nope)} + {code(m.rope)}, {code(m.v_dim)})")
        ctx.report.change("mla", ctx.lines.of(cls),
                          f"{name}: latent attention -> flat q/k/v per head (q {'+'.join(m.q_linears)}, latent "
                          f"{m.kv_a} -> {m.kv_norm} -> {m.kv_b}, output {m.o}); k/v cached per head, q/k/v "
                          "zero-padded to one head size")
    ctx.report.raise_if_refused()
    if not rewritten:
        return module
    body = []
    for s in module.body:
        if isinstance(s, cst.ClassDef) and s.name.value in rewritten:
            s = rewritten[s.name.value]
        elif isinstance(s, cst.FunctionDef) and s.name.value in rope_fns:
            v = _FlattenLastPair()
            line = ctx.lines.of(s)
            s = s.visit(v)
            if v.count:
                ctx.report.change("mla", line, f"{s.name.value}: view_as_real(..).flatten(3) -> "
                                                          "flatten(-2) (flat [tokens, heads, dim] inputs)")
        body.append(s)
    return module.with_changes(body=body)
