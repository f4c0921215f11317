"""Tensor parallelism on a GPU pair: porter's engine at TP=1 vs TP=2, same model, same workload.

Model and workload are bench_e2e.py's (imported, not copied): a Qwen3-0.6B-shaped random bf16 checkpoint run
through the converted qwen3 model file (triton backend, CUDA graphs), and N requests with prompts of 100..512
tokens and outputs of 64..256, EOS ignored, max_num_seqs = min(N, 256). For each N: output tok/s at TP=1 and
TP=2 and their ratio. Then the batch-1 decode step at both, each with its floor: the largest rank's weight
bytes (LLM.weight_bytes_per_rank) over one GPU's measured copy bandwidth, since the ranks read their shards
in parallel.

    python benchmarks/bench_tp.py --model-file q.py [--requests 64 256] [--json out.json]

What TP=2 costs that TP=1 does not: two NCCL all-reduces per layer and, per step, one pipe round trip from
the engine process to the rank processes (the scheduler and sampler run in the engine process and on
rank 0). A 0.6B model is small for two GPUs, so a ratio below 2 (even below 1 at batch 1) is the expected
shape of the result, not a failure; the numbers themselves are only what a run prints.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench_e2e import copy_bandwidth, make_checkpoint, porter_decode_step, workload

# Both engines size their KV cache from this share of GPU memory. Below bench_e2e's 0.9: the bench process
# itself keeps a CUDA context (and the allocator's cache) on GPU 0, where TP=2's rank 0 also lives.
GPU_MEMORY_UTILIZATION = 0.6
TP_SIZES = (1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="porter engine throughput at TP=1 vs TP=2 (needs 2 GPUs)")
    ap.add_argument("--model-file", required=True, help="converted qwen3 engine model (porter convert qwen3)")
    ap.add_argument("--requests", type=int, nargs="+", default=[64, 256], help="workload sizes (requests)")
    ap.add_argument("--decode-steps", type=int, default=256, help="batch-1 decode steps timed")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs at either TP size")
    ap.add_argument("--json", default=None, help="write the results here (default: $OUT/bench_tp.json if $OUT)")
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.requests):
        ap.error("--requests must be positive")
    if args.decode_steps < 1:
        ap.error("--decode-steps must be positive")
    return args


def run_engine(ckpt: Path, model_file: str, tp: int, prompts, olens, *, decode_steps: int | None,
               enforce_eager: bool = False) -> dict:
    """One LLM at tensor_parallel_size=tp: tok/s over the workload and, with decode_steps, the batch-1
    decode step and the weight bytes of each rank. The LLM (and its workers) is gone on return."""
    from porter.engine import LLM, SamplingParams

    llm = LLM(model=str(ckpt), model_file=model_file, dtype="bfloat16", device="cuda", tensor_parallel_size=tp,
              max_num_seqs=min(len(prompts), 256), max_model_len=1024, skip_tokenizer_init=True,
              gpu_memory_utilization=GPU_MEMORY_UTILIZATION, enforce_eager=enforce_eager)
    try:
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in olens]
        llm.generate(prompts[:4], params[:4])  # warm-up: kernels compiled (graphs were captured at start)
        # generate returns sampled token ids on the host, so the GPU work is done when it returns
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        assert tokens == sum(olens), (tokens, sum(olens))
        result = {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens}
        if decode_steps:
            result["decode_step_s"] = porter_decode_step(llm, decode_steps)
            result["weight_bytes_per_rank"] = llm.weight_bytes_per_rank()
        return result
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def format_table(results: dict) -> str:
    """The printed summary of `results` (the JSON object main writes)."""
    lines = [f"{'requests':>8} {'TP1 tok/s':>10} {'TP2 tok/s':>10} {'TP2/TP1':>8}"]
    for key, entry in results.items():
        if not key.startswith("requests_"):
            continue
        tp1, tp2 = entry.get("tp1_tok_s"), entry.get("tp2_tok_s")
        ratio = tp2 / tp1 if tp1 and tp2 else None
        cells = [f"{v:>10.0f}" if v is not None else f"{'-':>10}" for v in (tp1, tp2)]
        lines.append(f"{key.removeprefix('requests_'):>8} {cells[0]} {cells[1]} "
                     + (f"{ratio:>8.2f}" if ratio is not None else f"{'-':>8}"))
        lines += [f"  tp{tp} error: {entry[f'tp{tp}_error']}" for tp in TP_SIZES if f"tp{tp}_error" in entry]
    for tp in TP_SIZES:
        d = results.get(f"tp{tp}_batch1_decode")
        if d:
            lines.append(f"batch-1 decode step TP{tp}: {d['step_ms']:.3f} ms, floor {d['floor_ms']:.3f} ms "
                         f"(largest rank {d['max_rank_weight_bytes'] / 2**20:.0f} MiB), ratio {d['ratio']:.2f}x")
    if "copy_bandwidth_GBps" in results:
        lines.append(f"copy bandwidth (one GPU, read + write): {results['copy_bandwidth_GBps']:.0f} GB/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.cuda.device_count() < max(TP_SIZES):
        raise SystemExit(f"bench_tp needs {max(TP_SIZES)} GPUs; {torch.cuda.device_count()} visible")
    bw = copy_bandwidth()
    gc.collect()
    torch.cuda.empty_cache()
    results: dict = {"copy_bandwidth_GBps": bw / 1e9, "cuda_graphs": not args.enforce_eager}
    out = args.json or (os.path.join(os.environ["OUT"], "bench_tp.json") if os.environ.get("OUT") else None)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "qwen3-0.6b-random"
        make_checkpoint(ckpt)
        torch.cuda.empty_cache()  # the checkpoint writer's blocks, cached on GPU 0
        for n in args.requests:
            prompts, olens = workload(n)
            entry = results[f"requests_{n}"] = {}
            for tp in TP_SIZES:
                try:
                    r = run_engine(ckpt, args.model_file, tp, prompts, olens,
                                   decode_steps=args.decode_steps if n == args.requests[0] else None,
                                   enforce_eager=args.enforce_eager)
                except Exception as e:  # report, keep the rest of the table (full traceback in the log)
                    traceback.print_exc()
                    lines = str(e).strip().splitlines() or [""]
                    entry[f"tp{tp}_error"] = f"{type(e).__name__}: {lines[0][:200]}" + (
                        f" ... {lines[-1][:200]}" if len(lines) > 1 else "")
                else:
                    record(results, entry, n, tp, r, bw)
                save(results, out)
            if "tp1_tok_s" in entry and "tp2_tok_s" in entry:
                entry["tp2_over_tp1"] = entry["tp2_tok_s"] / entry["tp1_tok_s"]
            save(results, out)
    print()
    print(format_table(results))


def record(results: dict, entry: dict, n: int, tp: int, r: dict, bw: float) -> None:
    entry[f"tp{tp}_tok_s"] = r["tok_s"]
    line = f"requests={n} TP={tp}: {r['tok_s']:.0f} tok/s ({r['tokens']} tokens in {r['seconds']:.2f} s)"
    if "decode_step_s" in r:
        biggest = max(r["weight_bytes_per_rank"])
        floor = biggest / bw
        results[f"tp{tp}_batch1_decode"] = {
            "step_ms": r["decode_step_s"] * 1e3, "floor_ms": floor * 1e3, "ratio": r["decode_step_s"] / floor,
            "max_rank_weight_bytes": biggest, "weight_bytes_per_rank": r["weight_bytes_per_rank"]}
        line += f", batch-1 decode step {r['decode_step_s'] * 1e3:.3f} ms"
    print(line, flush=True)


def save(results: dict, out: str | None) -> None:
    """Written after every run, so a run cut short by a time limit still leaves what it measured."""
    if out:
        Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
