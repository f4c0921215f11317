"""Small-M linear on the GPU: porter's Triton GEMV vs cuBLAS (F.linear) vs the copy-bandwidth floor, at
the Qwen3-0.6B layer shapes and decode batches of 1..8 rows.

    python benchmarks/bench_gemv.py            # default configs
    python benchmarks/bench_gemv.py --sweep    # also the best tile config per point (for choose_config)

Each timed call reads a different copy of the weight (>= 256 MB in all, L2 is 50 MB), inside a CUDA graph,
so a call costs what it costs in the engine's decode graph: an HBM read plus the launch gap.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from bench_kernels import bench, copy_bandwidth, rel
from porter.kernels.gemv import GemvConfig, choose_config, gemv

DT = torch.bfloat16
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}
ROTATE_BYTES = 256 << 20
LAYERS = 28


def time_calls(fn, weights, x):
    """Median us of one call, from a CUDA graph calling fn once per weight copy."""
    for w in weights[:1]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    us = bench(graph.replay) * 1e3 / len(weights)
    del graph
    return us


def sweep_configs(m):
    for bn, bk, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (2, 4, 8)):
        if 2 * 32 * warps <= bn * bk * max(m, 1) <= 256 * 32 * warps:  # 2..256 fp32 values a thread
            yield GemvConfig(bn, bk, warps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="decode batch sizes M")
    ap.add_argument("--layers", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    print(f"{'layer':>8} {'N':>6} {'K':>5} {'M':>2} {'floor us':>8} {'cuBLAS us':>9} {'%floor':>6} "
          f"{'triton us':>9} {'%floor':>6} {'rel err':>8}" + ("  best 3 configs (us, %floor)" if args.sweep else ""))
    total = {"floor": 0.0, "cublas": 0.0, "triton": 0.0, "best": 0.0}
    for name in args.layers:
        n, k = SHAPES[name]
        nbytes = n * k * 2
        copies = max(1, min(16, ROTATE_BYTES // nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=DT) / k ** 0.5 for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=DT)
            err = rel(gemv(x, weights[0]), F.linear(x, weights[0]))
            floor = nbytes / copy_gbs / 1e3
            cub = time_calls(lambda a, w: F.linear(a, w), weights, x)
            tri = time_calls(lambda a, w: gemv(a, w), weights, x)
            line = (f"{name:>8} {n:6d} {k:5d} {m:2d} {floor:8.1f} {cub:9.1f} {100 * floor / cub:6.1f} "
                    f"{tri:9.1f} {100 * floor / tri:6.1f} {err:8.1e}")
            per_step = 1 if name == "lm_head" else LAYERS  # calls of this linear in a batch-1 step
            if m == 1:
                total["floor"] += floor * per_step
                total["cublas"] += cub * per_step
                total["triton"] += tri * per_step
            if args.sweep:
                results = [(time_calls(lambda a, w, c=c: gemv(a, w, config=c), weights, x), c)
                           for c in sweep_configs(m)]
                results.sort()
                best_us, best = results[0]
                line += "  " + ", ".join(f"{tuple(c)} ({us:.1f}, {100 * floor / us:.1f})" for us, c in results[:3])
                if m == 1:
                    total["best"] += best_us * per_step
            print(line, flush=True)
        del weights
    print(f"a batch-1 step's linears ({LAYERS} layers + lm_head): floor {total['floor']:.0f} us, cuBLAS "
          f"{total['cublas']:.0f} us, triton {total['triton']:.0f} us"
          + (f", best configs {total['best']:.0f} us" if args.sweep else "")
          + f"; default config {choose_config(1, 4096, 1024)}")


if __name__ == "__main__":
    main()
