"""`porter verify`: parity of an engine model with the HF reference, and where it breaks (docs/verify.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

EXIT_PARITY, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify(
        target: str = typer.Argument(..., help="checkpoint directory; with --tiny a model type (llama) or config path"),
        model_file: Optional[Path] = typer.Option(None, "--model-file", help="engine model file to test (default: convert on the fly)"),
        tiny: bool = typer.Option(False, "--tiny", help="make a tiny random checkpoint from TARGET's config class"),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        prompts: int = typer.Option(4, "--prompts", help="ragged batch size (random token prompts, seeded)"),
        max_tokens: int = typer.Option(8, "--max-tokens", help="greedy decode steps"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON to this file"),
        atol: float = typer.Option(2e-3, "--atol", help="fp32 tolerance on logits and logprobs (absolute)"),
        logprobs: int = typer.Option(5, "--logprobs", help="top-k logprobs compared per step"),
        seed: int = typer.Option(0, "--seed", help="seed of the prompts and the tiny checkpoint"),
        builtin: bool = typer.Option(False, "--builtin", help="test the registry's engine model, do not convert"),
        localise: bool = typer.Option(False, "--localise", help="run the module-by-module comparison even on parity"),
        tp: int = typer.Option(1, "--tp", help="tensor-parallel size of the engine side: N worker processes "
                                               "(gloo on CPU, NCCL on CUDA, one GPU per rank)"),
    ) -> None:
        """Check the engine against HF transformers on the same weights: prefill logits, greedy tokens,
        logprobs, the weight report; on a mismatch name the first module that diverges.
        Exit code 0 = parity, 1 = parity failure, 2 = bad input."""
        err = Console(stderr=True, highlight=False)
        from porter.verify.errors import VerifyInputError
        from porter.verify.run import VerifyOptions, verify as run_verify

        if model_file is not None and builtin:
            err.print("[red]error:[/] --model-file and --builtin exclude each other")
            raise typer.Exit(EXIT_USAGE)
        opts = VerifyOptions(
            target=target, model_file=model_file.resolve() if model_file else None, tiny=tiny, dtype=dtype,
            device=device, prompts=prompts, max_tokens=max_tokens, atol=atol, num_logprobs=logprobs, seed=seed,
            builtin=builtin, always_localise=localise, tp=tp,
        )
        try:
            report = run_verify(opts)
        except VerifyInputError as exc:
            err.print(f"[red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_USAGE)
        report.render(Console(highlight=False))
        if json_out is not None:
            json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        raise typer.Exit(EXIT_PARITY if report.passed else EXIT_MISMATCH)
