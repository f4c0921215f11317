"""A block's own `nn.Parameter`s that meet its column-parallel output must be split like that output.

Parallax's `q = self.q_proj(h) * self.head_scale.repeat_interleave(self.head_dim)` scales each query
head: with the heads split over ranks, rank r holds heads [r*H/N, (r+1)*H/N) and needs the same slice
of `head_scale`. The decision is read from the code, never from names:
- dataflow: forward is walked in statement order; a value is sharded when it is computed from a
  column-parallel linear's output (or another sharded value) outside the arguments of a row-parallel
  linear (whose all-reduced output is whole again). A parameter meets sharded data when the largest
  expression around its read that stays below any row-parallel call also reads sharded data.
- shape: the parameter is built by `nn.Parameter(torch.ones/zeros/empty/randn/rand/full/normal(shape))`; the dim
  whose size expression equals a sharded size of the block (query heads, heads x head size, an MLP
  column output) is the one to split.
A parameter that meets sharded data but whose shape is unknown, matches several sharded sizes, is read
outside forward, or follows the kv heads (replicated when there are fewer kv heads than ranks) is
refused with its reason; one with no sharded dim (a per-head-size scale) stays whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from porter.convert.cst_util import code, dotted, methods, self_attr, self_call_attr, target_names
from porter.convert.symbolic import Size, size_of

_PARAMETER = {"nn.Parameter", "torch.nn.Parameter", "Parameter"}
_FACTORIES = {"torch.ones", "torch.zeros", "torch.empty", "torch.randn", "torch.rand", "torch.full", "torch.normal"}
_METADATA = {"dtype", "device"}


@dataclass
class SplitSize:
    what: str  # e.g. "query heads"
    refuse: str | None = None  # why a parameter of this size cannot be split, when it cannot


@dataclass
class Decision:
    shard_dim: dict[str, tuple[int, cst.CSTNode]]  # parameter -> (dim split over ranks, its statement)
    refusals: list[tuple[cst.CSTNode, str, str]]  # (node, construct, why)
    kept: list[tuple[cst.CSTNode, str]]  # (node, note) parameters that meet sharded data but stay whole


def parameters(init: cst.FunctionDef) -> dict[str, tuple[cst.BaseStatement, cst.Call]]:
    """attr -> (statement, nn.Parameter call) for the top-level `self.attr = nn.Parameter(...)` of __init__."""
    out = {}
    for stmt in init.body.body:
        if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign):
            small = stmt.body[0]
            attr = self_attr(small.targets[0].target) if len(small.targets) == 1 else None
            if attr and isinstance(small.value, cst.Call) and dotted(small.value.func) in _PARAMETER:
                out[attr] = (stmt, small.value)
    return out


def _shape(param_call: cst.Call) -> list[cst.BaseExpression] | None:
    """Shape expressions of `nn.Parameter(torch.ones(a, b))`, `(torch.full((a,), v))`, `(torch.ones(a) * c)`."""
    if not param_call.args:
        return None
    value = param_call.args[0].value
    while isinstance(value, cst.BinaryOperation):  # tensor * scalar keeps the tensor's shape
        value = value.left if isinstance(value.left, cst.Call) else value.right
    if not (isinstance(value, cst.Call) and dotted(value.func) in _FACTORIES):
        return None
    size = next((a.value for a in value.args if a.keyword is not None and a.keyword.value == "size"), None)
    if size is not None:  # torch.normal(mean, std, size=(...)), torch.ones(size=(...))
        return [e.value for e in size.elements] if isinstance(size, (cst.Tuple, cst.List)) else [size]
    if dotted(value.func) == "torch.normal":
        return None
    positional = [a.value for a in value.args if a.keyword is None and not a.star]
    if dotted(value.func) == "torch.full":
        positional = positional[:1]
    if len(positional) == 1 and isinstance(positional[0], (cst.Tuple, cst.List)):
        return [e.value for e in positional[0].elements]
    if any(isinstance(p, (cst.Tuple, cst.List)) for p in positional):
        return None
    return positional or None


class _Taint:
    """Which expressions read sharded data, given the names currently holding sharded values."""

    def __init__(self, column: set[str], row: set[str]):
        self.column, self.row, self.names = column, row, set()

    def reads_sharded(self, node: cst.CSTNode) -> bool:
        found = []
        outer = self

        class V(cst.CSTVisitor):
            def on_visit(self, n):
                if found:
                    return False
                a = self_call_attr(n)
                if a in outer.row:
                    return False  # the row layer's output is whole again
                if a in outer.column or (isinstance(n, cst.Name) and n.value in outer.names):
                    found.append(n)
                    return False
                if isinstance(n, cst.Attribute):
                    if n.attr.value not in _METADATA:  # x.dtype / x.device carry no sharded data
                        n.value.visit(self)
                    return False
                if isinstance(n, cst.Arg) and n.keyword is not None:
                    n.value.visit(self)
                    return False
                return True

        node.visit(V())
        return bool(found)


def _parents(stmt: cst.CSTNode) -> dict[int, cst.CSTNode]:
    out: dict[int, cst.CSTNode] = {}
    stack: list[cst.CSTNode] = []

    class V(cst.CSTVisitor):
        def on_visit(self, n):
            if stack:
                out[id(n)] = stack[-1]
            stack.append(n)
            return True

        def on_leave(self, n):
            stack.pop()

    stmt.visit(V())
    return out


def _param_reads(node: cst.CSTNode, params) -> list[cst.Attribute]:
    out = []

    class V(cst.CSTVisitor):
        def visit_Attribute(self, n):
            if self_attr(n) in params:
                out.append(n)

    node.visit(V())
    return out


def _context(read: cst.CSTNode, parents, row: set[str]) -> cst.CSTNode:
    """The largest expression around `read` inside its statement that is not a row-linear call."""
    cur = read
    while True:
        parent = parents.get(id(cur))
        if parent is None or isinstance(parent, (cst.BaseSmallStatement, cst.AssignTarget)) or \
                self_call_attr(parent) in row:
            return cur
        cur = parent


def decide(cls: cst.ClassDef, sizes: dict[Size, SplitSize], column: set[str], row: set[str],
           resolve_init, resolve_fwd) -> Decision:
    ms = methods(cls)
    params = parameters(ms["__init__"])
    decision = Decision({}, [], [])
    if not params:
        return decision
    fwd = ms["forward"]
    taint = _Taint(column, row)
    meets: dict[str, bool] = {}
    checked: set[int] = set()

    def walk(stmts):
        for stmt in stmts:
            if not isinstance(stmt, cst.SimpleStatementLine):
                for part in ("body", "orelse", "handlers", "finalbody"):
                    inner = getattr(stmt, part, None)
                    for block in inner if isinstance(inner, (list, tuple)) else [inner]:
                        if isinstance(block, cst.BaseCompoundStatement):  # elif
                            walk([block])
                        elif isinstance(block, cst.IndentedBlock):
                            walk(block.body)
                        elif block is not None and isinstance(getattr(block, "body", None), cst.IndentedBlock):
                            walk(block.body.body)  # else / except / finally
                continue
            parents = _parents(stmt)
            for read in _param_reads(stmt, params):
                checked.add(id(read))
                p = self_attr(read)
                meets[p] = meets.get(p, False) or taint.reads_sharded(_context(read, parents, row))
            for small in stmt.body:
                if isinstance(small, (cst.Assign, cst.AnnAssign, cst.AugAssign)) and small.value is not None:
                    sharded = taint.reads_sharded(small.value)
                    targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
                    for t in targets:
                        for n in target_names(t) or []:
                            if sharded:
                                taint.names.add(n)
                            elif not isinstance(small, cst.AugAssign):
                                taint.names.discard(n)

    taint.names = set()
    walk(fwd.body.body)
    unchecked = {self_attr(r) for r in _param_reads(fwd, params) if id(r) not in checked}
    elsewhere = {self_attr(r): name for name, m in ms.items() if name not in ("__init__", "forward")
                 for r in _param_reads(m, params)}
    for p, (stmt, call) in params.items():
        construct = f"parameter `{cls.name.value}.{p}`"
        shape = _shape(call)
        matching = []
        for dim, expr in enumerate(shape or []):
            s = size_of(expr, resolve_init)
            if s is not None and s in sizes:
                matching.append((dim, expr, sizes[s]))
        if shape is None and (meets.get(p) or p in unchecked or p in elsewhere):
            decision.refusals.append((stmt, construct, "it meets the block's tensor-parallel (sharded) data but "
                                      "its shape is not a torch.ones/zeros/empty/randn/rand/full/normal(...) call, so "
                                      "which dim follows the split heads cannot be told"))
            continue
        if not matching:
            if meets.get(p):
                decision.kept.append((stmt, f"{p}: parameter of shape ({', '.join(code(e) for e in shape)}) "
                                            "meets sharded data along no split dim: kept whole on every rank"))
            continue
        if p in elsewhere or p in unchecked:
            where = f"method `{elsewhere[p]}`" if p in elsewhere else "a compound statement's header"
            decision.refusals.append((stmt, construct, f"its size follows the sharded {matching[0][2].what} but it is "
                                      f"read in {where}, where porter cannot tell whether it meets sharded data"))
            continue
        if not meets.get(p):
            continue  # it only meets whole (replicated) data: every rank keeps all of it
        if len(matching) > 1:
            decision.refusals.append((stmt, construct, "more than one of its dims ("
                                      + ", ".join(code(e) for _, e, _ in matching) + ") has a sharded size; "
                                      "which one follows the heads cannot be told"))
            continue
        dim, expr, split = matching[0]
        if split.refuse:
            decision.refusals.append((stmt, construct, split.refuse))
            continue
        decision.shard_dim[p] = (dim, stmt)
    return decision


def rewrite_init(init: cst.FunctionDef, shard_dim: dict[str, tuple[int, cst.CSTNode]]) -> cst.FunctionDef:
    """`self.p = nn.Parameter(...)` -> `self.p = shard_parameter(nn.Parameter(...), dim=d, name="p")`."""
    params = parameters(init)
    body = []
    for stmt in init.body.body:
        p = next((a for a, (s, _) in params.items() if s is stmt and a in shard_dim), None)
        if p is not None:
            small = stmt.body[0]
            wrapped = cst.parse_expression(f'shard_parameter(_P_, dim={shard_dim[p][0]}, name="{p}")')
            wrapped = wrapped.with_changes(args=[wrapped.args[0].with_changes(value=small.value), *wrapped.args[1:]])
            stmt = stmt.with_changes(body=[small.with_changes(value=wrapped)])
        body.append(stmt)
    return init.with_changes(body=init.body.with_changes(body=body))
