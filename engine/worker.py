"""The body of one tensor-parallel worker process (started by engine/executor.py with spawn).

A worker joins the process group, builds a runner (for LLM: the engine's ModelRunner) as its
rank, then serves calls from the executor over its pipe until told to stop: each request names a
runner method and its arguments, every rank runs it (so the collectives inside the model's layers
line up), and the reply carries the result, an error traceback, or nothing when the executor only
wants rank 0's answer. A request may also carry a picklable function, called as `fn(runner, ...)`.

Messages are pickled explicitly (`send_bytes`), not through `Connection.send`: once torch is
imported that path moves tensors through shared-memory file descriptors, which costs more than
copying the small per-step payloads and results.
"""
from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from porter.engine.config import EngineConfig
from porter.engine.distributed import destroy_tensor_parallel, init_tensor_parallel

# A request is one flag byte and the pickled (method, args, kwargs): the executor pickles a step's
# inputs once and sends the same bytes to every rank, only the flag differs.
CALL, CALL_WANT_RESULT, SHUTDOWN = 0, 1, 2


@dataclass
class WorkerSpec:
    rank: int
    world_size: int
    store_host: str
    store_port: int
    backend: str  # "nccl" or "gloo"
    engine_config: EngineConfig
    runner_factory: Callable[..., Any] | str  # callable, or "module:attr"
    runner_kwargs: dict = field(default_factory=dict)
    timeout_s: float = 600.0


def send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn):
    return pickle.loads(conn.recv_bytes())


def encode_call(method, args, kwargs) -> bytes:
    return pickle.dumps((method, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)


def send_request(conn, flag: int, body: bytes = b"") -> None:
    conn.send_bytes(bytes([flag]) + body)


def resolve_factory(factory: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    if not attr:
        raise ValueError(f"runner factory '{factory}' must be 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


def to_cpu(obj):
    """Results cross to the parent on the CPU: a CUDA tensor would initialise CUDA there."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


def _exit_when_orphaned(poll_s: float = 1.0) -> None:
    """Exit when the engine process is gone, even if it was SIGKILLed, so no orphan waits forever
    inside a collective holding a GPU. A thread, not prctl(PR_SET_PDEATHSIG): that signal fires
    when the *thread* that started the worker ends, which would kill workers of an LLM built in a
    short-lived thread. Collectives release the GIL, so this thread runs while one blocks."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="porter-tp-orphan-watch", daemon=True).start()


def local_engine_config(spec: WorkerSpec) -> EngineConfig:
    cfg = spec.engine_config
    if cfg.device.type == "cuda":
        return replace(cfg, device=torch.device("cuda", spec.rank))  # one GPU per rank
    return cfg


def worker_main(spec: WorkerSpec, conn) -> None:
    _exit_when_orphaned()
    # Ctrl-C reaches the whole process group; the engine process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = local_engine_config(spec)
    try:
        if cfg.device.type == "cuda":
            torch.cuda.set_device(cfg.device)
        else:
            # CPU ranks share the cores: without this each would start one thread per core.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        init_tensor_parallel(
            spec.rank, spec.world_size, spec.store_host, spec.store_port, spec.backend, spec.timeout_s
        )
        runner = resolve_factory(spec.runner_factory)(engine_config=cfg, **spec.runner_kwargs)
    except BaseException:
        send(conn, ("error", traceback.format_exc()))
        destroy_tensor_parallel()
        sys.exit(1)
    send(conn, ("ok", None))
    try:
        _serve(runner, conn)
    finally:
        destroy_tensor_parallel()


def _serve(runner, conn) -> None:
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):  # the executor is gone
            return
        if request[0] == SHUTDOWN:
            return
        want_result = request[0] == CALL_WANT_RESULT
        method, args, kwargs = pickle.loads(memoryview(request)[1:])
        try:
            if callable(method):  # a function of the runner (tests, one-off inspection)
                result = method(runner, *args, **kwargs)
            else:
                result = getattr(runner, method)(*args, **kwargs)
        except Exception:
            send(conn, ("error", traceback.format_exc()))
            continue
        send(conn, ("ok", to_cpu(result) if want_result else None))
