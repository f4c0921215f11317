"""Pass 4: the attention-interface call becomes the engine's paged `Attention` layer.

`out, weights = attention_interface(self, q, k, v, mask, scaling=..., sliding_window=..., softcap=...)`
becomes `out = self.attn(q, k, v)`; the call's keyword arguments become `Attention(...)` constructor
arguments at the end of `__init__` (they are per-layer attributes there, e.g. a sliding window only on
sliding layers). The block then returns its output alone and callers stop unpacking a weights value.
"""
from __future__ import annotations

import builtins
import re

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import (ReadNamesOnly, code, contains, loads, methods, param_names, parse_stmt,
                                     self_call_attr)
from porter.convert.engine_imports import add_import, bound_names
from porter.convert.specialise import callee_map

# attention-interface keyword -> Attention constructor keyword (None: meaningless at inference)
_KWARGS = {"scaling": "scale", "sliding_window": "sliding_window", "softcap": "logits_soft_cap",
           "s_aux": "sinks", "sinks": "sinks", "dropout": None, "position_ids": None, "is_causal": None,
           "attention_mask": None,  # the model's causal (or sliding) mask, as when passed positionally
           "alibi_slopes": "alibi_slopes"}
# head counts the inline-attention normaliser read off the q/k layouts (they override the parallel
# pass's guess for a block whose linears are not sharded)
_HEADS = ("num_heads", "num_kv_heads", "head_size")
_ALIBI_HELPERS = ("alibi_slopes", "alibi_slopes_interleaved", "local_heads")  # porter.engine.layers.alibi


def _mentions_interface(node: cst.CSTNode) -> bool:
    return contains(node, lambda n: isinstance(n, cst.Name) and n.value == "ALL_ATTENTION_FUNCTIONS")


