"""Sequence: one request's tokens and its place in the KV cache, as the scheduler tracks it.

`token_ids` holds the prompt followed by every generated token. `num_computed_tokens` of them have
their K/V in the cache; the rest are computed by the next steps (one for a decode, a chunk for a
prefill). Preemption by recompute just frees the blocks and sets `num_computed_tokens` back to 0:
the generated tokens stay, so the re-prefill covers them too and nothing is lost.

With asynchronous scheduling the next step is scheduled while this one runs, so a sequence can have
`num_pending` tokens that are sampled on the device but not yet known on the host. They count in
`num_tokens` (the scheduler plans with them, the model runner feeds them from the device) but are not
in `token_ids` until `resolve_token`; `token_ids` only ever holds real tokens.
"""
from __future__ import annotations

import enum

from porter.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = seq_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)  # grows only through append_token
        self.num_tokens = len(self.token_ids)  # len(token_ids) + num_pending: the scheduler reads it often
        self.num_pending = 0  # sampled tokens in flight (at most two: the step being read and the next)
        self.last_in_flight = False  # its final token (by length) is in flight: nothing left to schedule
        self.num_prompt_tokens = self.num_tokens
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prompt tokens hit in the prefix cache, first admission
        self.num_preemptions = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids, in order
        self.num_hashed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.num_synced_blocks = 0  # leading blocks of block_table already carried to the model runner
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        self.num_tokens += 1
        if self.logprobs is not None:
            self.logprobs.append(logprobs or {})

    def append_pending(self) -> None:
        """A token is being sampled on the device (its value comes with resolve_token)."""
        self.num_pending += 1
        self.num_tokens += 1

    def resolve_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        """The oldest pending token's value arrived."""
        self.num_pending -= 1
        self.num_tokens -= 1
        self.append_token(token_id, logprobs)

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the sequence stopped before them)."""
        self.num_tokens -= self.num_pending
        self.num_pending = 0

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
