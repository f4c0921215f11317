"""Where a decode step's time goes on the GPU: host (cProfile of the engine loop) and device (torch profiler).

    python benchmarks/profile_step.py --model-file q.py [--batch 1] [--tokens 128]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from bench_e2e import make_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-file", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    from porter.engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        make_checkpoint(ckpt)
        llm = LLM(model=str(ckpt), model_file=args.model_file, dtype="bfloat16", device="cuda",
                  max_num_seqs=max(8, args.batch), max_model_len=1024, skip_tokenizer_init=True)
    prompts = [[7] * 128] * args.batch
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    print(f"batch {args.batch}: {(time.perf_counter() - t0) / args.tokens * 1e3:.3f} ms per step (incl. prefill)")
    graphs = getattr(llm.runner, "graphs", None)
    print("graph replays:", getattr(graphs, "num_replays", None))
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as p:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
