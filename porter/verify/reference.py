"""The HF side: the transformers model (or the checkpoint's own auto_map code) and its outputs.

Each prompt runs on its own (batch of one, no padding), so no attention mask or padded position can
differ from the engine; the outputs are concatenated in the engine's flat ragged order.
Greedy decoding recomputes the whole sequence each step (no HF cache): exact, and cheap at verify sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from porter.verify.checkpoint import is_custom
from porter.verify.errors import VerifyInputError


@dataclass
class Greedy:
    """One prompt's greedy continuation and the full log-softmax (fp32) at every generated step."""

    token_ids: list[int]
    logprobs: list[torch.Tensor]  # [vocab] per step


def load_hf_model(ckpt: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt), dtype=dtype, trust_remote_code=is_custom(ckpt), local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - the reference must load for verify to mean anything
        raise VerifyInputError(f"transformers cannot load the reference model from {ckpt}: {exc}") from exc
    return model.to(device).eval()


def _forward_logits(model: torch.nn.Module, ids: list[int], device: str) -> torch.Tensor:
    x = torch.tensor([ids], dtype=torch.long, device=device)
    return model(input_ids=x, use_cache=False).logits[0].float()


@torch.no_grad()
def prefill_logits(model: torch.nn.Module, prompts: list[list[int]], device: str) -> torch.Tensor:
    """[total prompt tokens, vocab] fp32 logits at every prompt position, prompts back to back."""
    return torch.cat([_forward_logits(model, p, device) for p in prompts]).cpu()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, device: str) -> list[Greedy]:
    results = []
    for prompt in prompts:
        seq, out = list(prompt), Greedy([], [])
        for _ in range(max_tokens):
            logprobs = torch.log_softmax(_forward_logits(model, seq, device)[-1], dim=-1).cpu()
            token = int(logprobs.argmax())
            out.token_ids.append(token)
            out.logprobs.append(logprobs)
            seq.append(token)
        results.append(out)
    return results
