"""Pass 7: the causal-LM class. Its HF body is training/generation plumbing, so it is re-rendered from
templates/causal_lm.py.j2: the base model, a `ParallelLMHead` (tied to the embedding when the config
says so), `LogitsProcessor`, `compute_logits` (keeping HF's logit post-processing such as soft-capping)
and `load_weights` with the `stacked_params_mapping` of the fusions made. The base model gains
`embed_input_ids`."""
from __future__ import annotations

import ast
import functools
import re
from importlib import resources

import jinja2
import libcst as cst
import libcst.matchers as matchers

from porter.convert.context import Pass
from porter.convert.cst_util import (
    arg_value,
    code,
    contains,
    dotted,
    init_assignments,
    loads,
    methods,
    param_names,
    parse_stmt,
    self_attr,
    self_call_attr,
)
from porter.convert.expert_weights import expert_params_mapping, mapping_alias
from porter.convert.hf_conversion_mapping import conversion_entries

# checkpoint keys that are derived buffers, never parameters
DERIVED_KEYS = [r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$"]


def _template() -> jinja2.Template:
    text = resources.files("porter.templates").joinpath("causal_lm.py.j2").read_text()
    return jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined).from_string(text)


@functools.lru_cache(maxsize=1)
def _conversion_table() -> dict[str, list[tuple[str, tuple | None]]]:
    """key -> [(transform class, (source, target) for a plain rename else None)], in order."""
    entries, _ = conversion_entries()
    return {key: [_transform(call) for call in calls] for key, calls in entries.items()}


def _transform(call) -> tuple[str, tuple | None]:
    if not isinstance(call, ast.Call):
        return ("unknown", None)
    kind = getattr(call.func, "id", None) or getattr(call.func, "attr", "unknown")
    args = {k.arg: k.value for k in call.keywords}
    for name, value in zip(("source_patterns", "target_patterns"), call.args):
        args.setdefault(name, value)
    src, dst = args.get("source_patterns"), args.get("target_patterns")
    if kind == "WeightRenaming" and isinstance(src, ast.Constant) and isinstance(dst, ast.Constant) \
            and not {"operations", "distributed_operation", "quantization_operation"} & set(args):
        return (kind, (src.value, dst.value))
    return (kind, None)


