"""CUDA graphs for decode-only steps (GPU only; the CPU path never imports this module).

A decode step is small and launch-bound, so its forward is captured once per batch size in
`capture_sizes` and replayed. A batch of n decodes is padded to the next captured size (see
engine/input_batch.py: padding rows get token 0 at position 0, slot -1 so the cache write skips them,
seq_len 1 and block 0, so they read one finite key and their outputs are ignored). The graphs read
their inputs from the InputBatch's persistent device buffers, which each step's host-to-device copies
refill at the same offsets; `max_seq_len` is fixed to max_model_len and the CPU length lists are absent,
so a backend used under graphs must take lengths from the device tensors (the triton backend does; the
torch backend does not, so it never runs under graphs).
"""
from __future__ import annotations

import torch
from torch import nn

from porter.engine.config import EngineConfig
from porter.engine.forward_context import set_forward_context
from porter.engine.input_batch import InputBatch


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, inputs: InputBatch):
        self.model, self.inputs = model, inputs
        self.max_model_len = config.max_model_len
        self.sizes = capture_sizes(config.max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs fit in its memory pool
            x = self.inputs.padded(size, self.max_model_len)
            with set_forward_context(x.meta):
                self.model(x.input_ids, x.positions)  # warm-up: compile, allocate
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(x.input_ids, x.positions)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def size_for(self, step) -> int | None:
        """The graph size a step pads to, or None when it runs eagerly (any prefill, or too many sequences)."""
        n = len(step.seq_ids)
        if n == 0 or n > self.sizes[-1] or any(len(t) != 1 for t in step.new_token_ids):
            return None
        return next(s for s in self.sizes if s >= n)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of `size` on the inputs just staged; returns its [size, hidden] output."""
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size]
