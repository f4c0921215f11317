"""Shared by the converter's single-pass tests: run one module-level pass over a snippet."""
from __future__ import annotations

import libcst as cst

from porter.convert.context import Context, SourceLines
from porter.convert.report import Report


def run_pass(pass_fn, source: str, filename: str = "m.py") -> tuple[str, list[str]]:
    """(the rewritten code, the pass's report messages); the pass must refuse nothing."""
    module = cst.parse_module(source)
    ctx = Context(filename=filename, report=Report(filename), lines=SourceLines(module), package=None)
    out = pass_fn(module, ctx)
    assert not ctx.report.refusals
    return out.code, [c.message for c in ctx.report.changes]
