"""The converter: parse -> analyse -> passes -> tidy. The source is parsed, never imported or executed."""
from __future__ import annotations

import io
import re
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from porter.convert.analyse import analyse
from porter.convert.attention import AttentionCall
from porter.convert.batch_helpers import BatchOfOneHelpers
from porter.convert.context import Context, SourceLines
from porter.convert.engine_activation import engine_activation
from porter.convert.engine_norms import engine_norms
from porter.convert.engine_residual import engine_residual
from porter.convert.qk_norm_rotary import qk_norm_rotary
from porter.convert.residual_stream import residual_stream
from porter.convert.engine_rotary import engine_rotary
from porter.convert.flatten import FlattenForward
from porter.convert.head import DERIVED_KEYS, CausalLMHead
from porter.convert.imports import ResolveRelativeImports
from porter.convert.layout import tidy_layout
from porter.convert.normalise_constants import normalise_constants, propagate_constants
from porter.convert.normalise_conv1d import normalise_conv1d
from porter.convert.normalise_function_dropout import normalise_function_dropout
from porter.convert.normalise_heads import normalise_kv_heads
from porter.convert.normalise_inline_attention import normalise_inline_attention
from porter.convert.normalise_inputs import normalise_inputs
from porter.convert.normalise_mla import drop_line_padding, normalise_mla
from porter.convert.normalise_moe import normalise_moe
from porter.convert.normalise_logits_name import normalise_logits_name
from porter.convert.normalise_return_dict import normalise_return_dict
from porter.convert.normalise_positions import positions_given, unused_embedding_inputs
from porter.convert.normalise_shapes import normalise_shapes
from porter.convert.normalise_wrapper import normalise_wrapper
from porter.convert.parallel import ParallelLinears
from porter.convert.plumbing import DropPlumbing
from porter.convert.prefix import ThreadPrefix
from porter.convert.report import ConversionError, Report
from porter.convert.specialise import DropDropout, InferenceFacts, prune, signatures
from porter.convert.tidy import Tidy

# identifiers that must not survive an inference port (a test scans the output for them too)
FORBIDDEN = ("training", "past_key_values", "attention_mask", "labels", "output_attentions")
# ... and as identifiers only (prose such as "KV-cache" may stay): transformers >= 5.24's name for the KV cache
FORBIDDEN_NAMES = ("cache",)

HEADER = '''"""{name}: engine model converted by `porter convert` from {source}.

Flat [num_tokens] inputs, paged attention through the engine's Attention layer, tensor-parallel
layers, and load_weights for the HF checkpoint layout.
"""
'''


@dataclass
class ConvertResult:
    code: str
    report: Report
    architecture: str


def transformers_package(path: Path) -> str | None:
    """`.../transformers/models/llama/modeling_llama.py` -> "transformers.models.llama"."""
    parts = path.resolve().parts
    if "transformers" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("transformers")
    return ".".join(parts[i:-1])


