"""`porter run`: generate from a prompt on the bundled engine, streaming to the terminal."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape


def bundled_fixture() -> Path:
    """fixtures/tiny-llama of the checkout porter runs from (repo root = parent of the porter package)."""
    import porter

    return Path(porter.__file__).resolve().parent.parent / "fixtures" / "tiny-llama"


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        ckpt: Optional[Path] = typer.Argument(None, help="HF checkpoint directory (default: the bundled fixtures/tiny-llama)"),
        prompt: str = typer.Option(..., "--prompt", "-p", help="text to complete"),
        max_tokens: int = typer.Option(64, "--max-tokens", help="tokens to generate at most"),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(-1, "--top-k", help="-1 = off"),
        seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed (reproducible output)"),
        ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep going past the end-of-sequence token"),
        model_file: Optional[Path] = typer.Option(None, "--model-file", help="converted engine model file (porter convert)"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory (default: CKPT)"),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                               help="let transformers run the checkpoint's own config code (auto_map)"),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
        dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16"),
        tp: int = typer.Option(1, "--tp", help="tensor-parallel size: N worker processes (one GPU each on CUDA)"),
    ) -> None:
        """Generate a completion of PROMPT with the engine, streamed, then print token counts and speed."""
        out = Console(highlight=False)
        err = Console(stderr=True, highlight=False)
        try:
            from porter.engine import LLM, SamplingParams

            if ckpt is None:
                ckpt = bundled_fixture()
                if not ckpt.is_dir():
                    raise FileNotFoundError(f"no checkpoint given and the bundled fixture is missing ({ckpt})")
            params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                    seed=seed, ignore_eos=ignore_eos)
            if model_file is not None and not model_file.is_file():
                raise FileNotFoundError(f"model file not found: {model_file}")
            llm = LLM(model=ckpt, model_file=model_file, tokenizer=tokenizer, device=device, dtype=dtype,
                      tensor_parallel_size=tp, trust_remote_code=trust_remote_code)
            out.print(f"[bold]{escape(prompt)}[/bold]", end="")
            start = time.perf_counter()
            final = None
            for delta in llm.generate_stream(prompt, params):
                out.print(escape(delta.text), end="", soft_wrap=True)
                final = delta.output
            elapsed = time.perf_counter() - start
            out.print()
        except Exception as e:  # one clear line, no traceback
            err.print(f"[red]error:[/red] {escape(_describe(e))}")
            raise typer.Exit(1)
        if final.error:
            err.print(f"[red]error:[/red] {escape(final.error)}")
            raise typer.Exit(1)
        n_out = len(final.outputs[0].token_ids)
        out.print(f"[dim]prompt tokens: {len(final.prompt_token_ids)}, generated tokens: {n_out}, "
                  f"{n_out / elapsed:.1f} tokens/s, finish: {final.outputs[0].finish_reason} "
                  f"({llm.engine_config.device}, {str(llm.engine_config.dtype).removeprefix('torch.')})[/dim]",
                  soft_wrap=True)


def _describe(e: Exception) -> str:
    if isinstance(e, (FileNotFoundError, ValueError, NotImplementedError)):
        return str(e)
    return f"{type(e).__name__}: {e}"
