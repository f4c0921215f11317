"""Sampler: logits of the sampling sequences -> next tokens (and logprobs), vectorised over the batch.

Greedy rows take the argmax. Other rows divide by their temperature, keep their top-k and top-p
(nucleus) sets (one descending sort serves both), and draw by the exponential race
argmax(p / E), E ~ Exp(1), which is a draw from p. A seeded request draws E from its own
torch.Generator, so its tokens do not depend on what else is in the batch. Logprobs are the
log_softmax of the raw logits in fp32 (before temperature and masks), as vLLM reports them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from porter.engine.sampling_params import SamplingParams


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # for unseeded requests

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None] | None = None,
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        return self.sample(logits, params, generators).to_host().lists(params)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None] | None = None,
    ) -> "SampledTensors":
        """Tokens (and logprob tensors) on the logits' device, without waiting for the device."""
        n, vocab = logits.shape
        if len(params) != n:
            raise ValueError(f"{n} rows of logits for {len(params)} sampling params")
        if all(p.greedy and p.logprobs is None for p in params):
            # the argmax of the model-dtype logits is the fp32 one (the cast is exact): skip the fp32 copy
            return SampledTensors(logits.argmax(dim=-1))
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(random_rows) == n:
            tokens = self._sample(logits, params, generators or [None] * n)
        elif random_rows:
            rows = _to_device(random_rows, torch.long, logits.device)
            sub = [params[i] for i in random_rows]
            gens = [generators[i] if generators else None for i in random_rows]
            tokens[rows] = self._sample(logits[rows], sub, gens)
        return SampledTensors(tokens, *self._logprobs(logits, params, tokens))

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], gens) -> torch.Tensor:
        dev = logits.device
        # per-row values go up through pinned memory: a plain torch.tensor(..., device=cuda) would wait
        # for the device, and the engine schedules the next step while this one runs
        temps = _to_device([p.temperature for p in params], torch.float32, dev)
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = apply_top_k_top_p(
                logits,
                _to_device([p.top_k if p.top_k > 0 else 0 for p in params], torch.long, dev),
                _to_device([p.top_p for p in params], torch.float32, dev),
            )
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        if any(g is None for g in gens):
            noise.exponential_(generator=self.generator)  # seeded rows are redrawn below
        for i, g in enumerate(gens):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(logits, params, tokens) -> tuple:
        """(chosen token's logprob [n], top values [n, k], top ids [n, k]) on the device, or Nones."""
        want = [p.logprobs for p in params]
        if all(k is None for k in want):
            return None, None, None
        logprobs = torch.log_softmax(logits, dim=-1)
        k_max = max(k or 0 for k in want)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        if not k_max:
            return chosen, None, None
        top_vals, top_ids = logprobs.topk(k_max, dim=-1)
        return chosen, top_vals, top_ids


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class SampledTensors:
    """A step's sampling result, on the device until `to_host` (which may start an asynchronous copy)."""
    tokens: torch.Tensor  # [n] int64
    chosen: torch.Tensor | None = None  # [n] fp32 logprob of each chosen token (None: no logprobs asked)
    top_vals: torch.Tensor | None = None  # [n, k_max]
    top_ids: torch.Tensor | None = None

    def to_host(self, non_blocking: bool = False) -> "SampledTensors":
        """Copies into pinned host memory; with non_blocking, valid once the stream reaches this point."""
        def copy(t):
            if t is None or t.device.type == "cpu":
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=non_blocking)
        return SampledTensors(*(copy(t) for t in (self.tokens, self.chosen, self.top_vals, self.top_ids)))

    def lists(self, params: list[SamplingParams]) -> tuple[list[int], list[dict[int, float] | None]]:
        token_list = self.tokens.tolist()
        if self.chosen is None:
            return token_list, [None] * len(token_list)
        chosen = self.chosen.tolist()
        top_vals = self.top_vals.tolist() if self.top_vals is not None else None
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        out = []
        for i, p in enumerate(params):
            k = p.logprobs
            if k is None:
                out.append(None)
                continue
            entry = {int(t): float(v) for t, v in zip(top_ids[i][:k], top_vals[i][:k])} if k else {}
            entry[token_list[i]] = float(chosen[i])
            out.append(entry)
        return token_list, out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k (k=0: off) and top-p nucleus (p=1: off).
    The nucleus is the smallest set of most likely tokens whose mass reaches p (after top-k)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop = drop | (mass_before >= top_p[:, None])  # the top token always survives (mass_before 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