def convert_source(source: str, filename: str = "<source>", *, package: str | None = None,
                   model_type: str | None = None) -> ConvertResult:
    report = Report(filename)
    t0 = time.perf_counter()
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as e:
        report.refuse("Python source", e.raw_line, f"does not parse: {e.message}")
        raise ConversionError(filename, report.refusals) from None
    ctx = Context(filename=filename, report=report, lines=SourceLines(module), package=package,
                  model_type=model_type)
    report.timings["parse"] = time.perf_counter() - t0

    def step(label, fn):
        nonlocal module
        t = time.perf_counter()
        module = fn(module)
        report.timings[label] = report.timings.get(label, 0.0) + time.perf_counter() - t
        report.raise_if_refused()

    # normalisations: older or MoE idioms rewritten into the forms the passes below convert
    step("mla", lambda m: normalise_mla(m, ctx))
    step("inline_attention", lambda m: normalise_inline_attention(m, ctx))
    step("shapes", lambda m: normalise_shapes(m, ctx))
    step("moe", lambda m: normalise_moe(m, ctx))
    step("conv1d", lambda m: normalise_conv1d(m, ctx))
    step("wrapper", lambda m: normalise_wrapper(m, ctx))
    step("return_dict", lambda m: normalise_return_dict(m, ctx))
    step("logits_name", lambda m: normalise_logits_name(m, ctx))
    step("function_dropout", lambda m: normalise_function_dropout(m, ctx))
    # the normalisations rebuild the tree: index lines on the code the passes see (the source itself
    # unless a normalisation rewrote something)
    ctx.lines = SourceLines(module)
    step("mla", drop_line_padding)
    step("analyse", lambda m: (analyse(m, ctx), m)[1])
    step("constants", lambda m: normalise_constants(m, ctx, facts=[positions_given]))
    step("positions", lambda m: unused_embedding_inputs(m, ctx))
    step("inputs", lambda m: normalise_inputs(m, ctx))
    step("imports", lambda m: m.visit(ResolveRelativeImports(ctx)))
    step("plumbing", lambda m: m.visit(DropPlumbing(ctx)))
    assumed = signatures(module)
    step("specialise", lambda m: m.visit(InferenceFacts(ctx)).visit(DropDropout(ctx)))
    # locals the facts made constant (`is_cross_attention = False`), then fold what they guard
    step("specialise", lambda m: propagate_constants(m, ctx, lambda n: n.visit(InferenceFacts(ctx))))

    def _prune(m):
        nonlocal assumed
        m, assumed = prune(m, ctx, assumed)
        return m

    step("specialise", _prune)
    step("flatten", lambda m: m.visit(FlattenForward(ctx)).visit(BatchOfOneHelpers(ctx)))
    step("parallel", lambda m: m.visit(ParallelLinears(ctx)))
    step("heads", lambda m: normalise_kv_heads(m, ctx))
    step("attention", lambda m: m.visit(AttentionCall(ctx)))
    step("specialise", _prune)
    step("prefix", lambda m: m.visit(ThreadPrefix(ctx)))
    step("head", lambda m: m.visit(CausalLMHead(ctx)))
    skipped = DERIVED_KEYS + list(ctx.ignore_unexpected)
    step("tidy", lambda m: Tidy(ctx, skipped).run(m))
    step("engine_norms", lambda m: engine_norms(m, ctx))
    step("engine_residual", lambda m: engine_residual(m, ctx))
    step("residual_stream", lambda m: residual_stream(m, ctx))
    step("engine_rotary", lambda m: engine_rotary(m, ctx))
    step("qk_norm_rotary", lambda m: qk_norm_rotary(m, ctx))
    step("engine_activation", lambda m: engine_activation(m, ctx))
    step("layout", tidy_layout)
    step("header", lambda m: _with_header(m, ctx, filename))
    out = module.code
    _check_leftovers(out, ctx)
    report.raise_if_refused()
    report.timings["total"] = time.perf_counter() - t0
    return ConvertResult(out, report, ctx.roles.causal_lm)


def _with_header(module: cst.Module, ctx: Context, filename: str) -> cst.Module:
    doc = cst.parse_module(HEADER.format(name=ctx.roles.causal_lm, source=Path(filename).name)).body
    body = list(module.body)
    while body and isinstance(body[0], cst.SimpleStatementLine) and isinstance(body[0].body[0], cst.Expr):
        body.pop(0)  # HF module docstring
    return module.with_changes(header=[], body=[*doc, *body])


def leftover_names(text: str) -> list[tuple[str, int]]:
    """(name, line) of each FORBIDDEN_NAMES identifier in generated code (not in strings or comments)."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return [(t.string, t.start[0]) for t in tokens if t.type == tokenize.NAME and t.string in FORBIDDEN_NAMES]


def _check_leftovers(text: str, ctx: Context) -> None:
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        stripped = line.split("#", 1)[0]
        for word in FORBIDDEN:
            if re.search(rf"\b{word}\b", stripped):
                ctx.report.refuse(f"leftover `{word}`", None,
                                  f"generated line {i} still mentions it: {line.strip()[:80]}")
    for name, i in leftover_names(text):
        ctx.report.refuse(f"leftover `{name}`", None,
                          f"generated line {i} still uses it: {lines[i - 1].strip()[:80]}")


def convert_file(path: str | Path, model_type: str | None = None) -> ConvertResult:
    path = Path(path)
    return convert_source(path.read_text(), str(path), package=transformers_package(path), model_type=model_type)
