"""What `LLM.generate` returns (vLLM's RequestOutput / CompletionOutput shape)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    # per generated position: token id -> logprob, the top-k plus always the chosen token (None if not asked)
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" (EOS / stop token), "length" (max_tokens / max_model_len), "error"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    # prompt tokens whose KV came from the prefix cache (first admission)
    num_cached_tokens: int = 0
