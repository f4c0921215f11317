"""The multi-process executor on its own: start-up, collectives across ranks, error and death
reporting. A stand-in runner replaces the model so these tests do not depend on the layers."""
import os
import subprocess
import sys
import textwrap
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


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, time
    from test_tp_executor import StandInRunner, tiny_config
    from porter.engine.executor import MultiprocExecutor, WorkerDiedError

    for scenario in ("between-steps", "mid-collective"):
        ex = MultiprocExecutor(tiny_config(), StandInRunner)
        pids = [pid for _, _, pid in ex.collective_rpc("whoami")]
        t0 = time.monotonic()
        try:
            if scenario == "between-steps":
                os.kill(pids[1], signal.SIGKILL)
                time.sleep(0.2)
                ex.execute("whoami")
            else:  # rank 1 dies while rank 0 waits for it inside an all-reduce
                threading.Timer(0.5, os.kill, (pids[1], signal.SIGKILL)).start()
                ex.execute("sleep_then_reduce", 1.5)
        except WorkerDiedError as e:
            others_alive = [p.is_alive() for p in ex._procs]
            print(scenario, "RAISED", round(time.monotonic() - t0, 2), others_alive, e, flush=True)
        else:
            print(scenario, "NO ERROR", flush=True)
    """
)


def test_killed_worker_raises_instead_of_hanging():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    # The subprocess timeout is the watchdog: a hang fails the test rather than the session.
    out = subprocess.run([sys.executable, "-c", _KILL_SCRIPT], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["between-steps", "mid-collective"], out.stdout + out.stderr[-3000:]
    for line in lines:
        assert line.split()[1] == "RAISED", line
        assert "rank 1 (pid" in line and "was killed by SIGKILL" in line
        assert "[False, False]" in line  # the surviving rank was stopped too
        assert float(line.split()[2]) < 10.0  # seconds from the kill's request to the error
