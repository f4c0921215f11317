"""Feed-forward blocks the analysis gives no role: built by the decoder layer or by an MLP block anywhere in
__init__ (a dense MLP chosen per layer by a condition, a MoE block and its shared expert). The parallel
pass converts them like MLPs; one that does not shard keeps its HF linears as they are."""
from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as matchers

from porter.convert.cst_util import code, dotted, init_assignments, methods

_ATTENTION_LIKE = re.compile(r"softmax|scaled_dot_product_attention|ALL_ATTENTION_FUNCTIONS|"
                             r"\b(matmul|bmm|einsum)\(|\s@\s")


def is_linear(value) -> bool:
    return isinstance(value, cst.Call) and (dotted(value.func) or "") in ("nn.Linear", "torch.nn.Linear", "Linear")


def constructs(cls: cst.ClassDef, names: set[str]) -> set[str]:
    """Which of `names` the class's __init__ constructs (anywhere, also inside conditionals)."""
    init = methods(cls).get("__init__")
    if init is None:
        return set()
    return {d for c in matchers.findall(init, matchers.Call()) if (d := dotted(c.func)) in names}


def nested_dense_blocks(module: cst.Module, roles) -> set[str]:
    """Linear-bearing classes (with a forward) built by the decoder layer or by an MLP block, anywhere
    in __init__ (a dense MLP chosen by a per-layer condition, a MoE block and its shared expert), that
    analyse did not give a role."""
    cls_map = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    taken = roles.attention | roles.mlp | roles.dropped | roles.pretrained | {roles.decoder, roles.base,
                                                                              roles.causal_lm}
    found: set[str] = set()
    frontier = [c for c in [roles.decoder, *roles.mlp] if c in cls_map]
    while frontier:
        for built in constructs(cls_map[frontier.pop()], set(cls_map)):
            c = cls_map[built]
            if built in taken or built in found or "forward" not in methods(c):
                continue
            moe = bool(constructs(c, {"FusedMoE"}))  # routing may softmax over experts
            if not moe and _ATTENTION_LIKE.search(code(c)):
                continue  # scores between tokens: not a feed-forward block, left as it is
            if moe or any(is_linear(v) for _, v in init_assignments(c)):
                found.add(built)
                frontier.append(built)
    return found
