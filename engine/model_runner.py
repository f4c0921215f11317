"""ModelRunner: owns the model and its paged KV cache, and turns one scheduled step into tokens.

Per step it flattens the scheduled sequences into `input_ids` / `positions` [num_tokens] plus one
AttentionMetadata, runs the model inside the forward context, takes the hidden state of each sampling
sequence's last token, computes logits and samples. Its input (`StepInput`) and output are plain
picklable data, so a multi-process (tensor-parallel) executor can run one runner per rank and
forward the same calls; the engine never touches the model directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from porter.engine.config import EngineConfig
from porter.engine.distributed import get_tp_rank
from porter.engine.forward_context import AttentionMetadata, set_forward_context
from porter.engine.input_batch import InputBatch
from porter.engine.layers.attention import Attention
from porter.engine.sampler import SampledTensors, Sampler
from porter.engine.sampling_params import SamplingParams
from porter.engine.scheduler import ScheduledBatch

CPU_KV_CACHE_BYTES = 1 << 30  # default CPU cache cap (always at least one max_model_len sequence)


@dataclass
class StepInput:
    seq_ids: list[int]
    new_token_ids: list[list[int]]  # the tokens each sequence computes this step (-1: the last step's sample)
    num_computed: list[int]  # tokens already in the cache (= position of the first new token)
    # each sequence's block-table entries from index blocks_from[i] on: the runner keeps the tables and
    # a step carries what changed (blocks_from None: every list is the whole table)
    block_tables: list[list[int]]
    sample: list[bool]  # this sequence samples a token after this step
    params: list[SamplingParams]  # one per sampling sequence, in batch order
    finished_seq_ids: list[int]  # sequences gone since the last step (their runner state is dropped)
    blocks_from: list[int] | None = None

    @classmethod
    def from_batch(cls, batch: ScheduledBatch, finished_seq_ids: list[int]) -> "StepInput":
        seqs, counts = batch.seqs, batch.num_new_tokens
        sample = batch.sample
        blocks_from = [s.num_synced_blocks for s in seqs]
        tables = []
        for s in seqs:
            tables.append(s.block_table[s.num_synced_blocks:])
            s.num_synced_blocks = len(s.block_table)
        return cls(
            seq_ids=[s.seq_id for s in seqs],
            new_token_ids=[_step_tokens(s, n) for s, n in zip(seqs, counts)],
            num_computed=[s.num_computed_tokens for s in seqs],
            block_tables=tables,
            sample=sample,
            params=[s.params for s, smp in zip(seqs, sample) if smp],
            finished_seq_ids=list(finished_seq_ids),
            blocks_from=blocks_from,
        )


def _step_tokens(seq, n: int) -> list[int]:
    """The n tokens seq computes next; a token still in flight (sampled by the step before) is -1."""
    start = seq.num_computed_tokens
    tokens = seq.token_ids[start:start + n]
    if len(tokens) < n:
        tokens += [-1] * (n - len(tokens))
    return tokens


def resolve_model_class(hf_config, model_file: str | Path | None) -> type[nn.Module]:
    """The engine class for the config's architectures: from the converted model file when given (without
    registering it: another LLM in this process keeps seeing the built-ins), else from the registry."""
    from porter.engine.models.registry import ModelRegistry

    return ModelRegistry.resolve(getattr(hf_config, "architectures", None) or [], model_file=model_file)


def load_engine_model(engine_config: EngineConfig, model_path: str | Path, model_file: str | Path | None) -> nn.Module:
    from porter.engine.loader import load_model

    return load_model(engine_config, resolve_model_class(engine_config.hf_config, model_file), model_path)


class ModelRunner:
    def __init__(self, *, engine_config: EngineConfig, model_path: str | Path, model_file: str | Path | None = None):
        self.config = engine_config
        self.device = torch.device(engine_config.device)
        self.model = load_engine_model(engine_config, model_path, model_file).eval()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if not self.attn_layers:
            raise ValueError(f"{type(self.model).__name__} has no porter Attention layers: the engine cannot "
                             "cache its K/V")
        self.dtype = engine_config.dtype
        self.block_size = engine_config.block_size
        self.max_blocks_per_seq = -(-engine_config.max_model_len // self.block_size)
        self.num_kv_blocks = self._decide_num_blocks()
        self._allocate_kv_cache()
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(engine_config.seed))
        self.generators: dict[int, torch.Generator] = {}  # seeded requests' own generators
        self.inputs = InputBatch(
            max_num_tokens=max(engine_config.max_num_batched_tokens, engine_config.max_num_seqs),
            max_num_seqs=engine_config.max_num_seqs, max_blocks_per_seq=self.max_blocks_per_seq,
            block_size=self.block_size, device=self.device)
        if self.device.type == "cuda":
            self._warm_up()
        self.graphs = None
        if self.device.type == "cuda" and not engine_config.enforce_eager and engine_config.attention_backend == "triton":
            from porter.engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(self.model, engine_config, self.inputs)

    # --- KV cache -----------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_size * elem for a in self.attn_layers)

    def _decide_num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            if cfg.num_kv_blocks < 1:
                raise ValueError(f"num_kv_blocks must be >= 1, got {cfg.num_kv_blocks}")
            return cfg.num_kv_blocks
        per_block = self._bytes_per_block()
        if self.device.type == "cuda":
            available = self._profile_available_bytes()
            blocks = int(available // per_block)
            if blocks < self.max_blocks_per_seq:
                raise ValueError(
                    f"only {max(blocks, 0)} KV blocks fit in GPU memory at gpu_memory_utilization="
                    f"{cfg.gpu_memory_utilization} but one max_model_len ({cfg.max_model_len}) sequence needs "
                    f"{self.max_blocks_per_seq}: raise gpu_memory_utilization or lower max_model_len")
            return blocks
        wanted = self.max_blocks_per_seq * cfg.max_num_seqs
        return max(self.max_blocks_per_seq, min(wanted, CPU_KV_CACHE_BYTES // per_block))

    @torch.inference_mode()
    def _profile_available_bytes(self) -> int:
        """GPU bytes left for the KV cache after the largest step's activations (one dummy forward)."""
        cfg = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = cfg.max_num_batched_tokens
        lens = [min(cfg.max_model_len, n - s) for s in range(0, n, cfg.max_model_len)]
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(l, device=self.device) for l in lens])
        with set_forward_context(AttentionMetadata.for_prefill(lens, device=self.device)):
            hidden = self.model(ids, positions)
        self.model.compute_logits(hidden[: min(n, cfg.max_num_seqs)])
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - base
        del hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        available = int(total * cfg.gpu_memory_utilization - (total - free) - activations)
        if available <= 0:
            gib = 1 << 30
            raise ValueError(
                f"no GPU memory left for the KV cache: {total / gib:.1f} GiB x gpu_memory_utilization "
                f"{cfg.gpu_memory_utilization} minus {(total - free) / gib:.1f} GiB in use (this process's "
                f"weights and any other process) minus {activations / gib:.1f} GiB of activations for a "
                f"{n}-token step; raise gpu_memory_utilization, lower max_num_batched_tokens, or free the GPU")
        return available

    def _allocate_kv_cache(self) -> None:
        for layer in self.attn_layers:
            shape = (self.num_kv_blocks, self.block_size, layer.num_kv_heads, layer.head_size)
            # zeros, not empty: never-written slots must stay finite for kernels that read whole blocks
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run a few dummy eager steps so that Triton compiles the kernel variants real steps use (paged
        prefill in both tile configs, mixed and decode-only batches, token counts with and without the
        divisible-by-16 specialisation) now, not inside the first requests. Nothing is written to the cache."""
        cfg = self.config
        room = min(cfg.max_num_batched_tokens, cfg.max_model_len - 4)  # positions stay below max_model_len
        batches = [[17, 1], [32], [1, 1, 1]]
        if room >= 2048 + 3:  # the long-query tile config (porter.kernels.prefill_attention.LONG_QUERY)
            batches.append([2048 + 3])
        for q_lens in batches:
            if sum(q_lens) > room or len(q_lens) > cfg.max_num_seqs:
                continue
            ids = [-1 - i for i in range(len(q_lens))]
            x = self.inputs.prepare(ids, [[0] * n for n in q_lens], [3] * len(q_lens),
                                    [[0] * -(-(n + 3) // self.block_size) for n in q_lens], None, [True] * len(q_lens))
            x.meta.slot_mapping.fill_(-1)
            with set_forward_context(x.meta):
                hidden = self.model(x.input_ids, x.positions)
            self.model.compute_logits(hidden[: x.num_tokens])
            self.inputs.release(ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- one step -----------------------------------------------------------------------------

    def _generators(self, step: StepInput, sampling_ids: list[int]) -> list[torch.Generator | None]:
        for seq_id in step.finished_seq_ids:
            self.generators.pop(seq_id, None)
        gens = []
        for seq_id, params in zip(sampling_ids, step.params):
            if params.seed is None:
                gens.append(None)
                continue
            if seq_id not in self.generators:
                self.generators[seq_id] = torch.Generator(self.device).manual_seed(params.seed)
            gens.append(self.generators[seq_id])
        return gens

    def execute(self, step: StepInput) -> tuple[list[int], list[dict[int, float] | None]]:
        """Run one step; returns the sampled token (and logprobs entry) of each sampling sequence."""
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: StepInput) -> "LaunchedStep":
        """Queue one step on the device and return at once; `.result()` waits for its tokens. The next
        step may be launched before that: its pending tokens (-1 in new_token_ids) are this step's."""
        sampling_ids = [s for s, smp in zip(step.seq_ids, step.sample) if smp]
        gens = self._generators(step, sampling_ids)
        self.inputs.release(step.finished_seq_ids)
        graph_size = self.graphs.size_for(step) if self.graphs is not None else None
        x = self.inputs.prepare(step.seq_ids, step.new_token_ids, step.num_computed, step.block_tables,
                                step.blocks_from, step.sample, pad_to=graph_size)
        if graph_size is not None:
            hidden = self.graphs.replay(graph_size)
        else:
            with set_forward_context(x.meta):
                hidden = self.model(x.input_ids, x.positions)
        if not sampling_ids:
            return LaunchedStep(None, [])
        hidden = hidden[: x.num_tokens] if x.sample_rows is None else hidden[x.sample_rows]
        logits = self.model.compute_logits(hidden)
        if get_tp_rank() != 0:  # every rank joins the logits gather; rank 0 alone samples
            return LaunchedStep(None, [])
        sampled = self.sampler.sample(logits, step.params, gens)
        self.inputs.set_sampled(sampling_ids, sampled.tokens)
        return LaunchedStep(sampled, step.params)


class LaunchedStep:
    """A step queued on the device: its sampled tokens are copied to pinned host memory as soon as the
    device gets there, and `result()` waits for that copy only."""

    def __init__(self, sampled: SampledTensors | None, params: list[SamplingParams]):
        self.params = params
        self.host = None
        self.done = None
        if sampled is not None:
            on_gpu = sampled.tokens.device.type == "cuda"
            self.host = sampled.to_host(non_blocking=on_gpu)
            if on_gpu:
                self.done = torch.cuda.Event()
                self.done.record()

    def result(self) -> tuple[list[int], list[dict[int, float] | None]]:
        if self.host is None:
            return [], []
        if self.done is not None:
            self.done.synchronize()
        return self.host.lists(self.params)
