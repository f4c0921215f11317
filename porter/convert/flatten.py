"""Pass 3: flatten to the engine's token-major layout.

The base model's forward becomes `forward(input_ids, positions, intermediate_tensors=None,
inputs_embeds=None)` over flat `[num_tokens]` inputs and returns the hidden states instead of an
output dataclass. In attention blocks the `[batch, heads, seq, head_dim]` idiom
`x.view(hidden_shape).transpose(1, 2)` becomes `x.view(hidden_shape)`: with `input_shape = (T,)` the
view is already `[T, heads, head_dim]`, the layout the engine's Attention and HF's rotary code
(`cos.unsqueeze(1)` on `[T, head_dim]`) both accept.
"""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Pass
from porter.convert.cst_util import code, dotted, init_assignments, kwarg, loads, param_names, self_attr
from porter.convert.imports import import_origins

_BASE_SIGNATURE = cst.parse_statement(
    "def forward(\n"
    "    self,\n"
    "    input_ids: torch.Tensor | None,\n"
    "    positions: torch.Tensor,\n"
    "    intermediate_tensors=None,\n"
    "    inputs_embeds: torch.Tensor | None = None,\n"
    ") -> torch.Tensor:\n"
    "    pass\n"
)
_ENGINE_INPUTS = {"input_ids", "position_ids", "inputs_embeds", "self"}


class _Rename(cst.CSTTransformer):
    def __init__(self, old: str, new: str):
        super().__init__()
        self.old, self.new = old, new

    def leave_Name(self, original, updated):
        return updated.with_changes(value=self.new) if updated.value == self.old else updated

    def leave_Arg(self, original, updated):
        return updated.with_changes(keyword=original.keyword)

    def leave_Attribute(self, original, updated):
        return updated.with_changes(attr=original.attr)


def _head_view(node) -> bool:
    return isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and \
        node.func.attr.value in ("view", "reshape")


class _PositionsGiven(cst.CSTTransformer):
    """The engine always passes positions: fold `if positions is None:` branches."""

    def leave_If(self, original: cst.If, updated: cst.If):
        t = code(updated.test).replace(" ", "")
        if t == "positionsisNone":
            if updated.orelse is None:
                return cst.RemoveFromParent()
            return updated.orelse if isinstance(updated.orelse, cst.If) else cst.FlattenSentinel(updated.orelse.body.body)
        if t == "positionsisnotNone":
            return cst.FlattenSentinel(updated.body.body)
        return updated


class FlattenForward(Pass):
    name = "flatten"
    scope = "classes"

    def visit_Module(self, node: cst.Module) -> None:
        self.origins = import_origins(node)
        self._cls: list[str] = []

    def visit_ClassDef(self, node):
        self._cls.append(node.name.value)
        # per-head norms (q_norm/k_norm) act on the last dim, so they commute with the head transpose
        self.norms = {a for a, v in init_assignments(node) if isinstance(v, cst.Call)
                      and (dotted(v.func) or "").endswith("Norm")}

    def leave_ClassDef(self, original, updated):
        self._cls.pop()
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        if not self._cls or updated.name.value != "forward":
            return updated
        cls = self._cls[-1]
        if cls == self.ctx.roles.base:
            return self._base_forward(original, updated)
        return updated

    def _base_forward(self, original, fn: cst.FunctionDef) -> cst.FunctionDef:
        used = loads(fn.body)
        for p in param_names(fn):
            if p not in _ENGINE_INPUTS and used[p]:
                self.refuse(original, f"base model input `{p}`",
                            "the engine's forward(input_ids, positions, ...) has no equivalent for it")
        body = fn.body.visit(_Rename("position_ids", "positions")).visit(_PositionsGiven())
        new = _BASE_SIGNATURE.with_changes(body=body, leading_lines=fn.leading_lines, decorators=fn.decorators)
        self.note(original, f"{self._cls[-1]}.forward({', '.join(param_names(fn)[1:])}) -> "
                            "forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None) "
                            "over flat [num_tokens]")
        return new

    def leave_Return(self, original: cst.Return, updated: cst.Return):
        value = updated.value
        if not (self._cls and self._cls[-1] == self.ctx.roles.base and isinstance(value, cst.Call)):
            return updated
        origin = self.origins.get((dotted(value.func) or "").split(".")[0], "")
        if not origin.startswith("transformers.modeling_outputs"):
            return updated
        hidden = kwarg(value, "last_hidden_state")
        hidden = hidden.value if hidden is not None else (value.args[0].value if value.args else None)
        if hidden is None:
            self.refuse(original, f"return of `{dotted(value.func)}`", "no last_hidden_state to return")
            return updated
        self.note(original, f"returns {code(hidden)} instead of {dotted(value.func)}(...)")
        return updated.with_changes(value=hidden)

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        if not (self._cls and self._cls[-1] in self.ctx.roles.attention):
            return updated
        f = updated.func
        if isinstance(f, cst.Attribute) and f.attr.value == "transpose" and \
                [code(a.value) for a in updated.args] == ["1", "2"]:
            inner = f.value
            if _head_view(inner) or (isinstance(inner, cst.Call) and self_attr(inner.func) in self.norms
                                     and len(inner.args) == 1 and _head_view(inner.args[0].value)):
                self.note(original, f"`{code(original)}` -> `{code(inner)}` (flat [T, heads, head_dim])")
                return inner
            self.refuse(original, f"`{code(original)}`",
                        "a batch-first transpose that is not the view(...).transpose(1, 2) head-split idiom")
        return updated

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        # `bsz, q_len, _ = hidden_states.size()` assumes a batch dimension the engine does not have
        if self._cls and self._cls[-1] in self.ctx.roles.blocks:
            t = updated.targets[0].target
            v = code(updated.value)
            if isinstance(t, cst.Tuple) and len(t.elements) >= 3 and (v.endswith(".size()") or v.endswith(".shape")):
                self.refuse(original, f"`{code(original).strip()}`",
                            "unpacks a [batch, seq, ...] shape; only input_shape = x.shape[:-1] style code flattens")
        return updated
