"""FusedMoE on the GPU: the Triton grouped GEMM vs the torch expert loop (bf16, routed experts only).

    python benchmarks/bench_moe.py [--tokens 1 16 64 256 1024 4096] [--shapes mixtral qwen2_moe]

Both paths get the same precomputed top-k routing (softmax of random logits), so the table times the
expert computation alone. Prints ms per call (Triton eager, Triton replayed from a CUDA graph, torch
loop), the eager speedup, the graphed Triton path's TFLOP/s and its rate of expert-weight reads (the
bound at small token counts), and its error against the fp32 loop.
Writes bench_moe.json under $OUT when that is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from porter.engine.layers.fused_moe import fused_topk
from porter.kernels.moe import MoEConfig, fused_moe, pick_config
from porter.kernels.moe_reference import moe_reference

# (hidden, moe intermediate, experts, top_k) of the real models
SHAPES = {
    "mixtral": (4096, 14336, 8, 2),      # Mixtral-8x7B
    "qwen2_moe": (2048, 1408, 60, 4),    # Qwen1.5-MoE-A2.7B (routed experts; the shared expert is a dense MLP)
}


def time_ms(fn, warmup: int = 3, iters: int = 20, graph: bool = False) -> float:
    """Median ms per call. graph=True replays a CUDA graph of fn: GPU time without launch overhead
    (how the engine runs decode batches); only for host-sync-free code such as the Triton path."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# Candidate tiles for --sweep (informs pick_config; not used otherwise)
SWEEP = [
    MoEConfig(16, 32, 128, 32, 128, group_m=1, num_warps=4, num_stages=4),
    MoEConfig(16, 32, 256, 32, 256, group_m=1, num_warps=4, num_stages=3),
    MoEConfig(16, 128, 64, 128, 64, group_m=1, num_warps=4, num_stages=4),
    MoEConfig(16, 64, 128, 64, 128, group_m=1, num_warps=4, num_stages=4),
    MoEConfig(16, 64, 64, 64, 64, group_m=1, num_warps=4, num_stages=3),
    MoEConfig(32, 64, 128, 64, 128, num_warps=4, num_stages=3),
    MoEConfig(64, 64, 64, 128, 64, num_warps=4, num_stages=4),
    MoEConfig(64, 128, 64, 128, 64, num_warps=8, num_stages=3),
    MoEConfig(64, 64, 64, 256, 64, num_warps=8, num_stages=3),
    MoEConfig(128, 64, 64, 128, 64, num_warps=4, num_stages=4),
    MoEConfig(128, 128, 64, 128, 64, num_warps=8, num_stages=3),
    MoEConfig(128, 64, 64, 256, 64, num_warps=8, num_stages=3),
]


def bench_shape(name: str, tokens_list: list[int], sweep: bool = False, dtype=torch.bfloat16) -> list[dict]:
    hidden, inter, experts, top_k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=g) / inter**0.5).to(dtype)
    w13_f32, w2_f32 = w13.float(), w2.float()
    bytes_per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
        weights, ids = fused_topk(torch.randn(tokens, experts, device="cuda", generator=g), top_k, True)
        out = fused_moe(x, w13, w2, weights, ids)
        exact = moe_reference(x.float(), w13_f32, w2_f32, weights, ids) if tokens <= 1024 else None
        rel_err = float((out.float() - exact).norm() / exact.norm()) if exact is not None else None
        del exact
        t_triton = time_ms(lambda: fused_moe(x, w13, w2, weights, ids))
        t_graph = time_ms(lambda: fused_moe(x, w13, w2, weights, ids), graph=True)
        t_torch = time_ms(lambda: moe_reference(x, w13, w2, weights, ids))
        experts_hit = int(torch.unique(ids).numel())
        flops = 2 * tokens * top_k * 3 * hidden * inter
        cfg = pick_config(tokens, top_k, experts)
        rows.append(dict(shape=name, tokens=tokens, hidden=hidden, intermediate=inter, experts=experts,
                         top_k=top_k, triton_ms=t_triton, triton_graph_ms=t_graph, torch_ms=t_torch,
                         speedup=t_torch / t_triton, triton_tflops=flops / t_graph / 1e9,
                         weight_gbps=experts_hit * bytes_per_expert / t_graph / 1e6,
                         rel_err_vs_fp32=rel_err, block_m=cfg.block_m))
        r = rows[-1]
        err = f"{rel_err:.1e}" if rel_err is not None else "-"
        print(f"{name:10s} {tokens:6d} {t_triton:10.3f} {t_graph:10.3f} {t_torch:10.3f} {r['speedup']:8.2f}x "
              f"{r['triton_tflops']:8.1f} {r['weight_gbps']:9.0f} {err:>8s}", flush=True)
        if sweep:
            timed = {c: time_ms(lambda: fused_moe(x, w13, w2, weights, ids, config=c), iters=10, graph=True)
                     for c in SWEEP}
            best = min(timed, key=timed.get)
            r["sweep_best"], r["sweep_best_ms"] = best.__dict__, timed[best]
            print(f"{'':17s} sweep (graph ms): best {timed[best]:.3f} with {best}; "
                  f"picked {timed.get(cfg, float('nan')):.3f}", flush=True)
    del w13_f32, w2_f32
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time each candidate tile config")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype bf16")
    print(f"{'shape':10s} {'tokens':>6s} {'triton ms':>10s} {'graph ms':>10s} {'torch ms':>10s} {'speedup':>9s} "
          f"{'TFLOP/s':>8s} {'wGB/s':>9s} {'rel err':>8s}")
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.tokens, args.sweep)
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_moe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
