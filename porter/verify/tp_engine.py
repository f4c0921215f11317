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

from pathlib import Path

import torch

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


def run_tp_checks(opts, dtype: torch.dtype, ckpt: Path, cls: type, source, ref, report, describe) -> bool:
    """Fill `report` with the TP=`opts.tp` checks, weight report and rank-0 localisation. Returns whether
    the engine ran (False: it did not start, and only a `build` check was added)."""
    device, prompts = opts.device, ref.prompts
    low_precision = dtype != torch.float32
    try:
        llm = engine_side.start_llm(ckpt, source.model_file, dtype, device, prompts, opts.max_tokens, tp=opts.tp)
    except Exception as exc:  # noqa: BLE001 - a model that cannot start on N ranks is a parity failure
        report.checks.append(Check("build", False, {}, f"the TP={opts.tp} engine did not start: {describe(exc)}"))
        return False
    try:
        greedy_checks = _step(report, "greedy_tokens", lambda: check_greedy(
            engine_side.generate_greedy(llm, prompts, opts.max_tokens, opts.num_logprobs), ref.greedy,
            low_precision=low_precision, atol=opts.atol, num_logprobs=opts.num_logprobs), describe)
        reports = _try(lambda: llm.collective_rpc(rank_weight_report, (str(ckpt),)), report, "weight report", describe)
        if reports is not None:
            report.weights = merge_weight_reports(reports)
        prefill = _step(report, "prefill_logits", lambda: [check_prefill(
            llm.collective_rpc(rank_prefill_logits, (prompts,), rank0_only=True)[0], ref.logits,
            low_precision=low_precision, atol=opts.atol, hf_fp32=ref.logits_fp32)], describe)
        report.checks[:0] = prefill  # the TP=1 order: prefill, greedy, logprobs
        report.checks.extend(greedy_checks)
        if opts.always_localise or not report.passed:
            sequences = extended_prompts(prompts, ref.greedy)
            caps = _try(lambda: llm.collective_rpc(rank_captures, (sequences,), rank0_only=True)[0],
                        report, "localisation in rank 0", describe)
            if caps is not None:
                report.localisation = localise_captures(
                    caps, getattr(cls, "packed_modules_mapping", None), ref.model, sequences, device, dtype,
                    ref.model_fp32)
                report.localisation["scope"] = (
                    f"rank 0 of {opts.tp}: points whose output rank 0 holds whole (blocks after their all-reduce, "
                    "norms, embeddings, logits); sharded points are not compared")
    finally:
        llm.shutdown()
    return True


def _step(report, name: str, fn, describe) -> list[Check]:
    """The checks `fn` returns, or one failed check `name` when it raises (a crashed rank stops the engine,
    so the steps after it fail with "shut down", which the report also says)."""
    try:
        return list(fn())
    except Exception as exc:  # noqa: BLE001 - a crashing engine model is a parity failure, reported
        return [Check(name, False, {}, f"engine failed: {describe(exc)}")]


def _try(fn, report, what: str, describe):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        report.notes.append(f"{what} failed: {describe(exc)}")
        return None
