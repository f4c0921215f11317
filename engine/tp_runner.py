"""TensorParallelRunner: the engine-facing face of ModelRunner (`num_kv_blocks`, `execute(step)`),
backed by one ModelRunner per rank in worker processes.

Each worker builds the model as its TP rank (the layers read get_tp_rank / get_tp_world_size),
loads only its slice of every weight, and allocates its own KV cache for its local KV heads. Each
step the same StepInput goes to every rank, every rank runs the forward (the all-reduces and the
logits all-gather happen inside the layers), and only rank 0's sampled tokens come back.
"""
from __future__ import annotations

from pathlib import Path

from porter.engine.config import EngineConfig
from porter.engine.executor import MultiprocExecutor


def _num_kv_blocks(runner) -> int:
    return runner.num_kv_blocks


class TensorParallelRunner:
    def __init__(self, *, engine_config: EngineConfig, model_path: str | Path,
                 model_file: str | Path | None = None, step_timeout_s: float | None = None):
        self.config = engine_config
        self.executor = MultiprocExecutor(
            engine_config,
            "porter.engine.model_runner:ModelRunner",
            {"model_path": str(model_path), "model_file": None if model_file is None else str(model_file)},
            step_timeout_s=step_timeout_s,
        )
        # Each rank sizes its cache itself (GPU memory profiling differs a little between devices);
        # the scheduler may only hand out block ids that exist on every rank.
        self.num_kv_blocks = min(self.executor.collective_rpc(_num_kv_blocks))

    def execute(self, step):
        """ModelRunner.execute on every rank; rank 0's (tokens, logprobs)."""
        return self.executor.execute("execute", step)

    def collective_rpc(self, method, args=(), kwargs=None, rank0_only: bool = False) -> list:
        """`method(runner, *args, **kwargs)` (or a runner method by name) on every rank; every rank's
        result, or only rank 0's (a one-item list) when the others would send the same data again."""
        if rank0_only:
            return [self.executor.execute(method, *args, **(kwargs or {}))]
        return self.executor.collective_rpc(method, *args, **(kwargs or {}))

    @property
    def alive(self) -> bool:
        """False once the workers are stopped: shut down, or after any rank failed (the executor stops
        them all rather than run on with a missing or desynchronised shard)."""
        return self.executor.alive

    def shutdown(self) -> None:
        self.executor.shutdown()
