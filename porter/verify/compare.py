"""The parity checks: prefill logits, greedy tokens, per-position logprobs.

fp32: logits and logprobs must agree within `atol`; greedy tokens must be identical, except that a
divergence between two candidates HF itself scores within `atol` of each other (a tie) is accepted.
bf16/fp16: vLLM's `check_logprobs_close` rule (tokens equal until the first divergence, where each
side's token must be in the other's top-k), and on prefill logits the scale-free error ratio
||engine_lowp - HF_fp32|| / ||HF_lowp - HF_fp32|| <= ERROR_RATIO_LIMIT: the port may add no more error
than running HF itself in low precision.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from porter.verify.engine_side import EngineGreedy
from porter.verify.reference import Greedy

ERROR_RATIO_LIMIT = 1.2


@dataclass
class Check:
    name: str
    passed: bool
    metrics: dict = field(default_factory=dict)
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _errors(engine: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (engine.float() - ref.float()).abs()
    scale = ref.float().abs().max().item()
    max_abs = diff.max().item()
    return {"max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-12), "mean_abs": diff.mean().item()}


def check_prefill(
    engine: torch.Tensor, hf: torch.Tensor, *, low_precision: bool, atol: float, hf_fp32: torch.Tensor | None = None
) -> Check:
    if engine.shape != hf.shape:
        return Check("prefill_logits", False, {}, f"shape {list(engine.shape)} (engine) vs {list(hf.shape)} (HF)")
    metrics = _errors(engine, hf)
    if not torch.isfinite(engine).all():
        return Check("prefill_logits", False, metrics, "engine logits contain NaN/inf")
    if not low_precision:
        ok = metrics["max_abs"] <= atol
        return Check("prefill_logits", ok, metrics, f"max abs {metrics['max_abs']:.2e} {'<=' if ok else '>'} atol {atol:g}")
    num = torch.linalg.vector_norm(engine.float() - hf_fp32.float()).item()
    den = torch.linalg.vector_norm(hf.float() - hf_fp32.float()).item()
    ratio = num / max(den, 1e-12)
    metrics.update(error_ratio=ratio, engine_vs_hf_fp32=num, hf_lowp_vs_hf_fp32=den)
    ok = ratio <= ERROR_RATIO_LIMIT
    return Check(
        "prefill_logits", ok, metrics,
        f"error ratio {ratio:.3f} {'<=' if ok else '>'} {ERROR_RATIO_LIMIT} (max abs vs HF same dtype {metrics['max_abs']:.2e})",
    )


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_greedy(
    engine: list[EngineGreedy], hf: list[Greedy], *, low_precision: bool, atol: float, num_logprobs: int
) -> tuple[Check, Check]:
    """(greedy_tokens, logprobs). Logprobs are compared only where both sides saw the same context."""
    token_problems, logprob_problems = [], []
    divergences, worst = [], 0.0
    for i, (e, h) in enumerate(zip(engine, hf)):
        d = _first_divergence(e.token_ids, h.token_ids)
        divergences.append(d)
        shared = len(h.token_ids) if d is None else min(d + 1, len(e.logprobs), len(h.logprobs))
        for pos in range(shared):
            for token, lp in e.logprobs[pos].items():
                err = abs(lp - h.logprobs[pos][token].item())
                worst = max(worst, err)
                if not low_precision and err > atol and len(logprob_problems) < 5:
                    logprob_problems.append(f"prompt {i} step {pos} token {token}: |{lp:.5f} - {h.logprobs[pos][token].item():.5f}| > {atol:g}")
        if d is None:
            continue
        if d >= min(len(e.token_ids), len(h.token_ids)):
            token_problems.append(f"prompt {i}: engine made {len(e.token_ids)} tokens, HF {len(h.token_ids)}")
            continue
        et, ht = e.token_ids[d], h.token_ids[d]
        hf_lp = h.logprobs[d]
        if low_precision:
            hf_topk = set(torch.topk(hf_lp, num_logprobs).indices.tolist())
            tie = et in hf_topk and ht in e.logprobs[d]
            why = f"engine {et} {'in' if et in hf_topk else 'NOT in'} HF top-{num_logprobs}, HF {ht} {'in' if ht in e.logprobs[d] else 'NOT in'} engine top-{num_logprobs}"
        else:
            gap = abs(hf_lp[ht].item() - hf_lp[et].item())
            tie = gap <= atol
            why = f"HF logprob gap {gap:.2e} {'<=' if tie else '>'} atol"
        if not tie:
            token_problems.append(f"prompt {i} step {d}: engine {et} vs HF {ht} ({why})")
            if low_precision:
                logprob_problems.append(f"prompt {i} step {d}: {why}")
    n_diverged = sum(d is not None for d in divergences)
    greedy_check = Check(
        "greedy_tokens", not token_problems,
        {"prompts": len(hf), "diverged": n_diverged, "first_divergence": divergences},
        "; ".join(token_problems) or (f"identical on all {len(hf)} prompts" if not n_diverged
                                      else f"{n_diverged} prompt(s) diverge at near-ties only"),
    )
    rule = "vLLM check_logprobs_close (top-k)" if low_precision else f"abs error <= {atol:g}"
    logprob_check = Check(
        "logprobs", not logprob_problems, {"max_abs": worst, "rule": rule},
        "; ".join(logprob_problems) or f"max abs error {worst:.2e} ({rule})",
    )
    return greedy_check, logprob_check