class AttentionCall(Pass):
    name = "attention"
    scope = "classes"

    def visit_Module(self, node: cst.Module) -> None:
        self.module_names = {s.name.value for s in node.body if isinstance(s, (cst.ClassDef, cst.FunctionDef))}
        self.module_names |= set(dir(builtins)) | set(_ALIBI_HELPERS)  # engine helpers it imports
        for s in node.body:
            if isinstance(s, cst.SimpleStatementLine):
                for small in s.body:
                    if isinstance(small, (cst.Import, cst.ImportFrom)) and not isinstance(
                            getattr(small, "names", None), cst.ImportStar):
                        for a in small.names:
                            self.module_names.add(code(a.asname.name) if a.asname else code(a.name).split(".")[0])
        self.attn_attrs = {cls: {a for a, c in attrs.items() if c in self.ctx.roles.attention}
                           for cls, attrs in callee_map(node).items()}
        self._cls: list[str] = []

    def visit_ClassDef(self, node):
        self._cls.append(node.name.value)

    _weights_read: set[str] = set()

    def visit_FunctionDef(self, node) -> None:
        self._weights_read = set()

    def leave_FunctionDef(self, original, updated):
        """A caller that passes the attention weights on (`return out, attn_weights`) passes None."""
        if not self._weights_read:
            return updated
        names, self._weights_read = self._weights_read, set()
        self.note(original, f"{original.name.value}: attention weights {', '.join(sorted(names))} are None "
                            "(the engine does not return them)")
        return updated.with_changes(body=updated.body.visit(_NoneFor(names)))

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = self._cls.pop()
        if name in self.ctx.roles.attention:
            return self._attention(original, updated)
        return updated

    # callers: `h, _ = self.self_attn(...)` -> `h = self.self_attn(...)`
    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        if not self._cls or self_call_attr(updated.value) not in self.attn_attrs.get(self._cls[-1], ()):
            return updated
        t = updated.targets[0].target
        if isinstance(t, cst.Tuple) and len(t.elements) == 2:
            self.note(original, f"`{code(t)} = self.{self_call_attr(updated.value)}(...)`: the attention block "
                                "returns its output only")
            if isinstance(t.elements[1].value, cst.Name) and t.elements[1].value.value != "_":
                self._weights_read.add(t.elements[1].value.value)
            return updated.with_changes(targets=[updated.targets[0].with_changes(target=t.elements[0].value)])
        return updated

    def _attention(self, original: cst.ClassDef, cls: cst.ClassDef) -> cst.ClassDef:
        ms = methods(cls)
        fwd, init = ms["forward"], ms["__init__"]
        cfg = param_names(init)[1] if len(param_names(init)) > 1 else "config"
        ctor: dict[str, str] = {}
        weights_var: list[str] = []
        calls: list[dict[str, str]] = []

        def rewrite(stmts) -> list:
            out_body, here = [], 0
            for stmt in stmts:
                if isinstance(stmt, cst.If):  # calls in config branches (inline attention, normalised)
                    stmt = stmt.visit(_NestedBlocks(rewrite))
                elif isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1:
                    small = stmt.body[0]
                    value = small.value if isinstance(small, (cst.Assign, cst.AnnAssign)) else None
                    if value is not None and not isinstance(value, cst.Call) and _mentions_interface(value) or \
                            isinstance(value, cst.Call) and _mentions_interface(value.func):
                        self.note(stmt, "dropped the attention-interface lookup")
                        continue
                    if isinstance(small, cst.Assign) and isinstance(value, cst.Call) and \
                            isinstance(value.func, cst.Name) and self._is_interface_var(fwd, value.func.value):
                        one: dict[str, str] = {}
                        new = self._replace_call(stmt, small, value, one, weights_var, cfg, fwd)
                        if new is not None:
                            calls.append(one)
                            here += 1
                            out_body.append(new)
                            continue
                out_body.append(stmt)
            if here > 1:  # the branches of an `if` are alternatives; the calls of one block all run
                self.refuse(original, f"attention `{cls.name.value}`",
                            f"it calls the attention interface {here} times in one pass; the engine's "
                            "paged cache holds one key/value per layer and token")
            return out_body

        out_body = rewrite(fwd.body.body)
        if not calls:
            self.refuse(original, f"attention `{cls.name.value}`", "no `out, weights = attention_interface(...)` call")
            return cls
        if any(c != calls[0] for c in calls):
            self.refuse(original, f"attention `{cls.name.value}`", "its attention-interface calls differ in "
                                                                  "arguments; one engine Attention cannot serve them")
            return cls
        ctor.update(calls[0])
        fwd = fwd.with_changes(body=fwd.body.with_changes(body=out_body))
        fwd = fwd.visit(_DropWeights(set(weights_var)))
        fwd = fwd.with_changes(returns=cst.Annotation(cst.parse_expression("torch.Tensor")))
        sharded = self.ctx.sharded.get(cls.name.value, False)
        read = {k: ctor.pop(k) for k in _HEADS if k in ctor}
        heads = self.ctx.attn_heads.get(cls.name.value)
        if heads is None and not sharded and len(read) == len(_HEADS):
            heads = tuple(read[k] for k in _HEADS)
        if heads is None:
            self.refuse(original, f"attention `{cls.name.value}`", "head counts unknown")
            return cls
        num_heads, num_kv, head_size = heads
        if not sharded:  # replicated block: all heads on every rank, as the q/k layouts say
            num_heads, num_kv, head_size = (read.get(k, v) for k, v in zip(_HEADS, (num_heads, num_kv, head_size)))
        if "alibi_slopes" in ctor and sharded:
            ctor["alibi_slopes"] = f"local_heads({ctor['alibi_slopes']})"
        scale = ctor.pop("scale", f"{head_size}**-0.5")
        extra = "".join(f"    {k}={v},\n" for k, v in ctor.items())
        kv_line = f"    num_kv_heads={num_kv},\n" if num_kv != num_heads else ""  # default: as many as heads
        attn = parse_stmt(f"self.attn = Attention(\n    {num_heads},\n    {head_size},\n    scale={scale},\n"
                          f"{kv_line}{extra})\n")
        self.note(original, f"{cls.name.value}: self.attn = Attention({num_heads}, {head_size}, scale={scale}, "
                            f"num_kv_heads={num_kv}{''.join(f', {k}={v}' for k, v in ctor.items())})")
        init = init.with_changes(body=init.body.with_changes(body=[*init.body.body, attn]))
        body = [init if s is ms["__init__"] else fwd if s is ms["forward"] else s for s in cls.body.body]
        return cls.with_changes(body=cls.body.with_changes(body=body))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        text = updated.code
        for name in _ALIBI_HELPERS:
            if re.search(rf"\b{name}\(", text) and name not in bound_names(updated):
                updated = add_import(updated, "porter.engine.layers.alibi", name)
        return updated

    def _is_interface_var(self, fwd: cst.FunctionDef, name: str) -> bool:
        for stmt in fwd.body.body:
            if isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    if isinstance(small, (cst.Assign, cst.AnnAssign)) and small.value is not None and \
                            _mentions_interface(small.value):
                        targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
                        if any(code(t) == name for t in targets):
                            return True
        return False

    def _replace_call(self, stmt, small: cst.Assign, call: cst.Call, ctor, weights_var, cfg, fwd):
        positional = [a.value for a in call.args if a.keyword is None and not a.star]
        if len(positional) < 4:
            self.refuse(stmt, f"`{code(call.func)}(...)`", "expected (self, query, key, value, ...) arguments")
            return None
        q, k, v = (code(x) for x in positional[1:4])
        for a in call.args:
            if a.keyword is None:
                continue
            key = a.keyword.value
            if key in _HEADS:
                ctor[key] = code(a.value)
                continue
            if key not in _KWARGS:
                self.refuse(stmt, f"attention keyword `{key}`", "no engine Attention equivalent is known")
                continue
            if _KWARGS[key] is None:
                continue
            expr = code(a.value)
            bad = [n for n in loads(a.value) if n not in ("self", cfg) and n not in self.module_names]
            if bad:
                self.refuse(stmt, f"attention keyword `{key}={expr}`",
                            f"it depends on forward-time values ({', '.join(bad)}); it must be a per-layer constant")
                continue
            ctor[_KWARGS[key]] = expr
        t = small.targets[0].target
        if isinstance(t, cst.Tuple):
            out = t.elements[0].value
            weights_var += [code(e.value) for e in t.elements[1:]]
        else:
            self.refuse(stmt, f"`{code(small).strip()[:60]}`", "expected `out, weights = attention_interface(...)`")
            return None
        self.note(stmt, f"attention-interface call -> `{code(out)} = self.attn({q}, {k}, {v})`")
        return stmt.with_changes(body=[cst.parse_statement(f"{code(out)} = self.attn({q}, {k}, {v})\n").body[0]])


class _NoneFor(ReadNamesOnly, cst.CSTTransformer):
    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names

    def leave_Name(self, original, updated):
        return cst.Name("None") if updated.value in self.names else updated


class _NestedBlocks(cst.CSTTransformer):
    """Applies a statement-list rewrite to the blocks of an `if` (and its elif/else)."""

    def __init__(self, rewrite):
        super().__init__()
        self.rewrite = rewrite

    def visit_IndentedBlock(self, node) -> bool:
        return False

    def leave_IndentedBlock(self, original, updated):
        return updated.with_changes(body=self.rewrite(updated.body))


class _DropWeights(cst.CSTTransformer):
    """`return out, attn_weights` -> `return out` once the weights no longer exist."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names

    def leave_Return(self, original, updated):
        v = updated.value
        if isinstance(v, cst.Tuple):
            kept = [e for e in v.elements if code(e.value) not in self.names and code(e.value) != "None"]
            if len(kept) == 1:
                return updated.with_changes(value=kept[0].value)
        return updated
