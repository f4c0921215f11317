"""`porter convert SRC -o DEST.py`: rewrite a HF modeling file (or a transformers model type's) into an
engine model file; prints what each pass changed, with source lines; exits 1 on anything it refuses."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        src: str = typer.Argument(..., help="modeling_*.py file, or a transformers model type (e.g. qwen2)"),
        output: Path = typer.Option(..., "--output", "-o", help="engine model file to write"),
        config: Optional[str] = typer.Option(None, "--config", help="config.json or checkpoint dir (model type)"),
        report: Optional[Path] = typer.Option(None, "--report", help="write every change and refusal as JSON"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="only the one-line result"),
    ) -> None:
        """Convert SRC into an engine model file (flat tokens, paged attention, TP layers, load_weights)."""
        from porter.convert import ConversionError, convert_source
        from porter.convert.pipeline import transformers_package
        from porter.convert.source import SourceError, model_type_from_config, resolve_source

        out, err = Console(highlight=False), Console(stderr=True, highlight=False)
        try:
            path, model_type = resolve_source(src)
            if config is not None:
                model_type = model_type_from_config(config)
        except SourceError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(2)
        package = transformers_package(path)
        try:
            result = convert_source(path.read_text(), str(path), package=package, model_type=model_type)
        except ConversionError as e:
            if report is not None:
                from porter.convert.report import Report

                report.write_text(Report(str(path), refusals=e.refusals).to_json())
            for r in e.refusals:
                err.print(f"[red]refused[/red] {escape(f'{path.name}:{r.line or chr(63)}')}: "
                          f"{escape(r.construct)}: {escape(r.why)}")
            raise typer.Exit(1)
        except Exception as e:  # a converter bug: still one clear line and a failing exit code
            err.print(f"[red]error:[/red] porter convert failed on {escape(str(path))}: "
                      f"{type(e).__name__}: {escape(str(e).splitlines()[0] if str(e) else '')} (a converter bug)")
            raise typer.Exit(1)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(result.code)
        if report is not None:
            report.write_text(result.report.to_json())
        if not quiet:
            _summary(out, result.report, path.name)
        out.print(f"[green]wrote[/green] {escape(str(output))} ({result.architecture}) "
                  f"in {result.report.timings.get('total', 0):.2f} s")


def _summary(out: Console, report, source: str) -> None:
    table = Table(title=f"porter convert {source}", show_lines=False)
    table.add_column("pass")
    table.add_column("line", justify="right")
    table.add_column("change")
    for name, changes in report.by_pass().items():
        for i, c in enumerate(changes):
            table.add_row(name if i == 0 else "", str(c.line or ""), escape(c.message))
    out.print(table)
