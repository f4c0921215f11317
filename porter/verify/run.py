"""`verify(options) -> Report`: the whole parity run, HF reference against the engine, same weights."""
from __future__ import annotations

import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from porter.engine.tp_check import tp_split_problems
from porter.verify import checkpoint, engine_side, reference, tp_engine
from porter.verify.compare import Check, check_greedy, check_prefill
from porter.verify.errors import VerifyInputError
from porter.verify.localise import localise
from porter.verify.model_source import ConversionFailed, ModelSource, choose
from porter.verify.prompts import extended_prompts, make_prompts
from porter.verify.report import Report
from porter.verify.tiny import make_tiny_checkpoint
from porter.verify.weights import load_with_report

SMALL_MODEL_BYTES = 64 * 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VerifyOptions:
    target: str
    model_file: Path | None = None
    tiny: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    prompts: int = 4
    max_tokens: int = 8
    atol: float = 2e-3
    num_logprobs: int = 5
    seed: int = 0
    builtin: bool = False  # test the registry's engine model instead of converting
    always_localise: bool = False
    tp: int = 1  # tensor_parallel_size of the engine side (N worker processes)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def cpu_threads(device: str, ckpt: Path):
    """One intra-op thread for small models on CPU: their matmuls are microseconds, and thread
    hand-offs (worse on a loaded machine) cost more than that, 100x more measured on 2 busy cores."""
    small = sum(f.stat().st_size for f in checkpoint.safetensors_files(ckpt)) < SMALL_MODEL_BYTES
    previous = torch.get_num_threads()
    if device == "cpu" and small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def verify(opts: VerifyOptions) -> Report:
    if opts.dtype not in DTYPES:
        raise VerifyInputError(f"--dtype must be one of {', '.join(DTYPES)}, not {opts.dtype!r}")
    if opts.max_tokens < 1 or opts.prompts < 1 or opts.num_logprobs < 1:
        raise VerifyInputError("--prompts, --max-tokens and --logprobs must be at least 1")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise VerifyInputError(f"--device {opts.device}: CUDA is not available here")
    if opts.tp < 1:
        raise VerifyInputError(f"--tp must be at least 1, not {opts.tp}")
    if opts.tp > 1 and opts.device.startswith("cuda") and torch.cuda.device_count() < opts.tp:
        raise VerifyInputError(f"--tp {opts.tp} needs {opts.tp} GPUs (one per rank); "
                               f"{torch.cuda.device_count()} visible")
    _quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="porter-verify-") as tmp:
        start = time.perf_counter()
        if opts.tiny:
            ckpt = make_tiny_checkpoint(opts.target, Path(tmp) / "tiny", seed=opts.seed)
        else:
            ckpt = checkpoint.check_dir(opts.target)
        with cpu_threads(opts.device, ckpt):
            report = _run(opts, ckpt, Path(tmp))
        report.seconds = time.perf_counter() - start
        return report


@dataclass
class Reference:
    """Everything HF computes once for a checkpoint, prompts and dtype; several engine models can be
    checked against one Reference (the fault tests do)."""

    model: torch.nn.Module
    prompts: list[list[int]]
    logits: torch.Tensor  # prefill logits in the verify dtype
    logits_fp32: torch.Tensor | None  # prefill logits in fp32, for the low-precision error ratio
    greedy: list[reference.Greedy]
    model_fp32: torch.nn.Module | None = None  # low precision only: per-module error ratios in localisation


def reference_run(opts: VerifyOptions, ckpt: Path, hf_config) -> Reference:
    dtype, device = DTYPES[opts.dtype], opts.device
    prompts = make_prompts(opts.prompts, hf_config.vocab_size, opts.seed)
    model = reference.load_hf_model(ckpt, dtype, device)
    hf_fp32 = logits_fp32 = None
    if dtype != torch.float32:
        hf_fp32 = reference.load_hf_model(ckpt, torch.float32, device)
        logits_fp32 = reference.prefill_logits(hf_fp32, prompts, device)
    return Reference(model, prompts, reference.prefill_logits(model, prompts, device), logits_fp32,
                     reference.greedy(model, prompts, opts.max_tokens, device), hf_fp32)


def _run(opts: VerifyOptions, ckpt: Path, tmp: Path) -> Report:
    hf_config = checkpoint.load_config(ckpt)
    problems = tp_split_problems(hf_config, opts.tp)
    if problems:
        raise VerifyInputError(f"the model cannot be split over --tp {opts.tp}: " + "; ".join(problems))
    notes: list[str] = []
    try:
        source = choose(ckpt, hf_config, opts.model_file, opts.builtin, tmp / "converted", notes)
    except ConversionFailed as exc:  # the architecture does not convert: a verdict, not a usage error
        report = _empty_report(opts, ckpt, hf_config, "converted", notes)
        report.checks.append(Check("convert", False, {}, str(exc)))
        return report
    cls = engine_side.resolve_model_class(hf_config, source.model_file)  # before HF runs: fail fast on bad input
    ref = reference_run(opts, ckpt, hf_config)
    return check_engine(opts, ckpt, hf_config, cls, source, ref, notes)


