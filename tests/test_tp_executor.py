"""The multi-process executor on its own: start-up, collectives across ranks, error and death
reporting. A stand-in runner replaces the model so these tests do not depend on the layers."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig

from porter.engine.config import EngineConfig
from porter.engine.distributed import get_tp_rank, get_tp_world_size, tensor_model_parallel_all_reduce
from porter.engine.executor import MultiprocExecutor, WorkerDiedError, WorkerError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


class StandInRunner:
    """What a model runner does with TP, minus the model: knows its rank, joins collectives."""

    def __init__(self, *, engine_config, fail_at_init_on_rank=None):
        self.rank, self.world = get_tp_rank(), get_tp_world_size()
        if self.rank == fail_at_init_on_rank:
            raise ValueError(f"stand-in refuses to start on rank {self.rank}")

    def whoami(self):
        return self.rank, self.world, os.getpid()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_reduce(x * (self.rank + 1))

    def fail_on(self, rank):
        if self.rank == rank:
            raise ValueError(f"stand-in failure on rank {self.rank}")
        return "fine"

    def sleep_then_reduce(self, seconds):
        time.sleep(seconds)
        return tensor_model_parallel_all_reduce(torch.ones(1))


def tiny_config(tp=2, **overrides):
    hf = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=100, **overrides,
    )
    return EngineConfig(hf_config=hf, tensor_parallel_size=tp)


def test_ranks_run_together_and_only_rank0_answers_execute():
    ex = MultiprocExecutor(tiny_config(), StandInRunner)
    try:
        who = ex.collective_rpc("whoami")
        assert [(r, w) for r, w, _ in who] == [(0, 2), (1, 2)]
        assert who[0][2] != who[1][2] != os.getpid()  # separate processes, none of them this one
        x = torch.arange(4.0)
        assert torch.equal(ex.execute("all_reduce", x), x * 3)  # rank 0 saw 1*x + 2*x
        assert not dist.is_initialized()  # the engine process keeps no distributed state
        with pytest.raises(WorkerError, match=r"rank 1 failed during 'fail_on'[\s\S]*stand-in failure on rank 1"):
            ex.execute("fail_on", 1)
        assert not ex.alive
        assert all(not p.is_alive() for p in ex._procs)
        with pytest.raises(RuntimeError, match="shut down"):
            ex.execute("whoami")
    finally:
        ex.shutdown()


def test_start_up_failure_carries_the_workers_traceback():
    with pytest.raises(WorkerError, match=r"rank 1 failed during start-up[\s\S]*refuses to start on rank 1"):
        MultiprocExecutor(tiny_config(), StandInRunner, {"fail_at_init_on_rank": 1})


def test_unsplittable_model_fails_before_any_worker_starts():
    import multiprocessing

    start = time.monotonic()
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by 3") as err:
        MultiprocExecutor(tiny_config(tp=3), StandInRunner)
    assert "num_key_value_heads=2 is fewer than 3 ranks" in str(err.value)
    assert "intermediate_size=64 is not divisible by 3" in str(err.value)
    assert multiprocessing.active_children() == []
    assert time.monotonic() - start < 1.0


def test_worker_killed_mid_collective_raises_instead_of_hanging():
    """Rank 1 dies while rank 0 waits for it inside an all-reduce (the LLM-level test kills one
    between steps)."""
    ex = MultiprocExecutor(tiny_config(), StandInRunner)
    pid1 = ex.collective_rpc("whoami")[1][2]
    outcome = {}

    def step():
        t0 = time.monotonic()
        try:
            ex.execute("sleep_then_reduce", 1.5)
            outcome["error"] = None
        except Exception as e:
            outcome["error"], outcome["secs"] = e, time.monotonic() - t0

    threading.Timer(0.5, os.kill, (pid1, signal.SIGKILL)).start()
    t = threading.Thread(target=step, daemon=True)  # watchdog: a hang fails the test, not the session
    t.start()
    t.join(timeout=30)
    try:
        assert not t.is_alive(), "the engine hung after a worker died mid-collective"
        err = outcome["error"]
        assert isinstance(err, WorkerDiedError), repr(err)
        assert f"rank 1 (pid {pid1}) was killed by SIGKILL" in str(err)
        assert outcome["secs"] < 10
        assert all(not p.is_alive() for p in ex._procs)  # the surviving rank was stopped too
    finally:
        ex.shutdown()


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, signal
    from test_tp_executor import StandInRunner, tiny_config
    from porter.engine.executor import MultiprocExecutor

    ex = MultiprocExecutor(tiny_config(), StandInRunner)
    print(*[pid for _, _, pid in ex.collective_rpc("whoami")], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no shutdown, no atexit: the workers are orphaned
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # an exited child of init may linger as a zombie
        return f.read().split(")")[-1].split()[0] != "Z"


def test_workers_exit_when_the_engine_process_is_killed():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT], capture_output=True, text=True, timeout=90, env=env)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stdout + out.stderr[-3000:]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "workers outlived the engine process"
