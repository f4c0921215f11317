"""The seeded ragged batch of random-token prompts that both sides run."""
from __future__ import annotations

import random

MIN_LEN, MAX_LEN = 4, 24  # spans a 16-token KV block and the tiny configs' 8-token sliding window


def make_prompts(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of different lengths (while the range allows) with token ids drawn uniformly."""
    if n < 1:
        raise ValueError("--prompts must be at least 1")
    rng = random.Random(seed)
    span = range(MIN_LEN, MAX_LEN)
    rest = rng.sample(span, n - 1) if n - 1 <= len(span) else [rng.choice(span) for _ in range(n - 1)]
    lengths = [MAX_LEN] + rest  # always one prompt longer than a block and than a sliding window
    return [[rng.randrange(vocab_size) for _ in range(length)] for length in lengths]


def extended_prompts(prompts: list[list[int]], greedy) -> list[list[int]]:
    """The prompts extended by HF's greedy tokens (all but the last), for localisation: every position
    either side has generated is covered."""
    return [p + g.token_ids[:-1] for p, g in zip(prompts, greedy)]
