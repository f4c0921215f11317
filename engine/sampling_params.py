"""SamplingParams: how one request is decoded (vLLM's offline-API shape, validated up front)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = -1  # -1 or 0 = off
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None  # k: return the top-k logprobs (plus the chosen token) per generated token
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch

    def __post_init__(self):
        def bad(what):
            raise ValueError(f"SamplingParams: {what}")

        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad(f"top_k must be an int, -1 or 0 to disable or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                bad(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
            self.stop_token_ids = ids
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or self.logprobs < 0
        ):
            bad(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be None or an int, got {self.seed!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        if self.top_k == 0:
            self.top_k = -1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
