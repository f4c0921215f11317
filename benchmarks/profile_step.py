"""Where a step's time goes on the GPU: host (cProfile of the engine loop) and device (torch profiler).

    python benchmarks/profile_step.py --model-file q.py [--batch 1] [--tokens 128]
    python benchmarks/profile_step.py --model-file q.py --requests 64   # bench_e2e's workload, by step kind
    python benchmarks/profile_step.py --model-file q.py --requests 256 --busy   # GPU idle, async vs sync
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import pstats
import tempfile
import time
from pathlib import Path

import torch

from bench_e2e import make_checkpoint, workload


def steps_by_kind(llm, prompts, params) -> None:
    """Time every engine step (synchronised, so the host no longer overlaps the device: the sum is the
    serial cost) and sum by kind: graph decode, eager decode, prefill/mixed."""
    runner, sums = llm.runner, collections.defaultdict(lambda: [0, 0.0, 0])
    execute = runner.launch

    def timed_execute(step):
        kind = "prefill/mixed" if any(len(t) > 1 for t in step.new_token_ids) else "decode"
        if kind == "decode" and runner.graphs is not None and len(step.seq_ids) <= runner.graphs.sizes[-1]:
            kind = "decode (graph)"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = execute(step)
        out.result()
        torch.cuda.synchronize()
        entry = sums[kind]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        entry[2] += sum(len(t) for t in step.new_token_ids)
        return out

    runner.launch = timed_execute
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    runner.launch = execute
    in_steps = sum(e[1] for e in sums.values())
    print(f"wall {wall:.3f} s, in execute {in_steps:.3f} s, engine host outside execute {wall - in_steps:.3f} s")
    for kind, (n, secs, toks) in sorted(sums.items()):
        print(f"  {kind:>15}: {n:5d} steps {secs:7.3f} s  {secs / n * 1e3:7.3f} ms/step  {toks / n:8.1f} tokens/step")


def device_busy(llm, prompts, params) -> None:
    """How much of the run the GPU spends in kernels: the union of kernel intervals over the span from
    the first kernel to the last (CUDA activity only, so the host runs at nearly its normal speed)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, cur_start, cur_end = 0.0, *spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    print(f"async={llm.async_scheduling}: wall {wall * 1e3:.1f} ms, device span {span / 1e3:.1f} ms, "
          f"kernels busy {busy / 1e3:.1f} ms ({busy / span:.1%} of the span), {len(spans)} kernels")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-file", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=None, help="profile bench_e2e's workload of N requests")
    ap.add_argument("--kinds-only", action="store_true", help="with --requests: the step-kind table only")
    ap.add_argument("--busy", action="store_true",
                    help="only the device-busy fraction, with and without asynchronous scheduling")
    ap.add_argument("--cublas", action="store_true", help="decode linears on cuBLAS, not porter's GEMV kernel")
    ap.add_argument("--step-only", action="store_true", help="the batch-N step time only, no profiles")
    ap.add_argument("--separate-kv-write", action="store_true",
                    help="decode writes the KV cache in its own launch, as before the fused write")
    args = ap.parse_args()
    from porter.engine import LLM, SamplingParams
    from porter.engine.backends import triton_backend
    from porter.engine.layers import linear

    if args.cublas:
        linear.USE_KERNEL = False
    if args.separate_kv_write:
        def write_then_attend(q, k, v, k_cache, v_cache, meta, **opts):
            triton_backend.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            return triton_backend.paged_attention(q, k_cache, v_cache, meta, **opts)
        triton_backend.write_and_attend = write_then_attend

    seats = args.requests or max(8, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        make_checkpoint(ckpt)
        llm = LLM(model=str(ckpt), model_file=args.model_file, dtype="bfloat16", device="cuda",
                  max_num_seqs=min(seats, 256), max_model_len=1024, skip_tokenizer_init=True)
    if args.busy:
        prompts, olens = workload(args.requests) if args.requests else ([[7] * 128] * args.batch, None)
        params = ([SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in olens] if olens else
                  SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))
        llm.generate(prompts, params)
        for mode in (True, False):
            llm.async_scheduling = mode
            llm.reset_prefix_cache()
            device_busy(llm, prompts, params)
        return
    if args.requests:
        prompts, olens = workload(args.requests)
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in olens]
        llm.generate(prompts[:4], params[:4])
        steps_by_kind(llm, prompts, params)
        if args.kinds_only:
            return
    else:
        prompts = [[7] * 128] * args.batch
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        print(f"batch {args.batch}: {(time.perf_counter() - t0) / args.tokens * 1e3:.3f} ms per step (incl. prefill)",
              flush=True)
        if args.step_only:
            return
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as p:
        llm.generate(prompts, params if args.requests else SamplingParams(temperature=0, max_tokens=16,
                                                                          ignore_eos=True))
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
