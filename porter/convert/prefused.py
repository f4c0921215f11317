"""Pre-fused projections: one `nn.Linear` whose output forward splits into parts, e.g. phi3's
`qkv = self.qkv_proj(h)` read as `qkv[..., :q_pos]`, `qkv[..., q_pos:q_pos + kv]`, `qkv[..., q_pos + kv:]`,
or `gate, up = self.gate_up_proj(h).chunk(2, dim=-1)`.

Sharding such a layer by plain rows would hand rank 0 all of q and none of v. Once every read of the
output is a split along the last dim whose parts tile the layer's output size exactly (compared as
size polynomials), the layer can become a fused parallel layer (QKV / merged column) whose rank
holds its slice of every part, and each split reads the rank's parts by
`output_partition_sizes`. Anything else (a negative offset, a part left unread, the output used
whole, a split along another dim) is not recognised and the caller keeps the layer replicated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import libcst as cst

from porter.convert.cst_util import arg_value, code, dotted, loads, self_call_attr, target_names
from porter.convert.symbolic import Size, size_of

_SPLITS = {"chunk", "split"}


@dataclass
class FusedSplit:
    attr: str  # the linear
    parts: list[Size]  # sizes of its parts, in output order
    var: str | None  # the local bound to its output (None when split where it is called)
    # split/chunk calls to rewrite, and offset slices -> the index of the part they read
    split_calls: list[cst.Call] = field(default_factory=list)
    slices: dict[int, tuple[cst.Subscript, int]] = field(default_factory=dict)
    assign: cst.BaseStatement | None = None  # the statement binding `var`


def _last_dim(call: cst.Call, positional_index: int) -> bool:
    dim = arg_value(call, positional_index, "dim")
    return dim is not None and "".join(code(dim).split()) == "-1"


def _ratio(total: Size, part: Size) -> Fraction | None:
    """k with total == k * part, else None."""
    if part.is_zero() or not total.terms:
        return None
    mono, coef = next(iter(part.terms.items()))
    if mono not in total.terms:
        return None
    k = total.terms[mono] / coef
    return k if part.scaled(k) == total else None


def _split_parts(call: cst.Call, base_first: bool, total: Size, resolve, unpacked: int | None) -> list[Size] | None:
    """The part sizes of `x.chunk(N, dim=-1)`, `x.split(sizes, dim=-1)` (or torch.chunk/split(x, ...))."""
    method = call.func.attr.value if isinstance(call.func, cst.Attribute) else None
    i = 1 if base_first else 0  # torch.split(x, n, ...) has the tensor first
    if not _last_dim(call, i + 1):
        return None
    arg = arg_value(call, i, "chunks" if method == "chunk" else "split_size_or_sections")
    if arg is None:
        arg = arg_value(call, i, "split_size") if method == "split" else None
    if arg is None:
        return None
    if method == "chunk":
        if not isinstance(arg, cst.Integer):
            return None
        n = int(arg.value)
        return [total.scaled(Fraction(1, n))] * n
    if isinstance(arg, (cst.List, cst.Tuple)):
        sizes = [size_of(e.value, resolve) for e in arg.elements]
        if None in sizes or sum(sizes, Size()) != total:
            return None
        return sizes
    size = size_of(arg, resolve)
    k = _ratio(total, size) if size is not None else None
    if k is None or k.denominator != 1 or (unpacked is not None and unpacked != k):
        return None
    return [size] * int(k)


def _split_of(node, var: str | None, attr: str) -> tuple[cst.Call, bool] | None:
    """(call, tensor-is-first-argument) when `node` splits the output (`var`, or `self.attr(...)`)."""
    def is_output(e) -> bool:
        return (var is not None and isinstance(e, cst.Name) and e.value == var) or self_call_attr(e) == attr

    if not isinstance(node, cst.Call):
        return None
    if isinstance(node.func, cst.Attribute) and node.func.attr.value in _SPLITS and is_output(node.func.value):
        return node, False
    if dotted(node.func) in ("torch.split", "torch.chunk") and node.args and is_output(node.args[0].value):
        return node, True
    return None


def _offset_slice(node, var: str) -> tuple | None:
    """`var[..., lo:hi]` -> (lo node or None, hi node or None)."""
    if not (isinstance(node, cst.Subscript) and isinstance(node.value, cst.Name) and node.value.value == var):
        return None
    els = node.slice
    if len(els) != 2 or not isinstance(els[0].slice, cst.Index) or not isinstance(els[0].slice.value, cst.Ellipsis):
        return None
    s = els[1].slice
    if not isinstance(s, cst.Slice) or s.step is not None:
        return None
    return s.lower, s.upper


def _nodes(stmt: cst.CSTNode) -> list[cst.CSTNode]:
    out = []

    class V(cst.CSTVisitor):
        def on_visit(self, n):
            out.append(n)
            return True

    stmt.visit(V())
    return out


def _unpack_count(stmt: cst.CSTNode, call: cst.Call) -> int | None:
    if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign) \
            and stmt.body[0].value is call and len(stmt.body[0].targets) == 1:
        names = target_names(stmt.body[0].targets[0].target)
        return len(names) if names and isinstance(stmt.body[0].targets[0].target, (cst.Tuple, cst.List)) else None
    return None


def _resliced_part(fwd: cst.FunctionDef, scope, split: FusedSplit) -> cst.CSTNode | None:
    """A subscript or split of a name bound to a part itself (`gate, up = x.chunk(2, dim=-1)`, then
    `gate[..., :n]`): offsets into a whole part, which its rank slice does not have."""
    sites = {id(c) for c in split.split_calls} | set(split.slices)
    parts: set[str] = set()
    tuples: set[str] = set()  # `parts = x.chunk(2, dim=-1)`: parts[0] picks a part, it slices nothing
    for stmt in scope:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Assign) and id(small.value) in sites:
                    for t in small.targets:
                        names = target_names(t.target) or []
                        whole_tuple = isinstance(t.target, cst.Name) and id(small.value) not in split.slices
                        (tuples if whole_tuple else parts).update(names)
    def picks_part(n) -> bool:
        return isinstance(n, cst.Subscript) and isinstance(n.value, cst.Name) and n.value.value in tuples and \
            len(n.slice) == 1 and isinstance(n.slice[0].slice, cst.Index) and \
            isinstance(n.slice[0].slice.value, cst.Integer)

    for n in _nodes(fwd):
        if id(n) in sites or picks_part(n):
            continue
        if isinstance(n, cst.Subscript) and isinstance(n.value, cst.Name) and n.value.value in tuples:
            return n
        base = n.value if isinstance(n, cst.Subscript) else \
            n.func.value if isinstance(n, cst.Call) and isinstance(n.func, cst.Attribute) and \
            n.func.attr.value in _SPLITS else \
            n.args[0].value if isinstance(n, cst.Call) and dotted(n.func) in ("torch.split", "torch.chunk") and \
            n.args else None
        if isinstance(base, cst.Name) and base.value in parts or picks_part(base):
            return n
    return None


def find_fused_split(fwd: cst.FunctionDef, attr: str, total: Size, resolve) -> FusedSplit | str:
    """How forward splits the output of `self.attr` into parts, or why it is not understood."""
    stmts = list(fwd.body.body)
    at = [i for i, s in enumerate(stmts) if any(self_call_attr(n) == attr for n in _nodes(s))]
    if len(at) != 1:
        return f"self.{attr} is called in {len(at)} statements"
    first = stmts[at[0]]
    calls = [n for n in _nodes(first) if self_call_attr(n) == attr]
    if len(calls) != 1:
        return f"self.{attr} is called {len(calls)} times in one statement"
    out = FusedSplit(attr, [], None)
    var = None
    if isinstance(first, cst.SimpleStatementLine) and len(first.body) == 1 and isinstance(first.body[0], cst.Assign) \
            and first.body[0].value is calls[0] and len(first.body[0].targets) == 1 \
            and isinstance(first.body[0].targets[0].target, cst.Name):
        var = first.body[0].targets[0].target.value
        out.var, out.assign = var, first
        scope = stmts[at[0] + 1:]
    else:
        scope = [first]
    partitions: list[list[Size]] = []
    bounds: list[tuple[Size, Size]] = []
    for stmt in scope:
        nodes = _nodes(stmt)
        split_calls = [s for s in (_split_of(n, var, attr) for n in nodes) if s]
        slices = [(n, _offset_slice(n, var)) for n in nodes] if var else []
        slices = [(n, b) for n, b in slices if b is not None]
        reads = loads(stmt)[var] if var else 0
        direct = [n for n in nodes if self_call_attr(n) == attr]
        if reads + len(direct) != len(split_calls) + len(slices):
            return f"the output of self.{attr} is read other than by splits along its last dim " \
                   f"(`{code(stmt).strip()[:60]}`)"
        for call, base_first in split_calls:
            parts = _split_parts(call, base_first, total, resolve, _unpack_count(stmt, call))
            if parts is None:
                return f"`{code(call)[:60]}` does not split the last dim into sizes that tile {total.render()}"
            partitions.append(parts)
            out.split_calls.append(call)
        for node, (lo, hi) in slices:
            lo_s = Size() if lo is None else size_of(lo, resolve)
            hi_s = total if hi is None else size_of(hi, resolve)
            if lo_s is None or hi_s is None:
                return f"the offsets of `{code(node)[:60]}` are not size expressions"
            bounds.append((lo_s, hi_s))
            out.slices[id(node)] = (node, -1)
        if var is not None and stmt is not first and isinstance(stmt, cst.SimpleStatementLine):
            bound = [n for s in stmt.body if isinstance(s, cst.Assign) for t in s.targets
                     for n in (target_names(t.target) or [])]
            if var in bound:
                break
        elif var is not None and not isinstance(stmt, cst.SimpleStatementLine) and \
                any(isinstance(n, cst.AssignTarget) and var in (target_names(n.target) or [var]) for n in nodes):
            return f"{var} is rebound inside `{code(stmt).strip().splitlines()[0][:60]}`"
    if partitions and bounds:
        return f"the output of self.{attr} is read both by split calls and by offset slices"
    resliced = _resliced_part(fwd, scope, out)
    if resliced is not None:
        return f"a part of it is itself sliced by offsets (`{code(resliced)[:60]}`), which its shard would not match"
    if partitions:
        if any(p != partitions[0] for p in partitions):
            return f"the output of self.{attr} is split into different parts in different places"
        out.parts = partitions[0]
        return out
    if not bounds:
        return f"the output of self.{attr} is never split"
    # offset slices must tile [0, total): chain them from 0
    distinct = list(dict.fromkeys(bounds))
    starts = {lo: hi for lo, hi in distinct}
    if len(starts) != len(distinct):
        return f"two slices of the output of self.{attr} start at the same offset but end differently"
    pos, order = Size(), []
    while pos != total:
        if pos not in starts:
            return f"no slice of the output of self.{attr} starts at offset {pos.render()}"
        order.append(pos)
        pos = starts[pos]
        if len(order) > len(starts):
            return f"the slices of the output of self.{attr} do not tile it"
    if len(order) != len(starts):
        return f"the slices of the output of self.{attr} overlap"
    out.parts = [starts[lo] - lo for lo in order]
    index = {lo: i for i, lo in enumerate(order)}
    for (key, (node, _)), (lo, _) in zip(list(out.slices.items()), bounds):
        out.slices[key] = (node, index[lo])
    return out


def rewrite_splits(fwd: cst.FunctionDef, split: FusedSplit, part_names: list[str]) -> cst.FunctionDef:
    """Splits read the rank's parts: `x.chunk(2, dim=-1)` -> `x.split(self.P.output_partition_sizes,
    dim=-1)`; offset slices -> names bound once by that split right after `x = self.P(...)`."""
    sizes = f"self.{split.attr}.output_partition_sizes"
    calls = {id(c) for c in split.split_calls}

    class Rewrite(cst.CSTTransformer):
        def leave_Call(self, original, updated):
            if id(original) not in calls:
                return updated
            base = original.args[0].value if dotted(original.func) in ("torch.split", "torch.chunk") \
                else original.func.value
            return cst.parse_expression(f"{code(base)}.split({sizes}, dim=-1)")

        def leave_Subscript(self, original, updated):
            hit = split.slices.get(id(original))
            return cst.Name(part_names[hit[1]]) if hit else updated

    body = []
    for stmt in fwd.body.body:
        body.append(stmt.visit(Rewrite()))
        if split.slices and stmt is split.assign:
            body.append(cst.parse_statement(f"{', '.join(part_names)} = {split.var}.split({sizes}, dim=-1)\n"))
    return fwd.with_changes(body=fwd.body.with_changes(body=body))
