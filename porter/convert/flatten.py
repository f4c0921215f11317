"""Pass 3: flatten to the engine's token-major layout.

The base model's forward becomes `forward(input_ids, positions, intermediate_tensors=None,
inputs_embeds=None)` over flat `[num_tokens]` inputs and returns the hidden states instead of an
output dataclass. In attention blocks the `[batch, heads, seq, head_dim]` idiom
`x.view(hidden_shape).transpose(1, 2)` becomes `x.view(hidden_shape)`: with `input_shape = (T,)` the
view is already `[T, heads, head_dim]`, the layout the engine's Attention and HF's rotary code
(`cos.unsqueeze(1)` on `[T, head_dim]`) both accept. The transpose may also come later, on a name
(`q = self.q_proj(x).view(shape)`, `if ...: q = self.q_norm(q)`, `q = q.transpose(1, 2)`): a small
reaching-definitions walk of the forward drops it when every definition of the name that reaches it is
such a head view (or a per-head norm of one), and refuses it otherwise.
"""
from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from porter.convert.context import Pass
from porter.convert.cst_util import RenameName, code, dotted, kwarg, loads, methods, param_names, self_attr
from porter.convert.imports import model_output_imports

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


def _head_view(node) -> bool:
    return isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and \
        node.func.attr.value in ("view", "reshape")


def _is_head_transpose(node) -> bool:
    return isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and \
        node.func.attr.value == "transpose" and [code(a.value) for a in node.args] == ["1", "2"]


class _HeadViewNames:
    """Which `transpose(1, 2)` calls of a forward act on a name (or a per-head norm of a name) whose
    reaching definitions are all head views. Branches merge conservatively (a head view on every path);
    a name assigned in a loop is not trusted."""

    def __init__(self, norms: set[str]):
        self.norms = norms
        self.droppable: set[cst.Call] = set()

    def run(self, fn: cst.FunctionDef) -> set[cst.Call]:
        self._block(fn.body.body, {})
        return self.droppable

    def is_head(self, expr, state: dict) -> bool:
        if _head_view(expr):
            return True
        if isinstance(expr, cst.Name):
            return state.get(expr.value) == "head"
        return (isinstance(expr, cst.Call) and self_attr(expr.func) in self.norms and len(expr.args) == 1
                and self.is_head(expr.args[0].value, state))

    def _scan(self, node, state) -> None:
        for call in m.findall(node, m.Call(func=m.Attribute(attr=m.Name("transpose")))):
            if _is_head_transpose(call) and self.is_head(call.func.value, state):
                self.droppable.add(call)

    def _block(self, stmts, state: dict) -> dict:
        for stmt in stmts:
            state = self._statement(stmt, state)
        return state

    def _statement(self, stmt, state: dict) -> dict:
        if isinstance(stmt, cst.If):
            self._scan(stmt.test, state)
            taken = self._block(stmt.body.body, dict(state))
            if isinstance(stmt.orelse, cst.If):
                other = self._statement(stmt.orelse, dict(state))
            elif stmt.orelse is not None:
                other = self._block(stmt.orelse.body.body, dict(state))
            else:
                other = state
            return {k: v for k, v in taken.items() if other.get(k) == v}
        if isinstance(stmt, cst.With):
            return self._block(stmt.body.body, state)
        if not isinstance(stmt, cst.SimpleStatementLine):  # loops, try, nested defs: distrust their names
            state = dict(state)
            for name in m.findall(stmt, m.AssignTarget(target=m.Name())):
                state[name.target.value] = "other"
            return state
        state = dict(state)
        for small in stmt.body:
            self._scan(small, state)
            if isinstance(small, cst.Assign):
                head = self.is_head(small.value, state)
                for target in small.targets:
                    for name in m.findall(target.target, m.Name()):
                        state[name.value] = "head" if head and isinstance(target.target, cst.Name) else "other"
            elif isinstance(small, (cst.AugAssign, cst.AnnAssign)) and isinstance(small.target, cst.Name):
                state[small.target.value] = "other"
        return state


