"""What a conversion changed and what it refused, with source line numbers (the `--report` JSON)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Change:
    pass_name: str
    line: int | None
    message: str


@dataclass
class Refusal:
    construct: str
    line: int | None
    why: str


class ConversionError(Exception):
    """A construct the converter cannot rewrite safely; names the construct, file:line and why."""

    def __init__(self, filename: str, refusals: list[Refusal]):
        self.filename, self.refusals = filename, list(refusals)
        lines = [f"{filename}:{r.line or '?'}: cannot convert {r.construct}: {r.why}" for r in self.refusals]
        super().__init__("\n".join(lines))


@dataclass
class Report:
    filename: str
    changes: list[Change] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def change(self, pass_name: str, line: int | None, message: str) -> None:
        self.changes.append(Change(pass_name, line, message))

    def refuse(self, construct: str, line: int | None, why: str) -> None:
        self.refusals.append(Refusal(construct, line, why))

    def raise_if_refused(self) -> None:
        if self.refusals:
            raise ConversionError(self.filename, self.refusals)

    def by_pass(self) -> dict[str, list[Change]]:
        out: dict[str, list[Change]] = {}
        for c in self.changes:
            out.setdefault(c.pass_name, []).append(c)
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": self.filename,
                "ok": not self.refusals,
                "changes": [asdict(c) for c in self.changes],
                "refusals": [asdict(r) for r in self.refusals],
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            },
            indent=2,
        )
