"""State shared by the passes: the report, source line tracking and the analysis results."""
from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

from porter.convert.report import Report


class SourceLines:
    """Maps nodes to their line in the original file, following nodes through rewrites.

    Positions are resolved once on the parsed source; every pass hands the line of a node it replaces
    on to the replacement, so later passes still report original line numbers."""

    def __init__(self, module: cst.Module):
        self._module = module  # positions are resolved on first use (a tree may be re-indexed unused)
        self._resolved = False

    def _resolve(self) -> None:
        positions = MetadataWrapper(self._module, unsafe_skip_copy=True).resolve(PositionProvider)
        # node kept in the value so its id() is never reused while the mapping lives
        self._lines: dict[int, tuple[cst.CSTNode, int]] = {id(n): (n, p.start.line) for n, p in positions.items()}
        self._source = [line.strip() for line in self._module.code.splitlines()]
        self._classes = {n.name.value: (p.start.line, p.end.line) for n, p in positions.items()
                         if isinstance(n, cst.ClassDef)}
        self._resolved = True

    def of(self, node: cst.CSTNode, cls: str | None = None) -> int | None:
        """The node's original line; for a node rebuilt outside a pass, the first source line (inside
        class `cls` when given) whose text starts the node's code."""
        if not self._resolved:
            self._resolve()
        hit = self._lines.get(id(node))
        if hit:
            return hit[1]
        from porter.convert.cst_util import code

        try:
            text = code(node)
        except cst.CSTCodegenError:  # a fragment that only renders inside its parent
            return None
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if not first:
            return None
        lo, hi = self._classes.get(cls, (1, len(self._source)))
        for i in range(lo - 1, min(hi, len(self._source))):
            if self._source[i] and self._source[i].startswith(first[:60]):
                return i + 1
        return None

    def carry(self, old: cst.CSTNode, new: cst.CSTNode) -> None:
        if not self._resolved:
            self._resolve()
        hit = self._lines.get(id(old))
        if hit is not None and id(new) not in self._lines:
            self._lines[id(new)] = (new, hit[1])


@dataclass
class Roles:
    attention: set[str] = field(default_factory=set)
    mlp: set[str] = field(default_factory=set)
    decoder: str | None = None
    base: str | None = None
    causal_lm: str | None = None
    pretrained: set[str] = field(default_factory=set)  # PreTrainedModel subclasses (plumbing)
    dropped: set[str] = field(default_factory=set)  # other heads
    outputs: set[str] = field(default_factory=set)  # transformers' output classes, imported or subclassed here
    embedding_subclasses: set[str] = field(default_factory=set)

    @property
    def blocks(self) -> set[str]:
        """Classes whose forward the converter rewrites."""
        out = self.attention | self.mlp
        for c in (self.decoder, self.base):
            if c:
                out.add(c)
        return out


@dataclass
class Fusion:
    fused: str  # new attribute, e.g. qkv_proj
    members: list[str]  # HF attributes, in output order
    shard_ids: list  # "q","k","v" or 0,1,...


@dataclass
class Context:
    filename: str
    report: Report
    lines: SourceLines
    package: str | None  # dotted package of the source inside transformers, for relative imports
    model_type: str | None = None
    roles: Roles = field(default_factory=Roles)
    fusions: dict[str, list[Fusion]] = field(default_factory=dict)  # class -> fusions made
    sharded: dict[str, bool] = field(default_factory=dict)  # class -> its linears are TP-sharded
    # attention class -> (num_heads, num_kv_heads, head_size) expressions valid at the end of __init__
    attn_heads: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    checkpoint_renames: list[tuple[str, str]] = field(default_factory=list)
    ignore_unexpected: list[str] = field(default_factory=list)
    # stacked experts turned into FusedMoE (normalise_moe): HF gate_up parameter -> down parameter
    moe_experts: dict[str, str] = field(default_factory=dict)
    # regex of checkpoint keys stored transposed (GPT-2 Conv1D weights, normalise_conv1d)
    transposed_keys: str = ""


class Pass(cst.CSTTransformer):
    """One rewrite. Subclasses set `name`; `note` records a change at a node's original line."""

    name = "pass"
    # what the pass needs to walk: None = everything, "classes" = class bodies only, "blocks" = only the
    # classes whose forward the converter rewrites (skipping the rest keeps conversion fast)
    scope: str | None = None

    def __init__(self, ctx: Context):
        super().__init__()
        self.ctx = ctx

    _class: str | None = None

    def on_visit(self, node) -> bool:
        if isinstance(node, cst.ClassDef):
            self._class = node.name.value
        result = super().on_visit(node)
        if self.scope == "top" and isinstance(node, (cst.ClassDef, cst.FunctionDef)):
            return False
        if self.scope is not None:
            if isinstance(node, cst.FunctionDef) and not self._in_class:
                return False
            if isinstance(node, cst.ClassDef):
                if self.scope == "blocks" and node.name.value not in self.ctx.roles.blocks:
                    return False
                self._in_class = True
        return result

    _in_class = False

    def on_leave(self, original_node, updated_node):
        if isinstance(original_node, cst.ClassDef):
            self._in_class, self._class = False, None
        result = super().on_leave(original_node, updated_node)
        if isinstance(result, cst.CSTNode) and result is not original_node:
            self.ctx.lines.carry(original_node, result)
        elif isinstance(result, cst.FlattenSentinel):
            for n in result.nodes:
                self.ctx.lines.carry(original_node, n)
        return result

    def line(self, node: cst.CSTNode, cls: str | None = None) -> int | None:
        return self.ctx.lines.of(node, cls or self._class)

    def note(self, node: cst.CSTNode | None, message: str) -> None:
        self.ctx.report.change(self.name, self.line(node) if node is not None else None, message)

    def refuse(self, node: cst.CSTNode | None, construct: str, why: str) -> None:
        self.ctx.report.refuse(construct, self.line(node) if node is not None else None, why)

    def run(self, module: cst.Module) -> cst.Module:
        return module.visit(self)
