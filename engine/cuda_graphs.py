"""CUDA graphs for decode-only steps (GPU only; the CPU path never imports this module).

A decode step is small and launch-bound, so its forward is captured once per batch size in
`capture_sizes` and replayed. A batch of n decodes is padded to the next captured size: padding
rows get token 0 at position 0, slot -1 (the cache write skips them), seq_len 1 and block 0, so
they read one finite key and their outputs are ignored. The metadata seen at capture points at
static buffers that each replay refills; `max_seq_len` is fixed to max_model_len and the CPU
length lists are absent, so a backend used under graphs must take lengths from the device tensors
(the triton backend does; the torch backend does not, so it never runs under graphs).
"""
from __future__ import annotations

import torch
from torch import nn

from porter.engine.config import EngineConfig
from porter.engine.forward_context import AttentionMetadata, set_forward_context


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, max_blocks_per_seq: int):
        self.model = model
        self.max_model_len = config.max_model_len
        self.sizes = capture_sizes(config.max_num_seqs)
        n, dev = self.sizes[-1], config.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one query per sequence
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._capture()

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs fit in its memory pool
            meta = self._meta(size)
            with set_forward_context(meta):
                self.model(self.input_ids[:size], self.positions[:size])  # warm-up: compile, allocate
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(self.input_ids[:size], self.positions[:size])
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.decode_only and meta.num_seqs <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if size > n:  # padding rows (see the module docstring)
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size].zero_()
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:n]