def checkpoint_renames(class_name: str, model_type: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """transformers' own on-disk -> module key renames for this class (conversion_mapping.py, looked up
    by class name, then model type); returns (renames, kinds of conversions that are more than renames)."""
    table = _conversion_table()
    for key in (class_name, model_type, mapping_alias(model_type)):  # alias: a shared mapping
        if key and table.get(key):
            renames = [pair for _, pair in table[key] if pair is not None]
            return renames, [kind for kind, pair in table[key] if pair is None]
    return [], []


class CausalLMHead(Pass):
    name = "head"
    scope = "classes"

    def visit_Module(self, node: cst.Module) -> None:
        cls = {s.name.value: s for s in node.body if isinstance(s, cst.ClassDef)}
        base = cls[self.ctx.roles.base]
        self.embed_attr = next((a for a, v in init_assignments(base) if isinstance(v, cst.Call) and (
            dotted(v.func) == "VocabParallelEmbedding" or dotted(v.func) in self.ctx.roles.embedding_subclasses)), None)

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef):
        name = updated.name.value
        if name == self.ctx.roles.base:
            if self.embed_attr is None:
                self.refuse(original, f"base model `{name}`", "no vocab embedding found for embed_input_ids")
                return updated
            method = parse_stmt(f"def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:\n"
                                f"    return self.{self.embed_attr}(input_ids)\n")
            body = list(updated.body.body)
            at = next(i for i, s in enumerate(body) if isinstance(s, cst.FunctionDef) and s.name.value == "__init__")
            method = method.with_changes(leading_lines=[cst.EmptyLine(indent=False)])
            self.note(original, f"{name}: added embed_input_ids")
            return updated.with_changes(body=updated.body.with_changes(body=body[: at + 1] + [method] + body[at + 1:]))
        if name != self.ctx.roles.causal_lm:
            return updated
        return self._render(original)

    def _render(self, cls: cst.ClassDef):
        ms = methods(cls)
        init, fwd = ms.get("__init__"), ms.get("forward")
        cfg = param_names(init)[1] if init is not None and len(param_names(init)) > 1 else "config"
        assigns = init_assignments(cls)
        base_attr = next(a for a, v in assigns if isinstance(v, cst.Call) and dotted(v.func) == self.ctx.roles.base)
        head_attr, head = next((a, v) for a, v in assigns if isinstance(v, cst.Call) and
                               (dotted(v.func) or "").endswith("Linear") and "vocab_size" in code(v))
        hidden, vocab = arg_value(head, 0, "in_features"), arg_value(head, 1, "out_features")
        bias = arg_value(head, 2, "bias")
        post = self._post_processing(cls, fwd, head_attr) if fwd is not None else []
        read = set()
        for s in post:
            read |= {n for n in _self_attrs(s)}
        carried = [code(parse_stmt(f"self.{a} = {code(v)}\n")).strip() for a, v in assigns
                   if a in read and a not in (base_attr, head_attr, "config")]
        tied = any(isinstance(s, cst.SimpleStatementLine) and "_tied_weights_keys" in code(s) for s in cls.body.body)
        packed, stacked = {}, []
        for fusions in self.ctx.fusions.values():
            for f in fusions:
                if f.fused not in packed:
                    packed[f.fused] = f.members
                    stacked += [(f.fused, m, repr(s).replace("'", '"')) for m, s in zip(f.members, f.shard_ids)]
        renames, other = checkpoint_renames(cls.name.value, self.ctx.model_type)
        renames = [*self.ctx.checkpoint_renames, *renames]  # normalisations' renames apply first
        experts = expert_params_mapping(self.ctx.moe_experts, [cls.name.value, self.ctx.model_type], other)
        if other:
            self.refuse(cls, f"checkpoint conversion {', '.join(sorted(set(other)))}",
                        "transformers converts this checkpoint with more than key renames")
        self.ctx.checkpoint_renames = renames
        text = _template().render(
            name=cls.name.value, cfg=cfg, base_attr=base_attr, base_cls=self.ctx.roles.base,
            vocab=code(vocab), hidden=code(hidden), bias=code(bias) if bias is not None else "True",
            tied=tied, embed_attr=self.embed_attr, post=[l for s in post for l in code(s).rstrip().splitlines()],
            carried=carried, packed=packed, stacked=stacked, head_attr=head_attr,
            renames=[(s.replace('"', '\\"'), d) for s, d in renames], experts=experts,
            transposed=self.ctx.transposed_keys,
        )
        try:
            new = cst.parse_statement(text).with_changes(leading_lines=cls.leading_lines)
        except cst.ParserSyntaxError as e:
            self.refuse(cls, f"causal LM `{cls.name.value}`", f"the rendered class does not parse ({e.message})")
            return cls
        self.note(cls, f"{cls.name.value}: rendered from causal_lm.py.j2 (ParallelLMHead{', tied' if tied else ''}, "
                       f"LogitsProcessor, load_weights with {len(stacked)} stacked entries"
                       f"{', ' + str(len(renames)) + ' checkpoint renames' if renames else ''})")
        for s in post:
            self.note(s, f"kept logit post-processing in compute_logits: `{code(s).strip().splitlines()[0]}`")
        return new

    def _post_processing(self, cls, fwd: cst.FunctionDef, head_attr: str) -> list[cst.BaseStatement]:
        """Statements that transform `logits` after the head, before any loss/return."""
        stmts = list(fwd.body.body)
        idx = next((i for i, s in enumerate(stmts) if contains(s, lambda n: self_call_attr(n) == head_attr)), None)
        if idx is None:
            self.refuse(fwd, "causal LM forward", f"never calls self.{head_attr}")
            return []
        head_stmt = stmts[idx]
        head_target = None
        if isinstance(head_stmt, cst.SimpleStatementLine) and isinstance(head_stmt.body[0], cst.Assign):
            head_target = code(head_stmt.body[0].targets[0].target)
        head_call = head_stmt.body[0].value if head_target else None
        head_input = head_call.args[0].value if isinstance(head_call, cst.Call) and \
            self_call_attr(head_call) == head_attr and len(head_call.args) == 1 else None
        while isinstance(head_input, cst.Subscript):  # hidden_states[:, slice_indices, :]
            head_input = head_input.value
        if head_target != "logits" or not isinstance(head_input, cst.Name):
            self.refuse(head_stmt, f"`{code(head_stmt).strip()}`",
                        f"expected `logits = self.{head_attr}(hidden_states)`; other processing around the LM head "
                        "is not understood")
            return []
        for s in stmts[:idx]:
            text = code(s)
            if isinstance(s, cst.SimpleStatementLine) and isinstance(s.body[0], cst.Expr) and \
                    isinstance(s.body[0].value, cst.SimpleString):
                continue  # docstring
            if "hidden_states" in text and not re.search(r"outputs|slice_logits_to_keep|logits_to_keep", text):
                self.refuse(s, f"`{text.strip().splitlines()[0]}`", "hidden-state processing before the LM head "
                            "is not understood")
        post = []
        for s in stmts[idx + 1:]:
            names = loads(s)
            if isinstance(s, (cst.SimpleStatementLine,)) and any(isinstance(x, cst.Return) for x in s.body):
                break
            if names["labels"] or names["loss"] or "loss" in code(s).split("=")[0]:
                break
            if not names["logits"]:
                self.refuse(s, f"`{code(s).strip().splitlines()[0]}`", "statement after the LM head not understood")
                continue
            post.append(s)
        return post


def _self_attrs(node: cst.CSTNode) -> set[str]:
    return {a for n in matchers.findall(node, matchers.Attribute()) if (a := self_attr(n))}
