"""LLM: the offline generation API (vLLM's shape) over the scheduler, block manager and model runner.

    llm = LLM(model="fixtures/tiny-llama")
    outs = llm.generate(["The cat", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=16))

The engine loop is synchronous: `generate` queues every prompt and steps until all are done
(continuous batching happens inside: sequences join and leave the running batch every step).
All model work goes through the runner's `num_kv_blocks` and `execute(StepInput)`: an in-process
ModelRunner for one device, or a TensorParallelRunner driving one ModelRunner per rank.
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator, Sequence as SequenceABC
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from porter.engine.block_manager import BlockManager
from porter.engine.config import EngineConfig
from porter.engine.model_runner import ModelRunner, StepInput, resolve_model_class
from porter.engine.outputs import CompletionOutput, RequestOutput
from porter.engine.sampling_params import SamplingParams
from porter.engine.scheduler import ScheduledBatch, Scheduler
from porter.engine.sequence import Sequence
from porter.engine.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer
from porter.engine.tp_check import check_tp_splittable
from porter.engine.tp_runner import TensorParallelRunner
from porter.engine.worker import to_cpu

DEFAULT_MAX_MODEL_LEN = 8192  # cap on the config's context length when max_model_len is not given
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class StreamDelta:
    """One step of `generate_stream`: the tokens generated in that step and their text."""
    token_ids: list[int]
    text: str
    finished: bool
    output: RequestOutput | None = None  # the full result, on the last delta


def load_hf_config(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a HuggingFace checkpoint directory")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"could not read {model_dir / 'config.json'}: {type(e).__name__}: {e}") from e


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device}: use cpu or cuda")
    return device


def resolve_dtype(dtype: str | torch.dtype, hf_config, device: torch.device) -> torch.dtype:
    """'auto': the checkpoint's dtype on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        cfg = getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
        if isinstance(cfg, torch.dtype):
            return cfg
        return _DTYPES.get(str(cfg).removeprefix("torch."), torch.float32) if cfg else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def resolve_max_model_len(hf_config, max_model_len: int | None) -> int:
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    names = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
    from_config = next((getattr(text_config, n) for n in names if isinstance(getattr(text_config, n, None), int)), None)
    if max_model_len is None:
        return min(from_config or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    if from_config is not None and max_model_len > from_config:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length ({from_config})")
    return max_model_len


def resolve_attention_backend(name: str | None, device: torch.device) -> str:
    if name is None:
        if device.type != "cuda":
            return "torch"
        try:
            import porter.engine.backends.triton_backend  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if name not in ("torch", "triton"):
        raise ValueError(f"unknown attention_backend {name!r}: use torch or triton")
    return name


class LLM:
    def __init__(
        self,
        model: str | Path,
        model_file: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        tensor_parallel_size: int = 1,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        attention_backend: str | None = None,
        enforce_eager: bool = False,
        gpu_memory_utilization: float = 0.9,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        async_scheduling: bool = True,
    ):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("num_kv_blocks", num_kv_blocks),
                            ("tensor_parallel_size", tensor_parallel_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        model_dir = Path(model)
        hf_config = load_hf_config(model_dir, trust_remote_code)
        dev = resolve_device(device)
        max_model_len = resolve_max_model_len(hf_config, max_model_len)
        self.engine_config = EngineConfig(
            hf_config=hf_config,
            dtype=resolve_dtype(dtype, hf_config, dev),
            device=dev,
            tensor_parallel_size=tensor_parallel_size,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or max(8192, max_num_seqs),
            attention_backend=resolve_attention_backend(attention_backend, dev),
            enable_prefix_caching=enable_prefix_caching,
            num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
        )
        resolve_model_class(hf_config, model_file)  # an unknown architecture fails before anything loads
        check_tp_splittable(hf_config, tensor_parallel_size)  # so does a model that cannot be split N ways
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(tokenizer or model_dir, trust_remote_code)
        self.eos_token_ids = eos_token_ids(model_dir, hf_config, self.tokenizer)
        # TP > 1: one ModelRunner per rank in worker processes, behind the same num_kv_blocks / execute
        runner_class = ModelRunner if tensor_parallel_size == 1 else TensorParallelRunner
        self.runner = runner_class(engine_config=self.engine_config, model_path=model_dir, model_file=model_file)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=self.engine_config.max_num_batched_tokens,
                                   max_model_len=max_model_len, eos_token_ids=self.eos_token_ids,
                                   admission_group=self._admission_group())
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.vocab_size = getattr(text_config, "vocab_size", None)
        self._seq_ids = itertools.count()
        self._gone: list[int] = []  # finished sequence ids the runner has not been told about yet
        # Schedule step n+1 while step n runs (TP=1: the runner is in this process). The host's per-step
        # work (scheduling, staging inputs, reading back tokens) then overlaps the device's instead of
        # adding to it; a sequence that stops on EOS computes one token that is thrown away.
        self.async_scheduling = async_scheduling and isinstance(self.runner, ModelRunner)
        self._in_flight: tuple[ScheduledBatch, object] | None = None  # the launched step not yet read back

    def _admission_group(self) -> int:
        """With CUDA graphs a decode step replays a graph while any prefill runs the model eagerly, at
        the cost of many decode steps (launch-bound: measured ~36 ms vs ~4 ms for a 0.6B model on an
        H100), so prefills are admitted in groups of an eighth of the seats."""
        cfg = self.engine_config
        graphs = cfg.device.type == "cuda" and not cfg.enforce_eager and cfg.attention_backend == "triton"
        return max(1, cfg.max_num_seqs // 8) if graphs else 1

    def model_parameters(self):
        """The in-process model's parameters (TP=1 only: under TP the model lives in the workers; use
        `weight_bytes()` / `weight_bytes_per_rank()` or `collective_rpc`)."""
        if not isinstance(self.runner, ModelRunner):
            raise NotImplementedError("model_parameters() needs tensor_parallel_size=1 (the model lives in workers); "
                                      "use weight_bytes() or collective_rpc()")
        return self.runner.model.parameters()

    def collective_rpc(self, method: str | Callable, args: tuple = (), kwargs: dict | None = None,
                       rank0_only: bool = False) -> list:
        """Run `method(runner, *args, **kwargs)` (or the runner method of that name) on every rank's
        ModelRunner and return the results in rank order (one item at TP=1, or with `rank0_only`).
        Under TP the function runs in the worker processes, so it must be picklable (module level);
        results come back on the CPU either way."""
        if isinstance(self.runner, ModelRunner):
            fn = getattr(self.runner, method) if isinstance(method, str) else partial(method, self.runner)
            return [to_cpu(fn(*args, **(kwargs or {})))]
        return self.runner.collective_rpc(method, args, kwargs, rank0_only=rank0_only)

    def weight_bytes_per_rank(self) -> list[int]:
        """Bytes of model weights each rank holds. Under TP the sum exceeds the TP=1 size by what is
        replicated rather than split: norms and other vectors every rank keeps whole, biases of
        row-parallel layers, KV-head projections when there are fewer KV heads than ranks, and
        replicated linears; the vocabulary padding can also grow (the 64-padded vocabulary is rounded up
        to a multiple of the rank count)."""
        return self.collective_rpc(rank_weight_bytes)

    def weight_bytes(self) -> int:
        """Bytes of model weights over all ranks (a tensor shared by several parameters, e.g. a tied
        embedding and LM head, counts once per rank). A batch-1 decode step reads each rank's share in
        parallel, so its bandwidth floor is max(weight_bytes_per_rank()) / bandwidth."""
        return sum(self.weight_bytes_per_rank())

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's blocks that no request is using; returns how many."""
        return self.block_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers now (they also stop when the LLM is garbage-collected)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    # --- requests -------------------------------------------------------------------------------

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but the tokenizer was skipped (skip_tokenizer_init=True)")
            return prompt, self.tokenizer.encode(prompt)
        try:  # operator.index accepts numpy / torch integers, refuses floats and strings
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {prompt!r:.80}") from None
        return None, ids

    def _new_sequence(self, prompt, params: SamplingParams) -> tuple[str | None, Sequence]:
        text, ids = self._encode(prompt)
        seq = Sequence(next(self._seq_ids), ids, params)
        bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            seq.finish("error", f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        else:
            self.scheduler.add(seq)
        return text, seq

    def _busy(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def _step(self) -> list[Sequence]:
        """Schedule and launch a step, then read back the step before it (asynchronous scheduling) or
        this one (synchronous); returns the sequences that finished."""
        batch = self.scheduler.schedule()
        try:
            launched = self._launch(batch) if batch.seqs else None
            ready = launched
            if self.async_scheduling:
                ready, self._in_flight = self._in_flight, launched
            if ready is None:
                return []
            batch, result = ready
            tokens, logprobs = result.result() if self.async_scheduling else result
        except BaseException:
            self._in_flight = None
            self._gone.extend(s.seq_id for s in self.scheduler.abort_all("the model step failed"))
            raise
        finished = self.scheduler.update(batch, tokens, logprobs)
        self._gone.extend(s.seq_id for s in finished)
        return finished

    def _launch(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, object]:
        """Queue the batch (async: returns a LaunchedStep) or run it (sync: returns its tokens)."""
        step = StepInput.from_batch(batch, self._gone)
        result = self.runner.launch(step) if self.async_scheduling else self.runner.execute(step)
        self._gone = []  # the runner has dropped their state
        self.scheduler.launched(batch)
        return batch, result

    def _drain(self) -> None:
        """Wait for a step still in flight and drop its results (its sequences were aborted)."""
        if self._in_flight is not None:
            _, pending = self._in_flight
            self._in_flight = None
            pending.result()

    def _output(self, text: str | None, seq: Sequence) -> RequestOutput:
        out_ids = seq.output_token_ids
        decoded = self.tokenizer.decode(out_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        completion = CompletionOutput(0, decoded, out_ids, seq.logprobs, seq.finish_reason)
        return RequestOutput(str(seq.seq_id), text, seq.prompt_token_ids, [completion], seq.is_finished,
                             seq.error, seq.num_cached_tokens or 0)

    # --- public API -----------------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for each prompt (a string, a token-id list, or a list of either); outputs in input order."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        if self._busy():
            raise RuntimeError("the engine already has requests in flight")
        requests = [self._new_sequence(p, sp) for p, sp in zip(prompts, params_list)]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generate")
        while self._busy():
            done = self._step()
            if bar is not None:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return [self._output(text, seq) for text, seq in requests]

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Generate for one prompt, yielding each step's new tokens and text as they come."""
        if self._busy():
            raise RuntimeError("the engine already has requests in flight")
        text, seq = self._new_sequence(prompt, sampling_params or SamplingParams())
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids) if self.tokenizer is not None else None
        seen = seq.num_prompt_tokens
        try:
            while True:
                new = seq.token_ids[seen:]
                seen = len(seq.token_ids)
                text_delta = detok.add(new) if detok is not None and new else ""
                if seq.is_finished:
                    yield StreamDelta(new, text_delta, True, self._output(text, seq))
                    return
                if new:
                    yield StreamDelta(new, text_delta, False)
                self._step()
        finally:  # the consumer stopped early: drop the request so the engine stays usable
            if not seq.is_finished:
                self._gone.extend(s.seq_id for s in self.scheduler.abort_all("stream closed"))
            self._drain()


def _as_prompt_list(prompts) -> list:
    if hasattr(prompts, "tolist"):  # a numpy array or tensor of ids (1-D: one prompt, 2-D: a batch)
        prompts = prompts.tolist()
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, SequenceABC) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one token-id prompt
    if isinstance(prompts, SequenceABC):
        return list(prompts)
    raise ValueError(f"prompts must be a string, a token-id list, or a list of them; got {type(prompts).__name__}")


def rank_weight_bytes(runner) -> int:
    """One rank's weight bytes. `parameters()` yields a shared Parameter once; tensors that are distinct
    Parameters over the same memory are also counted once (by data pointer)."""
    sizes: dict[int, int] = {}
    for p in runner.model.parameters():
        sizes[p.data_ptr()] = max(sizes.get(p.data_ptr(), 0), p.numel() * p.element_size())
    return sum(sizes.values())