def check_engine(opts: VerifyOptions, ckpt: Path, hf_config, cls: type, source: ModelSource, ref: Reference,
                 notes: list[str] | None = None) -> Report:
    """Build and load engine model `cls`, run every check against `ref`, localise on failure."""
    if opts.tp > 1:
        return check_engine_tp(opts, ckpt, hf_config, cls, source, ref, notes)
    dtype, device = DTYPES[opts.dtype], opts.device
    low_precision = dtype != torch.float32
    prompts = ref.prompts
    report = _empty_report(opts, ckpt, hf_config, source.label, notes, prompts)
    # the engine model itself, built and loaded key by key: weight report and prefill logits
    try:
        engine_model = engine_side.build_model(cls, hf_config, dtype, device)
    except Exception as exc:  # noqa: BLE001 - the model under test cannot even be constructed
        report.checks.append(Check("build", False, {}, _describe(exc)))
        return report
    report.weights = load_with_report(engine_model, ckpt)
    engine_side.finish_loading(engine_model)
    try:
        engine_logits = engine_side.prefill_logits(engine_model, prompts, device)
        report.checks.append(check_prefill(engine_logits, ref.logits, low_precision=low_precision, atol=opts.atol,
                                           hf_fp32=ref.logits_fp32))
    except Exception as exc:  # noqa: BLE001 - a crashing engine model is a parity failure, reported
        report.checks.append(Check("prefill_logits", False, {}, _describe(exc)))

    # greedy decoding through LLM, every prompt in one batch (paged KV cache, scheduler, sampler)
    try:
        engine_greedy = engine_side.greedy(ckpt, source.model_file, dtype, device, prompts, opts.max_tokens,
                                           opts.num_logprobs)
        report.checks.extend(check_greedy(engine_greedy, ref.greedy, low_precision=low_precision, atol=opts.atol,
                                          num_logprobs=opts.num_logprobs))
    except Exception as exc:  # noqa: BLE001
        report.checks.append(Check("greedy_tokens", False, {}, f"engine LLM failed: {_describe(exc)}"))

    if opts.always_localise or not report.passed:
        try:
            report.localisation = localise(engine_model, ref.model, extended_prompts(prompts, ref.greedy), device,
                                           dtype, ref.model_fp32)
        except Exception as exc:  # noqa: BLE001 - localisation is best effort on top of the verdict
            report.notes.append(f"localisation failed: {_describe(exc)}")
        else:
            _add_decode_hint(report)
    return report


def check_engine_tp(opts: VerifyOptions, ckpt: Path, hf_config, cls: type, source: ModelSource, ref: Reference,
                    notes: list[str] | None = None) -> Report:
    """The checks on a TP=`opts.tp` engine (porter/verify/tp_engine.py); on failure the same engine model is
    also checked at TP=1 to tell a tensor-parallel fault from a fault of the port itself."""
    report = _empty_report(opts, ckpt, hf_config, source.label, notes, ref.prompts)
    tp_engine.run_tp_checks(opts, DTYPES[opts.dtype], ckpt, cls, source, ref, report, _describe)
    if report.localisation is not None:
        _add_decode_hint(report)
    if not report.passed:
        one = check_engine(replace(opts, tp=1), ckpt, hf_config, cls, source, ref)
        report.tp1 = {"passed": one.passed, "checks": [c.to_dict() for c in one.checks],
                      "weights_ok": one.weights is not None and one.weights.ok, "localisation": one.localisation}
        report.notes.append(tp_engine.TP_FAULT_HINT if one.passed else
                            "the engine model fails at TP=1 too: the port itself is wrong; tp1.localisation "
                            "compares every module at TP=1, shards included")
    return report


def _add_decode_hint(report: Report) -> None:
    decode_failed = any(not c.passed for c in report.checks if c.name in ("greedy_tokens", "logprobs"))
    if report.localisation["divergence"] is None and decode_failed:
        report.localisation["hint"] = (
            "without a KV cache the engine model agrees with HF module by module on the prompts "
            "extended by the generated tokens, so the fault is in the decode path: KV cache "
            "write/read, block tables, decode attention, sampler or scheduler")


def _empty_report(opts, ckpt, hf_config, label, notes, prompts=()) -> Report:
    return Report(
        target=opts.target, checkpoint=str(ckpt), architecture=",".join(hf_config.architectures or ["?"]),
        engine_model=label, dtype=opts.dtype, device=opts.device, tp=opts.tp,
        prompt_lengths=[len(p) for p in prompts], max_tokens=opts.max_tokens, notes=list(notes or []),
    )


def _describe(exc: Exception) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}".replace("\n", " ")
