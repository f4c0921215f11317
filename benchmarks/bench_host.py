"""Host time per engine step, without a model: scheduler, step input, input staging, update.

On a GPU the engine's host work is overhead whenever the GPU waits for it (decode steps of small models
are a few ms), so it is measured here on its own, on any machine:

    python benchmarks/bench_host.py [--batch 64 256] [--prompt 300] [--steps 200]
"""
from __future__ import annotations

import argparse
import time

import torch

from porter.engine.block_manager import BlockManager
from porter.engine.input_batch import InputBatch
from porter.engine.model_runner import StepInput
from porter.engine.sampling_params import SamplingParams
from porter.engine.scheduler import Scheduler
from porter.engine.sequence import Sequence


def run(batch: int, prompt: int, steps: int, block_size: int = 16, max_model_len: int = 4096) -> dict[str, float]:
    max_blocks = -(-max_model_len // block_size)
    bm = BlockManager(batch * max_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=batch, max_num_batched_tokens=max(8192, batch), max_model_len=max_model_len)
    inputs = InputBatch(max_num_tokens=max(8192, batch), max_num_seqs=batch, max_blocks_per_seq=max_blocks,
                        block_size=block_size, device=torch.device("cpu"))
    params = SamplingParams(temperature=0, max_tokens=steps + 10, ignore_eos=True)
    for i in range(batch):
        sched.add(Sequence(i, [(7 * i + j) % 1000 for j in range(prompt)], params))
    totals = dict(schedule=0.0, step_input=0.0, prepare=0.0, update=0.0)
    gone: list[int] = []
    counted = 0
    while counted < steps:
        t0 = time.perf_counter()
        b = sched.schedule()
        t1 = time.perf_counter()
        step = StepInput.from_batch(b, gone)
        t2 = time.perf_counter()
        inputs.release(step.finished_seq_ids)
        inputs.prepare(step.seq_ids, step.new_token_ids, step.num_computed, step.block_tables, step.blocks_from,
                       step.sample)
        t3 = time.perf_counter()
        sched.launched(b)
        finished = sched.update(b, [1] * sum(step.sample))
        t4 = time.perf_counter()
        gone = [s.seq_id for s in finished]
        if b.is_decode_only:  # prefill steps are few and their host time is small next to their GPU time
            counted += 1
            for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[k] += dt
    return {k: v / steps * 1e6 for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    print(f"{'batch':>6} " + " ".join(f"{k:>11}" for k in ("schedule", "step_input", "prepare", "update", "total")) +
          "   (us per decode step)")
    for batch in args.batch:
        r = run(batch, args.prompt, args.steps)
        print(f"{batch:>6} " + " ".join(f"{v:>11.1f}" for v in r.values()) + f" {sum(r.values()):>11.1f}")


if __name__ == "__main__":
    main()
