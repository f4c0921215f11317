"""Pass 1: find each class's role from the code's structure (never from its name) and refuse files
the converter cannot handle (MoE, MLA, attention that bypasses the attention interface).

Roles: attention = a class whose forward dispatches through transformers' attention interface
(`ALL_ATTENTION_FUNCTIONS`); decoder layer = the class that owns an attention block; base model = the
class that holds a `ModuleList` of decoder layers; causal LM = the class that owns the base model and
a linear head onto `vocab_size`; MLPs = the other linear-bearing blocks of the decoder layer.
"""
from __future__ import annotations

import re

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import classes, code, contains, dotted, init_assignments, methods
from porter.convert.imports import model_output_imports

_MOE = re.compile(r"\b(num_experts|num_local_experts|n_routed_experts|num_experts_per_tok|moe_intermediate_size)\b")
_MLA = re.compile(r"\b(q_lora_rank|kv_lora_rank|kv_a_proj_with_mqa)\b")
_EAGER_ATTENTION = re.compile(r"scaled_dot_product_attention|\.softmax\(|softmax\(")


def _base_names(cls: cst.ClassDef) -> list[str]:
    return [dotted(b.value) or code(b.value) for b in cls.bases]


def _constructed_class(value: cst.BaseExpression) -> str | None:
    if isinstance(value, cst.Call):
        return dotted(value.func)
    return None


def _module_list_items(value: cst.BaseExpression) -> str | None:
    """`nn.ModuleList([C(...) for i in ...])` or `nn.ModuleList([C(...)])` -> "C"."""
    if not (isinstance(value, cst.Call) and (dotted(value.func) or "").endswith("ModuleList") and value.args):
        return None
    inner = value.args[0].value
    if isinstance(inner, (cst.ListComp, cst.GeneratorExp)):
        return _constructed_class(inner.elt)
    if isinstance(inner, cst.List) and inner.elements:
        return _constructed_class(inner.elements[0].value)
    return None


def _uses_attention_interface(cls: cst.ClassDef) -> bool:
    return contains(cls, lambda n: isinstance(n, cst.Name) and n.value == "ALL_ATTENTION_FUNCTIONS")


def _has_linear(cls: cst.ClassDef) -> bool:
    return any((_constructed_class(v) or "").endswith(("Linear", "Conv1D", "FusedMoE")) for _, v in init_assignments(cls))


def _output_classes(module: cst.Module, cls_map: dict[str, cst.ClassDef], package: str | None) -> set[str]:
    """transformers' model-output classes: imported, or defined here on one of them
    (`class FooModelOutputWithPast(BaseModelOutputWithPast): pass`); the engine returns plain tensors."""
    out = model_output_imports(module, package)
    grew = True
    while grew:
        new = {name for name, cls in cls_map.items() if name not in out and set(_base_names(cls)) & out}
        out |= new
        grew = bool(new)
    return out


