"""Time `porter convert` on each dev-set modeling file of the installed transformers.

    python benchmarks/convert_timing.py [--repeat 3] [model_type ...]

Prints, per file, the cold time (first conversion in this process: includes the one-time reading of
transformers' conversion mapping), the best of --repeat warm runs (wall clock) and that run's CPU time
(what one idle core would take; on a shared, loaded machine wall clock is several times higher),
with the per-pass split of the best run. Target: under 2 s per file.
"""
from __future__ import annotations

import argparse
import time

from porter.convert import convert_file
from porter.convert.source import resolve_source

DEV_SET = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt_neox"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*", default=DEV_SET)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model type':<12}{'lines':>7}{'cold s':>9}{'best s':>9}{'cpu s':>8}  slowest passes")
    worst = 0.0
    for t in args.types:
        path, _ = resolve_source(t)
        start = time.perf_counter()
        convert_file(path, model_type=t)
        cold = time.perf_counter() - start
        best, cpu, timings = float("inf"), 0.0, {}
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = convert_file(path, model_type=t)
            elapsed = time.perf_counter() - start
            if elapsed < best:
                best, cpu, timings = elapsed, time.process_time() - start_cpu, result.report.timings
        worst = max(worst, cpu)
        top = sorted(((v, k) for k, v in timings.items() if k != "total"), reverse=True)[:3]
        lines = len(path.read_text().splitlines())
        print(f"{t:<12}{lines:>7}{cold:>9.2f}{best:>9.2f}{cpu:>8.2f}  " + ", ".join(f"{k} {v:.2f}" for v, k in top))
    print(f"slowest file: {worst:.2f} CPU s ({'under' if worst < 2 else 'OVER'} the 2 s target)")


if __name__ == "__main__":
    main()
