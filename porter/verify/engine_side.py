"""The engine side: the engine model class, built and loaded directly for prefill, and the LLM for decoding.

Prefill runs the model itself over the flat ragged batch (`AttentionMetadata.for_prefill`, no KV cache,
no scheduler), so a logits difference is the model's, not the runtime's. Greedy decoding goes through
`porter.engine.LLM` with every prompt in one batch, which also exercises the paged KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from porter.verify.checkpoint import is_custom
from porter.verify.errors import VerifyInputError

BLOCK_SIZE = 16


@dataclass
class EngineGreedy:
    token_ids: list[int]
    logprobs: list[dict[int, float]]  # per generated position: top-k token id -> logprob


def resolve_model_class(hf_config: PretrainedConfig, model_file: Path | None) -> type:
    """The engine class for the config's `architectures`: from `model_file` when given, else the registry."""
    from porter.engine.models.registry import ModelRegistry

    architectures = list(getattr(hf_config, "architectures", None) or [])
    if model_file is not None:
        if not model_file.is_file():
            raise VerifyInputError(f"model file {model_file} does not exist")
        try:
            return ModelRegistry.resolve(architectures, model_file=model_file)
        except Exception as exc:  # noqa: BLE001 - a broken model file is the user's input
            raise VerifyInputError(f"cannot load engine model file {model_file}: {type(exc).__name__}: {exc}") from exc
    try:
        return ModelRegistry.resolve(architectures)
    except Exception as exc:  # noqa: BLE001
        raise VerifyInputError(str(exc)) from exc


def engine_config(hf_config: PretrainedConfig, dtype: torch.dtype, device: str):
    from porter.engine.config import EngineConfig

    backend = "triton" if torch.device(device).type == "cuda" else "torch"
    return EngineConfig(hf_config=hf_config, dtype=dtype, device=torch.device(device), attention_backend=backend)


def build_model(cls: type, hf_config: PretrainedConfig, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Construct the model through the engine loader (engine-config context, model dtype as default dtype,
    target device as default device); weights are loaded separately, key by key (weights.py)."""
    from porter.engine import loader

    cfg = engine_config(hf_config, dtype, device)
    model = loader.build_model(cfg, cls)
    model.engine_config = cfg
    return model.eval()


def finish_loading(model: torch.nn.Module) -> None:
    """The loader's post-load step: modules that repack weights once loaded."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook()


def flat_batch(prompts: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(len(p), dtype=torch.long) for p in prompts]).to(device)
    return ids, positions


@torch.no_grad()
def prefill_logits(model: torch.nn.Module, prompts: list[list[int]], device: str | torch.device,
                   config=None) -> torch.Tensor:
    """[total prompt tokens, vocab] fp32 logits over the flat ragged batch. `config`: the engine config
    the model was built with (default: `model.engine_config`, which build_model sets)."""
    from porter.engine.config import set_current_engine_config
    from porter.engine.forward_context import AttentionMetadata, set_forward_context

    ids, positions = flat_batch(prompts, device)
    meta = AttentionMetadata.for_prefill([len(p) for p in prompts], device=device)
    with set_current_engine_config(config or model.engine_config), set_forward_context(meta):
        hidden = model(input_ids=ids, positions=positions)
        logits = model.compute_logits(hidden)
    return logits.float().cpu()


def start_llm(ckpt: Path, model_file: Path | None, dtype: torch.dtype, device: str, prompts: list[list[int]],
              max_tokens: int, tp: int = 1):
    """The engine LLM sized for the verify batch: every prompt fits at once, KV blocks for exactly that
    (no GPU memory profiling, so N ranks next to the HF reference do not compete for memory)."""
    from porter.engine import LLM

    max_model_len = max(len(p) for p in prompts) + max_tokens + 16
    return LLM(
        model=str(ckpt), model_file=str(model_file) if model_file else None,
        dtype=dtype, device=device, max_num_seqs=max(len(prompts), 1), max_model_len=max_model_len,
        block_size=BLOCK_SIZE, num_kv_blocks=len(prompts) * -(-max_model_len // BLOCK_SIZE), tensor_parallel_size=tp,
        skip_tokenizer_init=True, trust_remote_code=is_custom(ckpt),
    )


def generate_greedy(llm, prompts: list[list[int]], max_tokens: int, num_logprobs: int) -> list[EngineGreedy]:
    """All prompts in one `LLM.generate` call (one engine batch), temperature 0, EOS ignored."""
    from porter.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=num_logprobs, ignore_eos=True)
    outputs = llm.generate([list(p) for p in prompts], params)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = [{int(t): float(getattr(v, "logprob", v)) for t, v in step.items()} for step in completion.logprobs]
        results.append(EngineGreedy(list(completion.token_ids), logprobs))
    return results


def greedy(
    ckpt: Path, model_file: Path | None, dtype: torch.dtype, device: str,
    prompts: list[list[int]], max_tokens: int, num_logprobs: int,
) -> list[EngineGreedy]:
    """Greedy decoding on a one-rank engine LLM."""
    llm = start_llm(ckpt, model_file, dtype, device, prompts, max_tokens)
    return generate_greedy(llm, prompts, max_tokens, num_logprobs)
