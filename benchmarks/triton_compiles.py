"""Which Triton kernel variants compile inside a timed region (a variant the engine's warm-up missed).

    with TritonCompiles() as c:
        llm.generate(...)
    print(c.summary())

Uses triton.knobs.runtime.jit_post_compile_hook, called once per in-memory compile of a specialisation
(a load from Triton's on-disk cache counts too: it still means the warm-up did not cover the variant).
"""
from __future__ import annotations

import collections


class TritonCompiles:
    def __init__(self) -> None:
        self.events: list[str] = []
        self._previous = None

    def _hook(self, *, repr: str, **_) -> None:  # noqa: A002 (triton's keyword)
        self.events.append(repr)

    def __enter__(self) -> "TritonCompiles":
        from triton import knobs

        self._previous = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self._hook
        return self

    def __exit__(self, *exc) -> None:
        from triton import knobs

        knobs.runtime.jit_post_compile_hook = self._previous

    def summary(self, limit: int = 6) -> str:
        if not self.events:
            return "no Triton compiles"
        names = collections.Counter(e.split("[", 1)[0] for e in self.events)
        head = ", ".join(f"{n} x{c}" for n, c in names.most_common())
        detail = "\n".join(f"    {e[:1500]}" for e in self.events[:limit])
        return f"{len(self.events)} Triton compiles: {head}\n{detail}"
