"""Sampler: logits of the sampling sequences -> next tokens (and logprobs), vectorised over the batch.

Greedy rows take the argmax. Other rows divide by their temperature, keep their top-k and top-p
(nucleus) sets (one descending sort serves both), and draw by the exponential race
argmax(p / E), E ~ Exp(1), which is a draw from p. A seeded request draws E from its own
torch.Generator, so its tokens do not depend on what else is in the batch. Logprobs are the
log_softmax of the raw logits in fp32 (before temperature and masks), as vLLM reports them.
"""
from __future__ import annotations

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
        n, vocab = logits.shape
        if len(params) != n:
            raise ValueError(f"{n} rows of logits for {len(params)} sampling params")
        if all(p.greedy and p.logprobs is None for p in params):
            # the argmax of the model-dtype logits is the fp32 one (the cast is exact): skip the fp32 copy
            return logits.argmax(dim=-1).tolist(), [None] * n
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            sub = [params[i] for i in random_rows]
            gens = [generators[i] if generators else None for i in random_rows]
            tokens[rows] = self._sample(logits[rows], sub, gens)
        token_list = tokens.tolist()
        return token_list, self._logprobs(logits, params, tokens, token_list)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], gens) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
        logits = logits / temps[:, None]
        logits = apply_top_k_top_p(
            logits,
            torch.tensor([p.top_k if p.top_k > 0 else 0 for p in params], device=dev),
            torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32),
        )
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(gens) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), device=dev).exponential_(
                generator=self.generator)
        for i, g in enumerate(gens):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(logits, params, tokens, token_list) -> list[dict[int, float] | None]:
        want = [p.logprobs for p in params]
        if all(k is None for k in want):
            return [None] * len(params)
        logprobs = torch.log_softmax(logits, dim=-1)
        k_max = max(k or 0 for k in want)
        top_vals, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (None, None)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        top_vals = top_vals.tolist() if k_max else None
        top_ids = top_ids.tolist() if k_max else None
        out = []
        for i, k in enumerate(want):
            if k is None:
                out.append(None)
                continue
            entry = {int(t): float(v) for t, v in zip(top_ids[i][:k], top_vals[i][:k])} if k else {}
            entry[token_list[i]] = float(chosen[i])
            out.append(entry)
        return out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k (k=0: off) and top-p nucleus (p=1: off).
    The nucleus is the smallest set of most likely tokens whose mass reaches p (after top-k)."""
    if bool((top_k <= 0).all()) and bool((top_p >= 1).all()):
        return logits
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
