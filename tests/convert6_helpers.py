"""Shared by the test_convert6_* files: convert an installed transformers model type and verify it."""
from __future__ import annotations

from porter.convert import convert_file
from porter.convert.source import resolve_source
from porter.verify.run import VerifyOptions, verify

NEW_TOKENS = 12


def convert(model_type: str, tmp_path):
    path, mt = resolve_source(model_type)
    result = convert_file(path, model_type=mt)
    out = tmp_path / f"{model_type}_engine.py"
    out.write_text(result.code)
    return result, out


def verify_tiny(target: str, model_file) -> None:
    """porter verify --tiny: prefill logits, greedy tokens of the paged engine equal HF's for 4 prompts
    over 12 new tokens, logprobs within 2e-3 (fp32, CPU), and a clean weight report."""
    report = verify(VerifyOptions(target=target, tiny=True, model_file=model_file, max_tokens=NEW_TOKENS))
    failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.passed]
    assert report.passed, failed
    assert {"prefill_logits", "greedy_tokens", "logprobs"} <= {c.name for c in report.checks}
    w = report.weights
    assert not (w.unused_keys or w.unfilled_params or w.shape_errors or w.load_errors), w
