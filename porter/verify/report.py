"""The verify result: one object, printed as a rich table or written as JSON (schema: docs/verify.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from porter.verify.compare import Check
from porter.verify.weights import WeightReport

SCHEMA_VERSION = 1


@dataclass
class Report:
    target: str
    checkpoint: str
    architecture: str
    engine_model: str  # "converted:<file>", "file:<file>" or "registry:<module:Class>"
    dtype: str
    device: str
    prompt_lengths: list[int]
    max_tokens: int
    checks: list[Check] = field(default_factory=list)
    weights: WeightReport | None = None  # None: the engine model was never built (conversion/build failed)
    localisation: dict | None = None  # {"divergence": {...} | None, "tolerance_rel": ..., "trace": [...]}
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tp: int = 1  # tensor_parallel_size of the engine side
    # --tp N failed: the same engine model checked at TP=1 {"passed", "checks", "weights_ok", "localisation"}
    tp1: dict | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and self.weights is not None and self.weights.ok

    @property
    def divergence(self) -> dict | None:
        return (self.localisation or {}).get("divergence")

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "target": self.target,
            "checkpoint": self.checkpoint,
            "architecture": self.architecture,
            "engine_model": self.engine_model,
            "dtype": self.dtype,
            "device": self.device,
            "tensor_parallel_size": self.tp,
            "prompt_lengths": self.prompt_lengths,
            "max_tokens": self.max_tokens,
            "checks": [c.to_dict() for c in self.checks],
            "weights": self.weights.to_dict() if self.weights is not None else None,
            "localisation": self.localisation,
            "tp1": self.tp1,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    def render(self, console: Console) -> None:
        tp = f", TP={self.tp}" if self.tp > 1 else ""
        table = Table(title=f"porter verify: {self.architecture} ({self.dtype}, {self.device}{tp})", title_justify="left")
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]"}
        for c in self.checks:
            table.add_row(c.name, mark[c.passed], c.detail)
        if self.weights is None:
            why = "the TP engine did not start or stopped first" if self.tp > 1 else "no engine model was built"
            table.add_row("weights", "-", f"not checked: {why}")
        else:
            problems = self.weights.problems()
            table.add_row("weights", mark[self.weights.ok],
                          "\n".join(problems[:12]) or "every key loaded, every parameter filled")
        if self.localisation is not None:
            d = self.divergence
            scope = self.localisation.get("scope")  # under TP: what rank 0 could compare
            table.add_row("first divergence" + (" (TP rank 0)" if scope else ""), "[red]found[/]" if d else "none",
                          (f"{d['summary']}\n{d['reason']}" + (f"\nsuspects: {', '.join(d['suspects'])}" if d["suspects"] else "")
                           if d else self.localisation.get("hint", "every module matched in prefill agrees"))
                          + (f"\n[dim]compared: {scope}[/]" if scope else ""))
        if self.tp1 is not None:
            d1 = (self.tp1["localisation"] or {}).get("divergence")
            detail = ("passes: the fault is specific to tensor parallelism" if self.tp1["passed"] else
                      "fails too" + (f"; first divergence at TP=1: {d1['summary']}" if d1 else ""))
            table.add_row("same model at TP=1", mark[self.tp1["passed"]], detail)
        console.print(table)
        for note in self.notes:
            console.print(f"[dim]note: {note}[/]")
        console.print(f"engine model: {self.engine_model}; prompts {self.prompt_lengths}, {self.max_tokens} new tokens; "
                      f"{self.seconds:.1f} s")
        console.print("[bold green]PARITY[/]" if self.passed else "[bold red]PARITY FAILED[/]")