def _self_assignment(stmt) -> bool:
    if not (isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1 and isinstance(stmt.body[0], cst.Assign)):
        return False
    a = stmt.body[0]
    return len(a.targets) == 1 and isinstance(a.targets[0].target, cst.Name) and isinstance(a.value, cst.Name) \
        and a.targets[0].target.value == a.value.value


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
        self._cls: list[str] = []
        self._defined = {s.name.value for s in node.body if isinstance(s, cst.ClassDef)}
        # imports are resolved by now; analyse found the file's own subclasses (their classes are gone)
        self._outputs = self.ctx.roles.outputs | model_output_imports(node)

    def visit_ClassDef(self, node):
        self._cls.append(node.name.value)
        # per-head norms (q_norm/k_norm) act on the last dim, so they commute with the head transpose;
        # they may be built under a config flag (`if config.use_qk_norm: self.q_norm = ...`)
        init = methods(node).get("__init__")
        self.norms = {self_attr(a.targets[0].target) for a in (m.findall(init, m.Assign()) if init else ())
                      if len(a.targets) == 1 and self_attr(a.targets[0].target) and isinstance(a.value, cst.Call)
                      and (dotted(a.value.func) or "").endswith("Norm")}

    def leave_ClassDef(self, original, updated):
        self._cls.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if self._cls and node.name.value == "forward" and self._cls[-1] in self.ctx.roles.attention:
            self.head_transposes = _HeadViewNames(self.norms).run(node)

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
        body = fn.body.visit(RenameName("position_ids", "positions")).visit(_PositionsGiven())
        new = _BASE_SIGNATURE.with_changes(body=body, leading_lines=fn.leading_lines, decorators=fn.decorators)
        self.note(original, f"{self._cls[-1]}.forward({', '.join(param_names(fn)[1:])}) -> "
                            "forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None) "
                            "over flat [num_tokens]")
        return new

    def leave_Return(self, original: cst.Return, updated: cst.Return):
        value = updated.value
        if not (self._cls and self._cls[-1] == self.ctx.roles.base and isinstance(value, cst.Call)):
            return updated
        name = (dotted(value.func) or "").split(".")[0]
        if name not in self._outputs:
            if name in self._defined:  # an object of a class of this file: the engine passes tensors only
                self.refuse(original, f"return of `{name}(...)`", "the base model must return its hidden states "
                                                                  "(or a transformers model output)")
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
        if _is_head_transpose(updated):
            inner = f.value
            # a head view written inline (no name: no definitions to reach), or a name the walk cleared
            if original in getattr(self, "head_transposes", ()) or _HeadViewNames(self.norms).is_head(inner, {}):
                self.note(original, f"`{code(original)}` -> `{code(inner)}` (flat [T, heads, head_dim])")
                return inner
            self.refuse(original, f"`{code(original)}`",
                        "a batch-first transpose that is not the view(...).transpose(1, 2) head-split idiom")
        return updated

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock):
        # `q = q.transpose(1, 2)` lost its transpose: drop the `q = q` it leaves
        if not (self._cls and self._cls[-1] in self.ctx.roles.attention):
            return updated
        body = [s for s in updated.body if not _self_assignment(s)]
        if len(body) == len(updated.body):
            return updated
        return updated.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign):
        # `bsz, q_len, _ = hidden_states.size()` assumes a batch dimension the engine does not have
        if self._cls and self._cls[-1] in self.ctx.roles.blocks:
            t = updated.targets[0].target
            v = code(updated.value)
            if isinstance(t, cst.Tuple) and len(t.elements) >= 3 and (v.endswith(".size()") or v.endswith(".shape")):
                self.refuse(original, f"`{code(original).strip()}`",
                            "unpacks a [batch, seq, ...] shape; only input_shape = x.shape[:-1] style code flattens")
        return updated
