"""MultiprocExecutor: one runner per tensor-parallel rank, each in its own spawned process.

Every rank, rank 0 included, is a worker process; the engine process only schedules and reads
rank 0's answer. Why rank 0 is not the engine process itself:
- the engine process never enters a collective, so it is always free to notice a dead worker
  (process sentinels) instead of hanging in an all-reduce whose peer is gone (NCCL never returns);
- it never touches CUDA, so the spawned children each own a GPU and nothing is initialised twice;
- it keeps no torch.distributed state, so TP=1 code in the same process (an HF reference in
  `porter verify`, a second LLM) is unaffected.
The price is one pipe round trip per step carrying the step's inputs and rank 0's result.

Workers are started with the spawn context (fork after CUDA initialisation is unsafe); the
rendezvous TCPStore lives in this process on a port the OS picks, so there is no port race.
"""
from __future__ import annotations

import signal
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from porter.engine.config import EngineConfig
from porter.engine.tp_check import check_tp_splittable
from porter.engine.worker import (
    CALL, CALL_WANT_RESULT, SHUTDOWN, WorkerSpec, encode_call, recv, send_request, worker_main,
)

STORE_HOST = "127.0.0.1"


class WorkerError(RuntimeError):
    """A worker raised; the message carries its rank and traceback."""


class WorkerDiedError(RuntimeError):
    """A worker process exited (killed, crashed) while the engine still needed it."""


