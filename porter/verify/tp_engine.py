"""The engine side under tensor parallelism (`porter verify --tp N`).

One engine LLM with N worker ranks (gloo on CPU, NCCL on CUDA) serves every check; the functions
named `rank_*` run inside each rank's worker process on its ModelRunner (`LLM.collective_rpc`):
1. greedy decoding through `LLM.generate`, on the weights the engine loader put in each shard;
2. the weight report: each rank reloads the checkpoint key by key into its shard (parameters NaN
   first, as at TP=1); the per-rank reports are merged, a problem seen on some ranks only says which;
3. prefill logits of the key-by-key loaded model, gathered over the vocabulary inside the model,
   returned by rank 0;
4. on failure (or `--localise`), localisation with hooks inside rank 0 against HF in this process.
   A point compares only where rank 0 holds the whole tensor, with the same shape as HF's: embeddings,
   norms, attention and MLP blocks (after their all-reduce), decoder layers, logits. Sharded points
   (q/k/v and gate/up projections, the attention core, row-parallel layers whose input is a shard) stay
   unmatched, so a fault inside a block is named at the block.
After a TP failure the same engine model is also checked at TP=1, in this process: if it passes there
the fault is in the tensor-parallel path (a weight loader's slice, per-rank head counts, a missing
all-reduce or gather); if it fails there too the port itself is wrong, and the TP=1 localisation (every
module, shards included) is reported with it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from porter.engine.executor import WorkerError
from porter.verify import engine_side
from porter.verify.compare import Check, check_greedy, check_prefill
from porter.verify.localise import capture_engine, localise_captures
from porter.verify.prompts import extended_prompts
from porter.verify.weights import WeightReport, load_with_report

TP_FAULT_HINT = (
    "the same engine model passes at TP=1, so the fault is in the tensor-parallel path: a weight loader's "
    "slice, per-rank head counts, or a missing all-reduce / gather")


# ---------------------------------------------------------------- in each worker (rank)

def rank_weight_report(runner, ckpt: str) -> WeightReport:
    report = load_with_report(runner.model, Path(ckpt))
    engine_side.finish_loading(runner.model)
    return report


def rank_prefill_logits(runner, prompts: list[list[int]]) -> torch.Tensor:
    return engine_side.prefill_logits(runner.model, prompts, runner.device, config=runner.config)


def rank_captures(runner, sequences: list[list[int]]) -> dict:
    runner.model.engine_config = runner.config  # capture_engine enters the model's engine config
    return capture_engine(runner.model, sequences, runner.device)


# ---------------------------------------------------------------- in the verify process

def merge_weight_reports(reports: list[WeightReport]) -> WeightReport:
    """One report: every problem once, in first-seen order; one that only some ranks have says which."""
    merged = WeightReport()
    for name in vars(merged):
        seen: dict[str, list[int]] = {}
        for rank, report in enumerate(reports):
            for item in getattr(report, name):
                seen.setdefault(item, []).append(rank)
        items = getattr(merged, name)
        for item, ranks in seen.items():
            partial = len(ranks) < len(reports)
            items.append(f"{item} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} only)"
                         if partial else item)
    return merged


def run_tp_checks(opts, dtype: torch.dtype, ckpt: Path, cls: type, source, ref, report, describe) -> None:
    """Fill `report` with the TP=`opts.tp` checks, weight report and rank-0 localisation (only a failed
    `build` check when the N-rank engine does not start)."""
    device, prompts = opts.device, ref.prompts
    low_precision = dtype != torch.float32
    try:
        llm = engine_side.start_llm(ckpt, source.model_file, dtype, device, prompts, opts.max_tokens, tp=opts.tp)
    except Exception as exc:  # noqa: BLE001 - a model that cannot start on N ranks is a parity failure
        report.checks.append(Check("build", False, {}, f"the TP={opts.tp} engine did not start: "
                                                       f"{describe_tp(exc, describe)}"))
        return
    steps = _Steps(llm, describe)
    try:
        greedy, err = steps.run("greedy_tokens", lambda: check_greedy(
            engine_side.generate_greedy(llm, prompts, opts.max_tokens, opts.num_logprobs), ref.greedy,
            low_precision=low_precision, atol=opts.atol, num_logprobs=opts.num_logprobs))
        reports, err_w = steps.run("the weight report", lambda: llm.collective_rpc(rank_weight_report, (str(ckpt),)))
        if reports is not None:
            report.weights = merge_weight_reports(reports)
        prefill, err_p = steps.run("prefill_logits", lambda: check_prefill(
            llm.collective_rpc(rank_prefill_logits, (prompts,), rank0_only=True)[0], ref.logits,
            low_precision=low_precision, atol=opts.atol, hf_fp32=ref.logits_fp32))
        # the TP=1 order: prefill, greedy, logprobs
        report.checks.append(prefill if prefill is not None else Check("prefill_logits", False, {}, err_p))
        report.checks += greedy if greedy is not None else [Check("greedy_tokens", False, {}, err)]
        if err_w:
            report.notes.append(f"weight report: {err_w}")
        if opts.always_localise or not report.passed:
            sequences = extended_prompts(prompts, ref.greedy)
            caps, err = steps.run("localisation", lambda: llm.collective_rpc(
                rank_captures, (sequences,), rank0_only=True)[0])
            if caps is None:
                report.notes.append(f"localisation under TP: {err}")
            else:
                report.localisation = localise_captures(
                    caps, getattr(cls, "packed_modules_mapping", None), ref.model, sequences, device, dtype,
                    ref.model_fp32)
                report.localisation["scope"] = (
                    f"rank 0 of {opts.tp}: points whose output rank 0 holds whole (blocks after their all-reduce, "
                    "norms, embeddings, logits); sharded points are not compared")
    finally:
        llm.shutdown()


class _Steps:
    """Runs the steps on one N-rank engine. A failing rank makes the executor stop every worker, so the
    steps after it are marked as not run (naming the step that stopped it) instead of each failing anew."""

    def __init__(self, llm, describe):
        self.llm, self.describe, self.stopped_by = llm, describe, None

    def run(self, name: str, fn):
        """(fn(), None), or (None, why) when it raised or the engine had already stopped."""
        if self.stopped_by is not None:
            return None, f"not run: the TP engine stopped when {self.stopped_by} failed"
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - a crashing engine model is a parity failure, reported
            if not self.llm.runner.alive:
                self.stopped_by = name
            return None, f"engine failed: {describe_tp(exc, self.describe)}"


def describe_tp(exc: Exception, describe) -> str:
    """A worker's error in one line: its rank, what it ran, the exception and where it was raised (the
    last frame of the worker's traceback, not the executor's line that re-raised it)."""
    if not isinstance(exc, WorkerError):
        return describe(exc)
    head, _, tb = str(exc).partition("\n")
    lines = [line.strip() for line in tb.strip().splitlines()] or [""]
    frames = [re.match(r'File "([^"]+)", line (\d+)', line) for line in lines]
    last = next((m for m in reversed(frames) if m), None)
    at = f" (at {Path(last[1]).name}:{last[2]})" if last else ""
    return f"{head.removeprefix('tensor-parallel worker ').rstrip(':')}: {lines[-1]}{at}"
