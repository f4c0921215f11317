"""Pass 5: parallel layers. `nn.Linear`s of attention and MLP blocks become column/row parallel layers
by dataflow (a linear that reads the block's input is column-parallel, one that reads anything else is
row-parallel); q/k/v and gate/up projections that read the same input fuse into `QKVParallelLinear` /
`MergedColumnParallelLinear`. A projection fused in the HF file (one linear whose output forward splits
into parts, `qkv[..., :q_size]` or `x.chunk(2, dim=-1)`) becomes the fused parallel layer when the parts
are understood (prefused.py), else its block stays `ReplicatedLinear` (correct on any TP size, no memory
saving). MLP blocks nested in the decoder's conditionals or inside another block (a MoE block's shared
expert) are converted too; a MoE block's own linears (gates) stay replicated. Parameters that scale a
sharded output per head are split with it (sharded_params.py). Vocab embeddings become
`VocabParallelEmbedding`.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
import libcst.matchers as matchers

from porter.convert.context import Fusion, Pass
from porter.convert.dense_blocks import constructs, is_linear, nested_dense_blocks
from porter.convert.prefused import FusedSplit, find_fused_split, rewrite_splits
from porter.convert.sharded_params import SplitSize, decide, rewrite_init
from porter.convert.symbolic import Size, class_resolvers, size_of
from porter.convert.cst_util import (
    arg_value,
    calls_of,
    code,
    contains,
    dotted,
    init_assignments,
    loads,
    methods,
    param_names,
    parse_stmt,
    same_code,
    self_attr,
    self_call_attr,
    target_names,
)

_SLICING_METHODS = {"chunk", "split", "unbind", "tensor_split"}


def _assigns(fn: cst.CSTNode) -> list[cst.Assign]:
    return list(matchers.findall(fn, matchers.Assign()))


def _linear_parts(call: cst.Call) -> tuple[cst.BaseExpression, cst.BaseExpression, str]:
    bias = arg_value(call, 2, "bias")
    return arg_value(call, 0, "in_features"), arg_value(call, 1, "out_features"), code(bias) if bias else "True"


def _fused_name(members: list[str]) -> str:
    stems = [m[: -len("_proj")] if m.endswith("_proj") else m for m in members]
    return ("".join(stems) if all(len(s) == 1 for s in stems) else "_".join(stems)) + "_proj"


def _local(name: str) -> str:
    return name[: -len("_proj")] if name.endswith("_proj") else name


_HEAD_SIZES = ("self.head_dim", "self.head_size")


def _per_head_view(value: cst.BaseExpression, tuples: dict[str, cst.Tuple]) -> bool:
    """`x.view(shape)` / `x.reshape(shape)` whose last dim is the head size (`(*lead, -1, self.head_dim)`):
    its last dim lies inside one head, so slicing it (partial rotary) is the same on every rank."""
    if not (isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and
            value.func.attr.value in ("view", "reshape") and value.args):
        return False
    last = value.args[-1].value
    if len(value.args) == 1 and isinstance(last, cst.Name) and last.value in tuples:
        last = tuples[last.value]
    if isinstance(last, cst.Tuple) and last.elements:
        last = last.elements[-1].value
    return code(last) in _HEAD_SIZES


def _within_head(n: cst.CSTNode) -> bool:
    """`x[..., a:b]`, or a chunk/split along dim -1."""
    if isinstance(n, cst.Subscript):
        els = n.slice
        return len(els) == 2 and isinstance(els[0].slice, cst.Index) and \
            isinstance(els[0].slice.value, cst.Ellipsis) and isinstance(els[1].slice, cst.Slice)
    torch_form = (dotted(n.func) or "").startswith("torch.")
    dim = arg_value(n, 2 if torch_form else 1, "dim")
    return dim is not None and "".join(code(dim).split()) == "-1"


def _sliced_outputs(fwd: cst.FunctionDef, attrs: set[str]) -> cst.CSTNode | None:
    """The first offset slicing (subscript, chunk, split) of a value computed from one of `attrs`; a
    value viewed per head may be sliced along its last dim, which lies inside a head (partial rotary)."""
    produced: set[str] = set()
    per_head: set[str] = set()
    tuples = {n.targets[0].target.value: n.value for n in _assigns(fwd)
              if isinstance(n.targets[0].target, cst.Name) and isinstance(n.value, cst.Tuple)}

    class Assigns(cst.CSTVisitor):
        def visit_Assign(self, n: cst.Assign):
            if contains(n.value, lambda c: self_call_attr(c) in attrs):
                into = per_head if _per_head_view(n.value, tuples) else produced
                for t in n.targets:
                    if isinstance(t.target, cst.Name):
                        into.add(t.target.value)

    fwd.visit(Assigns())
    per_head -= produced
    found: list[cst.CSTNode] = []

    def sliced(base, n) -> bool:
        if code(base) in produced or self_call_attr(base) in attrs:
            return True
        return code(base) in per_head and not _within_head(n)

    def slicing(n) -> bool:
        if isinstance(n, cst.Subscript):
            return sliced(n.value, n)
        if isinstance(n, cst.Call) and (dotted(n.func) or "").removeprefix("torch.") in _SLICING_METHODS and \
                (dotted(n.func) or "").startswith("torch.") and n.args:  # torch.split(x, ...)
            return sliced(n.args[0].value, n)
        if isinstance(n, cst.Call) and isinstance(n.func, cst.Attribute) and n.func.attr.value in _SLICING_METHODS:
            base = n.func.value
            while isinstance(base, cst.Call) and isinstance(base.func, cst.Attribute):
                if sliced(base, n):
                    return True
                base = base.func.value
            return sliced(base, n)
        return False

    class Find(cst.CSTVisitor):
        def on_visit(self, n):
            if not found and slicing(n):
                found.append(n)
            return not found

    fwd.visit(Find())
    return found[0] if found else None


def _reads_block_input(fwd: cst.FunctionDef, attrs: set[str]) -> dict[str, bool]:
    """attr -> True when every call of that linear reads the forward's first input unchanged (a name
    is the input until a statement rebinds it), in statement order."""
    params = param_names(fwd)[1:2]
    current = set(params)
    out: dict[str, bool] = {}

    def visit(stmts):
        for stmt in stmts:
            for call in [c for a in attrs for c in calls_of(stmt, a)]:
                a = self_call_attr(call)
                ok = len(call.args) == 1 and isinstance(call.args[0].value, cst.Name) and \
                    call.args[0].value.value in current
                out[a] = out.get(a, True) and ok
            if isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    if isinstance(small, (cst.Assign, cst.AnnAssign, cst.AugAssign)):
                        targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) \
                            else [small.target]
                        aliases = isinstance(getattr(small, "value", None), cst.Name) and small.value.value in current
                        for t in targets:
                            for n in target_names(t) or []:
                                (current.add if aliases else current.discard)(n)

    visit(fwd.body.body)
    return out


def _per_head_split(fwd: cst.FunctionDef, attr: str) -> int | None:
    """N when the fused projection's output is only used as `x = self.attr(h).view(shape)` with
    `shape = (..., -1, N * head)` and `x.chunk(N, dim=-1)`: q/k/v interleaved per head (GPT-NeoX), so
    sharding the output rows by heads keeps whole heads together. None otherwise."""
    shapes: dict[str, cst.Tuple] = {}
    view_var, n = None, None
    for stmt in fwd.body.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for small in stmt.body:
            if not (isinstance(small, cst.Assign) and isinstance(small.targets[0].target, cst.Name)):
                continue
            name, value = small.targets[0].target.value, small.value
            if isinstance(value, cst.Tuple):
                shapes[name] = value
            if isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and \
                    value.func.attr.value in ("view", "reshape") and self_call_attr(value.func.value) == attr \
                    and len(value.args) == 1 and code(value.args[0].value) in shapes:
                els = [e.value for e in shapes[code(value.args[0].value)].elements]
                last = els[-1] if els else None
                if len(els) >= 2 and code(els[-2]) == "-1" and isinstance(last, cst.BinaryOperation) and \
                        isinstance(last.operator, cst.Multiply) and isinstance(last.left, cst.Integer):
                    view_var, n = name, int(last.left.value)
    if view_var is None:
        return None
    chunks = []

    class V(cst.CSTVisitor):
        def visit_Call(self, c):
            if isinstance(c.func, cst.Attribute) and code(c.func.value) == view_var and c.func.attr.value == "chunk":
                chunks.append([code(a) .replace(" ", "") for a in c.args])

    fwd.visit(V())
    ok = chunks and all(a in ([str(n) + ",", "dim=-1"], [str(n) + ",", "dim=-1,"]) for a in chunks)
    return n if ok and loads(fwd.body)[view_var] == len(chunks) else None


def _heads_times(out: cst.BaseExpression, head: str, head_value: cst.BaseExpression) -> tuple[str | None, str | None]:
    """For `count * head` (either order, head as `self.head_dim` or its value): (count, None); for another
    product: (None, the factor that is not a head count: the size it has per head); otherwise (None, None)."""
    if not (isinstance(out, cst.BinaryOperation) and isinstance(out.operator, cst.Multiply)):
        return None, None
    for count, per_head in ((out.left, out.right), (out.right, out.left)):
        if code(per_head) == head or same_code(per_head, head_value):
            return code(count), None
    return None, code(out.right)


def _split_heads(out: cst.BaseExpression) -> tuple[str, str] | None:
    """`heads * head_size` -> (heads, head_size) code."""
    if isinstance(out, cst.BinaryOperation) and isinstance(out.operator, cst.Multiply):
        return code(out.left), code(out.right)
    return None


@dataclass
class _Prefused:
    """The fused parallel layer built for a projection fused in the HF file."""

    split: FusedSplit
    src: str  # the layer's constructor statement
    kind: str  # for the report
    heads: tuple[Size, Size, Size, Size] | None = None  # attention: q heads, kv heads, head size, total


def _attention_sizes(hq: Size, hkv: Size, head: Size, total: Size | None) -> dict[Size, SplitSize]:
    """Sizes an attention block splits over ranks (per-head parameters may follow them)."""
    out = {hq: SplitSize("query heads"), hq * head: SplitSize("query heads x head size")}
    if hkv != hq:
        why = ("its size follows the kv heads, which are replicated rather than split when there are fewer "
               "kv heads than ranks; splitting such a parameter is not supported")
        out.setdefault(hkv, SplitSize("kv heads", why))
        out.setdefault(hkv * head, SplitSize("kv heads x head size", why))
    if total is not None:
        out.setdefault(total, SplitSize("fused q/k/v output", "its size is the whole fused q/k/v output, "
                                        "whose rank slice is made of parts of q, k and v"))
    return out


def tp_plan(filename: str) -> dict[str, str]:
    """`base_model_tp_plan` of the configuration class next to the modeling file, read as source."""
    folder = Path(filename).parent
    plan: dict[str, str] = {}
    for config_file in sorted(folder.glob("configuration_*.py")) if folder.is_dir() else []:
        try:
            tree = ast.parse(config_file.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "base_model_tp_plan"
                                                    for t in node.targets) and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                        plan[str(k.value)] = str(v.value)
    return plan


class ParallelLinears(Pass):
    name = "parallel"
    scope = "classes"

    def visit_Module(self, node: cst.Module) -> None:
        # the config's tensor-parallel plan, keyed by (block class, linear): a cross-check of the dataflow
        from porter.convert.specialise import callee_map

        self.plan: dict[tuple[str, str], str] = {}
        self.dense = nested_dense_blocks(node, self.ctx.roles)
        plan = tp_plan(self.ctx.filename)
        decoder_children = callee_map(node).get(self.ctx.roles.decoder or "", {})
        for key, style in plan.items():
            parts = key.split(".")
            if len(parts) == 4 and parts[:2] == ["layers", "*"] and parts[2] in decoder_children:
                self.plan[(decoder_children[parts[2]], parts[3])] = style

    def _check_plan(self, cls_node, name: str, linears, column, sharded: bool) -> None:
        for attr in linears:
            style = self.plan.get((name, attr))
            if style is None:
                continue
            ours = "replicated" if not sharded else ("colwise" if attr in column else "rowwise")
            if sharded and style in ("colwise", "rowwise") and style != ours:
                self.refuse(cls_node, f"linear `{name}.{attr}`", f"dataflow makes it {ours} but the config's "
                            f"base_model_tp_plan says {style}")
            elif not sharded and style in ("colwise", "rowwise"):
                self.note(cls_node, f"{name}.{attr}: base_model_tp_plan says {style}; kept replicated (see above)")

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = updated.name.value
        roles = self.ctx.roles
        if name in roles.embedding_subclasses:
            updated = self._embedding_subclass(original, updated)
        if name in roles.attention or name in roles.mlp or name in self.dense:
            updated = self._block(original, updated, attention=name in roles.attention)
        return updated

    # ------------------------------------------------------------------ embeddings
    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        value = updated.value
        if isinstance(value, cst.Call) and (dotted(value.func) or "") in ("nn.Embedding", "torch.nn.Embedding") \
                and self_attr(updated.targets[0].target) and "vocab_size" in code(value.args[0].value):
            args = [a for a in value.args[:2]]
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
            self.note(original, f"{code(updated.targets[0].target)}: nn.Embedding -> VocabParallelEmbedding "
                                "(vocab split over ranks; padding_idx has no effect at inference)")
            return updated.with_changes(value=value.with_changes(func=cst.Name("VocabParallelEmbedding"), args=args))
        return updated

    def _embedding_subclass(self, original, cls: cst.ClassDef) -> cst.ClassDef:
        bases = [b.with_changes(value=cst.Name("VocabParallelEmbedding"))
                 if (dotted(b.value) or "").endswith("Embedding") else b for b in cls.bases]
        init = methods(cls).get("__init__")

        class SuperInit(cst.CSTTransformer):
            def leave_Call(self, o, u):
                if code(u.func) == "super().__init__" and len(u.args) > 2:
                    args = list(u.args[:2])
                    args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
                    return u.with_changes(args=args)
                return u

        body = [s.visit(SuperInit()) if s is init else s for s in cls.body.body]
        self.note(original, f"{cls.name.value}: subclass of nn.Embedding -> of VocabParallelEmbedding")
        return cls.with_changes(bases=bases, body=cls.body.with_changes(body=body))

    # ------------------------------------------------------------------ linear blocks
    def _block(self, original: cst.ClassDef, cls: cst.ClassDef, attention: bool) -> cst.ClassDef:
        name = cls.name.value
        ms = methods(cls)
        fwd = ms["forward"]
        linears = {a: v for a, v in init_assignments(cls) if is_linear(v)}
        if not linears:
            self.ctx.sharded[name] = False
            return cls
        calls = {a: calls_of(fwd, a) for a in linears}
        reads_input = _reads_block_input(fwd, set(linears))
        column = [a for a in linears if calls[a] and reads_input.get(a)]
        row = [a for a in linears if a not in column]
        unused = [a for a in linears if not calls[a]]
        if unused:
            self.refuse(original, f"linear `{name}.{unused[0]}`", "it is never called in forward")
            return cls
        fusions: list[Fusion] = []
        prefused = None
        why_replicated = None
        resolve_init, resolve_fwd = class_resolvers(cls)
        sliced = _sliced_outputs(fwd, set(column))
        per_head = attention and len(column) == 1 and sliced is not None and \
            "num_key_value_heads" not in code(cls) and _per_head_split(fwd, column[0]) is not None
        if per_head:
            self.note(original, f"{column[0]}: q/k/v interleaved per head (view(..., -1, N * head).chunk(N)): "
                                "column-parallel by heads")
            sliced = None
        if constructs(cls, {"FusedMoE"}):
            why_replicated = "a mixture-of-experts block: its own linears are gates over the whole hidden " \
                             "state; the experts shard inside FusedMoE"
        elif sliced is not None:
            found = self._prefused(cls, linears, column[0], attention, resolve_init, resolve_fwd) \
                if len(column) == 1 and row else "not one input projection feeding the rest of the block"
            if isinstance(found, str):
                why_replicated = (f"the output of {', '.join(column)} is sliced by offsets (`{code(sliced)[:50]}`, "
                                  f"line {self.line(sliced) or '?'}), which column sharding would break: {found}")
            else:
                prefused = found
        elif not column or not row:
            why_replicated = "no column -> row dataflow through the block"
        elif attention and per_head:
            pass
        elif attention:
            qkv = self._qkv(linears, column)
            if qkv is None:
                why_replicated = "its q/k/v projections could not be matched to heads x head_size"
            else:
                fusions.append(qkv)
        elif len(column) >= 2:
            biases = {_linear_parts(linears[a])[2] for a in column}
            ins = [_linear_parts(linears[a])[0] for a in column]
            if len(biases) == 1 and all(same_code(ins[0], i) for i in ins):
                fusions.append(Fusion(_fused_name(column), list(column), list(range(len(column)))))
            else:
                why_replicated = "its input projections differ in input size or bias"
        sharded = why_replicated is None
        self.ctx.sharded[name] = sharded
        self.ctx.fusions[name] = fusions
        if not sharded and name in self.dense:  # nested, not an MLP that shards: its HF linears run whole
            self.note(original, f"{name}: linears {', '.join(linears)} kept as HF code, whole on every rank "
                                f"({why_replicated})")
            return cls
        if not sharded:
            self.note(original, f"{name}: linears {', '.join(linears)} -> ReplicatedLinear ({why_replicated})")
        self._check_plan(original, name, linears, column, sharded)
        if attention and prefused:
            p = prefused.split.attr
            self.ctx.attn_heads[name] = (f"self.{p}.num_heads", f"self.{p}.num_kv_heads", f"self.{p}.head_size")
        elif attention:
            self._record_heads(name, cls, linears, column, fusions, local=per_head)
        new_init = self._rewrite_init(ms["__init__"], linears, column, fusions, sharded, prefused)
        if sharded:
            sizes = self._split_sizes(cls, linears, column, fusions, prefused, per_head, attention, resolve_init)
            decision = decide(cls, sizes, set(column), set(row), resolve_init, resolve_fwd)
            for node, construct, why in decision.refusals:
                self.refuse(node, construct, why)
            for node, message in decision.kept:
                self.note(node, message)
            for p, (dim, stmt) in decision.shard_dim.items():
                self.note(stmt, f"{name}.{p}: parameter split over ranks along dim {dim} (it meets the sharded "
                                f"output of {', '.join(column)}; each rank loads its slice)")
            if decision.shard_dim:
                new_init = rewrite_init(new_init, decision.shard_dim)
        new_fwd = fwd
        if prefused:
            new_fwd = rewrite_splits(fwd, prefused.split, self._part_names(fwd, prefused.split, attention))
        new_fwd = self._rewrite_forward(new_fwd, linears, fusions)
        body = [new_init if s is ms["__init__"] else new_fwd if s is fwd else s for s in cls.body.body]
        return cls.with_changes(body=cls.body.with_changes(body=body))

    def _prefused(self, cls, linears, attr, attention, resolve_init, resolve_fwd) -> _Prefused | str:
        """The fused parallel layer for a linear whose output forward splits into parts, or why not."""
        in_f, out_f, bias = _linear_parts(linears[attr])
        total = size_of(out_f, resolve_init)
        if total is None:
            return f"its output size `{code(out_f)}` is not a size expression"
        split = find_fused_split(methods(cls)["forward"], attr, total, resolve_fwd)
        if isinstance(split, str):
            return split
        parts = [p.render() for p in split.parts]
        if None in parts:
            return f"its parts {[str(p) for p in split.parts]} are not whole size expressions"
        if not attention:
            src = f"self.{attr} = MergedColumnParallelLinear(\n    {code(in_f)},\n    [{', '.join(parts)}],\n" \
                  f"    bias={bias},\n)\n"
            return _Prefused(split, src, f"MergedColumnParallelLinear (parts {', '.join(parts)})")
        assigned = {a for a, _ in init_assignments(cls)}
        head_attr = next((f"self.{h}" for h in ("head_dim", "head_size") if h in assigned), None)
        if head_attr is None:
            return "no self.head_dim / self.head_size to split its parts into heads"
        head = size_of(cst.parse_expression(head_attr), resolve_init)
        if len(split.parts) != 3 or split.parts[1] != split.parts[2]:
            return f"its {len(split.parts)} parts ({', '.join(parts)}) are not q, k, v with k and v of one size"
        hq, hkv = split.parts[0].count_of(head), split.parts[1].count_of(head)
        if hq is None or hkv is None or hq.render() is None or hkv.render() is None:
            return f"its parts ({', '.join(parts)}) are not heads x {head_attr}"
        src = (f"self.{attr} = QKVParallelLinear(\n    hidden_size={code(in_f)},\n    head_size={head_attr},\n"
               f"    total_num_heads={hq.render()},\n    total_num_kv_heads={hkv.render()},\n    bias={bias},\n)\n")
        kind = (f"QKVParallelLinear ({hq.render()} q heads, {hkv.render()} kv heads of {head_attr}; the fused "
                "checkpoint tensor split into q/k/v)")
        return _Prefused(split, src, kind, (hq, hkv, head, total))

    def _part_names(self, fwd, split: FusedSplit, attention: bool) -> list[str]:
        taken = set(loads(fwd)) | {n for n in code(fwd).replace("(", " ").replace(",", " ").split()}
        stems = ["q", "k", "v"] if attention else [f"{_local(split.attr)}_{i}" for i in range(len(split.parts))]
        names = []
        for stem in stems:
            while stem in taken:
                stem += "_out"
            names.append(stem)
        return names

    def _split_sizes(self, cls, linears, column, fusions, prefused, per_head, attention, resolve_init) -> dict:
        """The sizes this sharded block splits over ranks, for its per-head / per-channel parameters."""
        def size(text: str) -> Size | None:
            return size_of(cst.parse_expression(text), resolve_init)

        if attention:
            if prefused:
                return _attention_sizes(*prefused.heads)
            if per_head:
                init = methods(cls)["__init__"]
                cfg = param_names(init)[1] if len(param_names(init)) > 1 else "config"
                head = next((f"self.{h}" for h in ("head_dim", "head_size") if h in dict(init_assignments(cls))), None)
                hq = size(f"{cfg}.num_attention_heads")
                return _attention_sizes(hq, hq, size(head), None) if head else {}
            f = fusions[0]
            outs = [_linear_parts(linears[m])[1] for m in f.members]
            (hq, hd), (hkv, _) = _split_heads(outs[0]), _split_heads(outs[1])
            total = sum((size_of(o, resolve_init) or Size() for o in outs), Size())
            return _attention_sizes(size(hq), size(hkv), size(hd), total)
        out: dict[Size, SplitSize] = {}
        fused = {m: f for f in fusions for m in f.members}
        for a in column:
            parts = prefused.split.parts if prefused and prefused.split.attr == a else \
                [size_of(_linear_parts(linears[m])[1], resolve_init) for m in fused[a].members] if a in fused else \
                [size_of(_linear_parts(linears[a])[1], resolve_init)]
            for p in parts:
                if p is not None:
                    out.setdefault(p, SplitSize(f"output of {a}"))
            if len(parts) > 1 and None not in parts:
                why = f"its size is the whole fused output of {a}, whose rank slice is made of parts of each member"
                out.setdefault(sum(parts, Size()), SplitSize(f"fused output of {a}", why))
        return out

    def _qkv(self, linears, column) -> Fusion | None:
        if len(column) != 3:
            return None
        parts = [_linear_parts(linears[a]) for a in column]
        heads = [_split_heads(out) for _, out, _ in parts]
        if None in heads or len({b for *_, b in parts}) != 1 or \
                not all(same_code(parts[0][0], p[0]) for p in parts):
            return None
        if len({hd for _, hd in heads}) != 1 or heads[1][0] != heads[2][0]:
            return None
        return Fusion(_fused_name(column), list(column), ["q", "k", "v"])

    def _record_heads(self, name, cls, linears, column, fusions, local: bool = False) -> None:
        if fusions:
            f = fusions[0].fused
            self.ctx.attn_heads[name] = (f"self.{f}.num_heads", f"self.{f}.num_kv_heads", f"self.{f}.head_size")
            return
        assigned = {a for a, _ in init_assignments(cls)}
        text = code(cls)
        init = methods(cls)["__init__"]
        cfg = param_names(init)[1] if len(param_names(init)) > 1 else "config"
        head = next((f"self.{h}" for h in ("head_dim", "head_size") if h in assigned), None)
        if head is None:
            self.refuse(cls, f"attention `{name}`", "cannot tell its head size (no self.head_dim / self.head_size)")
            return
        if local:  # heads sharded over ranks (multi-head attention only)
            heads = f"divide({cfg}.num_attention_heads, get_tp_world_size())"
            self.ctx.attn_heads[name] = (heads, heads, head)
            return
        # the class's own head count when it sets one (it may differ per layer from the config's)
        q_heads = "self.num_heads" if "num_heads" in assigned else f"{cfg}.num_attention_heads"
        kv = f"{cfg}.num_key_value_heads" if "num_key_value_heads" in text else q_heads  # MQA: normalise_heads
        if len(column) == 3:  # q, k, v built as `heads * head size`: their own counts (locals are in scope)
            head_value = dict(init_assignments(cls))[head[len("self."):]]
            (q_count, _), (k_count, _), (v_count, v_head) = (
                _heads_times(_linear_parts(linears[a])[1], head, head_value) for a in column)
            if k_count is not None and v_count is None and v_head is not None:
                self.refuse(cls, f"attention `{name}`", f"its value head size `{v_head}` is not its key head size "
                                                        f"`{head}`; the engine's Attention takes one head size")
                return
            q_heads, kv = q_count or q_heads, k_count or kv
        self.ctx.attn_heads[name] = (q_heads, kv, head)

    def _rewrite_init(self, init: cst.FunctionDef, linears, column, fusions, sharded, prefused) -> cst.FunctionDef:
        fused_members = {m: f for f in fusions for m in f.members}
        body = []
        for stmt in init.body.body:
            attr = None
            if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign):
                attr = self_attr(stmt.body[0].targets[0].target)
            if attr not in linears:
                body.append(stmt)
                continue
            if prefused and attr == prefused.split.attr:
                self.note(stmt, f"{attr}: fused in the HF file, split by forward -> {prefused.kind}")
                body.append(parse_stmt(prefused.src).with_changes(leading_lines=stmt.leading_lines))
                continue
            in_f, out_f, bias = _linear_parts(linears[attr])
            if attr in fused_members:
                f = fused_members[attr]
                if attr != f.members[0]:
                    continue
                if f.shard_ids == ["q", "k", "v"]:
                    q_heads, hd = _split_heads(_linear_parts(linears[f.members[0]])[1])
                    kv_heads, _ = _split_heads(_linear_parts(linears[f.members[1]])[1])
                    src = (f"self.{f.fused} = QKVParallelLinear(\n    hidden_size={code(in_f)},\n    head_size={hd},\n"
                           f"    total_num_heads={q_heads},\n    total_num_kv_heads={kv_heads},\n    bias={bias},\n)\n")
                    kind = "QKVParallelLinear (sharded by heads)"
                else:
                    outs = ", ".join(code(_linear_parts(linears[m])[1]) for m in f.members)
                    src = (f"self.{f.fused} = MergedColumnParallelLinear(\n    {code(in_f)},\n    [{outs}],\n"
                           f"    bias={bias},\n)\n")
                    kind = "MergedColumnParallelLinear"
                new = parse_stmt(src).with_changes(leading_lines=stmt.leading_lines)
                self.note(stmt, f"{', '.join(f.members)} -> {f.fused} = {kind}")
                body.append(new)
                continue
            layer = "ReplicatedLinear" if not sharded else (
                "ColumnParallelLinear" if attr in column else "RowParallelLinear")
            call = linears[attr]
            body.append(stmt.with_changes(body=[stmt.body[0].with_changes(
                value=call.with_changes(func=cst.Name(layer)))]))
            if sharded:
                self.note(stmt, f"{attr}: nn.Linear -> {layer} "
                                f"({'reads the block input' if attr in column else 'reads a sharded intermediate'})")
        return init.with_changes(body=init.body.with_changes(body=body))

    def _rewrite_forward(self, fwd: cst.FunctionDef, linears, fusions) -> cst.FunctionDef:
        taken = set(loads(fwd)) | {n for n in code(fwd).replace("(", " ").replace(",", " ").split()}
        member_var: dict[str, str] = {}
        fused_of: dict[str, Fusion] = {}
        for f in fusions:
            for m in f.members:
                v = _local(m)
                while v in taken:
                    v += "_out"
                member_var[m] = v
                fused_of[m] = f
        pending = {f.fused: f for f in fusions}
        pass_self = self

        class Calls(cst.CSTTransformer):
            """Fused members -> their split outputs; other linears -> the output of the (out, bias) pair."""

            def leave_Call(self, o, u):
                a = self_call_attr(u)
                if a in member_var:
                    return cst.Name(member_var[a])
                return u

        def rewrite_small(small):
            if isinstance(small, cst.Assign) and len(small.targets) == 1 and \
                    isinstance(small.targets[0].target, cst.Name) and self_call_attr(small.value) in linears \
                    and self_call_attr(small.value) not in member_var:
                target = small.targets[0].target
                inner = small.value.with_changes(args=[a.visit(Nested()) for a in small.value.args])
                return small.with_changes(value=inner, targets=[small.targets[0].with_changes(
                    target=cst.Tuple([cst.Element(target), cst.Element(cst.Name("_"))], lpar=[], rpar=[]))])
            return None

        class Nested(cst.CSTTransformer):
            def leave_Call(self, o, u):
                a = self_call_attr(u)
                if a in linears and a not in member_var:
                    return cst.Subscript(u, [cst.SubscriptElement(cst.Index(cst.Integer("0")))])
                return u

        def rewrite_statement(stmt):
            prelude = []
            members_here = [m for m in member_var if calls_of(stmt, m)]
            for m in members_here:
                f = fused_of[m]
                if f.fused in pending:
                    pending.pop(f.fused)
                    arg = code(calls_of(stmt, m)[0].args[0].value)
                    fv = _local(f.fused)
                    while fv in taken:
                        fv += "_out"
                    outs = ", ".join(member_var[x] for x in f.members)
                    prelude.append(parse_stmt(f"{fv}, _ = self.{f.fused}({arg})\n"))
                    prelude.append(parse_stmt(f"{outs} = {fv}.split(self.{f.fused}.output_partition_sizes, dim=-1)\n"))
            stmt = stmt.visit(Calls())
            if isinstance(stmt, cst.SimpleStatementLine):
                new_body = []
                for small in stmt.body:
                    r = rewrite_small(small)
                    new_body.append(r if r is not None else small.visit(Nested()))
                stmt = stmt.with_changes(body=new_body)
            else:
                stmt = stmt.visit(Nested())
            if prelude:
                prelude[0] = prelude[0].with_changes(leading_lines=stmt.leading_lines)
                stmt = stmt.with_changes(leading_lines=[])
            return prelude + [stmt]

        body = []
        for stmt in fwd.body.body:
            new = rewrite_statement(stmt) if isinstance(stmt, cst.SimpleStatementLine) else \
                [stmt.visit(Calls()).visit(Nested())]
            body += new
        if pending:
            pass_self.refuse(fwd, f"fused projection {', '.join(pending)}",
                             "its members are not called at the top level of forward")
        return fwd.with_changes(body=fwd.body.with_changes(body=body))