def analyse(module: cst.Module, ctx: Context) -> None:
    lines, report, roles = ctx.lines, ctx.report, ctx.roles
    cls_map = classes(module)
    children = {name: {a: _constructed_class(v) for a, v in init_assignments(c)} for name, c in cls_map.items()}
    lists = {name: {a: _module_list_items(v) for a, v in init_assignments(c) if _module_list_items(v)}
             for name, c in cls_map.items()}

    for name, cls in cls_map.items():
        text = code(cls)
        if not ctx.moe_experts and (_MOE.search(text) or any(a == "experts" for a in children[name])):
            report.refuse(f"mixture-of-experts block `{name}`", lines.of(cls),
                          "it routes tokens to experts; porter convert does not rewrite MoE blocks yet")
        if _MLA.search(text) and name not in ctx.attn_heads:  # normalise_mla converted it (and set its heads)
            report.refuse(f"multi-head latent attention `{name}`", lines.of(cls),
                          "its low-rank q/kv projections do not follow the latent dataflow porter converts "
                          "(a projection split into [latent, rope] parts, the latent normed, then projected per head)")
        for attr, ctor in children[name].items():
            if ctor and ctor.endswith("Conv1D"):
                report.refuse(f"Conv1D layer `{name}.{attr}`", lines.of(cls),
                              "transposed Conv1D projections are not rewritten yet")
        if _uses_attention_interface(cls):
            roles.attention.add(name)
        if "nn.Embedding" in _base_names(cls) or "Embedding" in _base_names(cls):
            roles.embedding_subclasses.add(name)

    if not roles.attention:
        eager = [c for c in cls_map.values() if _EAGER_ATTENTION.search(code(c))]
        where = eager[0] if eager else None
        report.refuse(
            f"attention `{where.name.value}`" if where else "attention",
            lines.of(where) if where else None,
            "no class dispatches through transformers' attention interface (ALL_ATTENTION_FUNCTIONS); "
            "older-style files that compute attention inline are not supported yet",
        )
        report.raise_if_refused()

    for name in cls_map:
        if any(c in roles.attention for c in children[name].values()):
            roles.decoder = roles.decoder or name
    for name in cls_map:
        if any(c == roles.decoder for c in lists[name].values()):
            roles.base = name
    for name, cls in cls_map.items():
        if roles.base and roles.base in children[name].values() and name != roles.base:
            head = [v for a, v in init_assignments(cls)
                    if (_constructed_class(v) or "").endswith("Linear") and "vocab_size" in code(v)]
            if head and roles.causal_lm is None:
                roles.causal_lm = name
    if roles.decoder is None or roles.base is None or roles.causal_lm is None:
        missing = [w for w, v in (("decoder layer", roles.decoder), ("base model with a ModuleList of decoder layers",
                                  roles.base), ("causal LM head class", roles.causal_lm)) if v is None]
        report.refuse("model structure", None, "could not find the " + ", ".join(missing))
        report.raise_if_refused()

    for attr, ctor in children[roles.decoder].items():
        if ctor in cls_map and ctor not in roles.attention and _has_linear(cls_map[ctor]):
            roles.mlp.add(ctor)
    for attr, ctor in children[roles.decoder].items():
        if ctor in cls_map and ctor not in roles.attention | roles.mlp and _has_linear(cls_map[ctor]):
            report.refuse(f"block `{ctor}` (decoder attribute `{attr}`)", lines.of(cls_map[ctor]),
                          "a decoder sub-block that is neither attention nor a feed-forward MLP")

    pretrained_roots = {n for n, c in cls_map.items() if any(b.endswith("PreTrainedModel") and b not in cls_map
                                                          for b in _base_names(c))}
    roles.pretrained = pretrained_roots
    keep = {roles.base, roles.causal_lm}
    for name, cls in cls_map.items():
        if name in keep or name in pretrained_roots:
            continue
        bases = _base_names(cls)
        if any(b in pretrained_roots for b in bases) or any(b.startswith("GenericFor") for b in bases):
            roles.dropped.add(name)
    roles.outputs = _output_classes(module, cls_map, ctx.package)
    roles.dropped |= roles.outputs & (set(cls_map) - keep)

    # a decoder forward that builds batch-shaped tensors cannot be flattened
    for name in roles.blocks:
        fwd = methods(cls_map[name]).get("forward")
        if fwd is None:
            report.refuse(f"class `{name}`", lines.of(cls_map[name]), "it has no forward method")
    report.raise_if_refused()
    for name in sorted(roles.attention):
        report.change("analyse", lines.of(cls_map[name]), f"{name}: attention (uses the attention interface)")
    for name in sorted(roles.mlp):
        report.change("analyse", lines.of(cls_map[name]), f"{name}: feed-forward block of the decoder layer")
    for role, name in (("decoder layer", roles.decoder), ("base model", roles.base), ("causal LM", roles.causal_lm)):
        report.change("analyse", lines.of(cls_map[name]), f"{name}: {role}")
    for name in sorted(roles.dropped | roles.pretrained):
        report.change("analyse", lines.of(cls_map[name]), f"{name}: training/other-task plumbing, dropped")