def _name(method) -> str:
    return f"'{getattr(method, '__name__', method)}'"


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is unresponsive"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class MultiprocExecutor:
    """Starts `engine_config.tensor_parallel_size` workers, each building
    `runner_factory(engine_config=<its config>, **runner_kwargs)` as its TP rank, and calls runner
    methods on all of them at once.

    `step_timeout_s=None` waits as long as the workers live (first CUDA steps may compile kernels
    for minutes); a dead worker is noticed at once either way.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        runner_factory: Callable[..., Any] | str,
        runner_kwargs: dict | None = None,
        *,
        startup_timeout_s: float = 600.0,
        step_timeout_s: float | None = None,
    ):
        tp = engine_config.tensor_parallel_size
        check_tp_splittable(engine_config.hf_config, tp)
        device = torch.device(engine_config.device)
        if device.type == "cuda":
            # device_count does not create a CUDA context, so the children can still be spawned.
            if torch.cuda.device_count() < tp:
                raise ValueError(
                    f"tensor_parallel_size={tp} needs {tp} GPUs (one per rank); "
                    f"{torch.cuda.device_count()} visible"
                )
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise ValueError(f"tensor parallelism runs on cuda or cpu, not {device.type}")
        self.world_size = tp
        self.step_timeout_s = step_timeout_s
        self._store = dist.TCPStore(STORE_HOST, 0, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self._procs, self._conns = [], []
        # A factory from the caller's script needs that script re-imported in each worker.
        from_main = getattr(runner_factory, "__module__", None) == "__main__"
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        with nullcontext() if from_main else _main_module_hidden():
            self._start(ctx, engine_config, runner_factory, runner_kwargs, backend, startup_timeout_s)
        self._collect(range(tp), startup_timeout_s, "start-up")

    def _start(self, ctx, engine_config, runner_factory, runner_kwargs, backend, startup_timeout_s):
        tp = self.world_size
        for rank in range(tp):
            spec = WorkerSpec(
                rank, tp, STORE_HOST, self._store.port, backend, engine_config,
                runner_factory, dict(runner_kwargs or {}), startup_timeout_s,
            )
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, args=(spec, theirs), name=f"porter-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)

    # -- calls ------------------------------------------------------------------------------------
    def collective_rpc(self, method: str | Callable, *args, **kwargs) -> list:
        """Run `runner.<method>(*args, **kwargs)` (or `method(runner, *args, **kwargs)` for a
        picklable function) on every rank; returns every rank's result."""
        return self._call(method, args, kwargs, reply_ranks=range(self.world_size))

    def execute(self, method: str | Callable, *args, **kwargs):
        """Run the method on every rank; only rank 0's result is sent back (the others' logits or
        samples would be the same data again)."""
        return self._call(method, args, kwargs, reply_ranks=(0,))[0]

    def _call(self, method, args, kwargs, reply_ranks) -> list:
        if not self._finalizer.alive:
            raise RuntimeError("the tensor-parallel executor has been shut down")
        try:
            body = encode_call(method, args, kwargs)
            for rank, conn in enumerate(self._conns):
                try:
                    send_request(conn, CALL_WANT_RESULT if rank in reply_ranks else CALL, body)
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    self._fail_dead(f"while sending {_name(method)}")
            return self._collect(range(self.world_size), self.step_timeout_s, _name(method))
        except BaseException:
            # Interrupted (Ctrl-C) or failed half way: replies may be left in the pipes, and a later
            # call would read them as its own. Stop rather than desynchronise.
            self.shutdown()
            raise

    # -- waiting --------------------------------------------------------------------------------
    def _collect(self, ranks, timeout_s: float | None, what: str) -> list:
        """Wait for one reply per rank, watching every worker's process sentinel so a dead worker
        ends the wait at once instead of leaving this process blocked on a pipe."""
        results: list = [None] * self.world_size
        pending = set(ranks)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([self._conns[r] for r in pending] + [p.sentinel for p in self._procs], remaining)
            if not ready:
                self.shutdown()
                raise TimeoutError(
                    f"tensor-parallel workers {sorted(pending)} did not answer {what} within {timeout_s:.0f} s"
                )
            # Read replies before looking at sentinels: a worker that failed at start-up sends its
            # traceback and then exits, and the traceback is the useful part.
            for rank in sorted(pending):
                conn = self._conns[rank]
                if conn not in ready and not conn.poll():
                    continue
                try:
                    status, payload = recv(conn)
                except (EOFError, OSError):
                    self._fail_dead(f"during {what}")
                if status == "error":
                    self._fail_error(rank, what, payload)
                results[rank] = payload
                pending.discard(rank)
            if pending and any(not p.is_alive() for p in self._procs):
                self._fail_dead(f"during {what}")
        return results

    def _dead_workers(self) -> list[str]:
        return [
            f"rank {rank} (pid {p.pid}) {_describe_exit(p.exitcode)}"
            for rank, p in enumerate(self._procs)
            if not p.is_alive()
        ]

    def _fail_dead(self, when: str):
        # A dead worker's pipe reads EOF a moment before the process can be reaped: wait for it.
        deadline = time.monotonic() + 2.0
        while not self._dead_workers() and time.monotonic() < deadline:
            wait([p.sentinel for p in self._procs], 0.1)
        dead = self._dead_workers()
        self.shutdown()
        raise WorkerDiedError(
            f"tensor-parallel worker {', '.join(dead) or 'closed its pipe'} (noticed {when}); "
            "the engine cannot continue with a missing shard and has stopped its other workers"
        )

    def _fail_error(self, rank: int, what: str, tb: str):
        # An error on one rank is often only the echo of a peer that died mid-collective (gloo
        # raises "connection closed"); give the death a moment to register and report it instead.
        wait([p.sentinel for p in self._procs], 0.5)
        if self._dead_workers():
            self._fail_dead(f"during {what} (rank {rank} then failed: {tb.strip().splitlines()[-1]})")
        self.shutdown()
        raise WorkerError(f"tensor-parallel worker rank {rank} failed during {what}:\n{tb}")

    # -- teardown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive


@contextmanager
def _main_module_hidden():
    """Spawn re-runs the caller's `__main__` in every child before the target starts, so a script
    calling LLM(tensor_parallel_size=N) without an `if __name__ == "__main__":` guard would start
    workers from its workers. Ours need nothing from `__main__` (their code is in porter.engine):
    hide it while the children are launched (spawn reads it in Process.start)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _stop_workers(procs, conns, grace_s: float = 5.0) -> None:
    """Ask workers to stop, then terminate and kill what is left (a worker stuck in a collective
    whose peer died never reads the request)."""
    for conn in conns:
        try:
            send_request(conn, SHUTDOWN)
        except (OSError, EOFError):
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()
