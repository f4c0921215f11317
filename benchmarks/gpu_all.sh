#!/usr/bin/env bash
# Check and benchmark the GPU path in one device call:
#   GPU tests (kernels vs references, layer dispatch, engine on triton + CUDA graphs vs HF and eager),
#   a bf16 `porter verify`, the kernel bench (skipped with --no-kernel-bench), the end-to-end bench.
# Run from the repo root on the GPU machine; wheels/ may hold a libcst wheel for that machine's Python.
set -uo pipefail
OUT=${OUT:-/tmp/porter-gpu-out}; mkdir -p "$OUT"
kernel_bench=1; [ "${1:-}" = "--no-kernel-bench" ] && kernel_bench=0
source benchmarks/gpu_setup.sh

stage() { echo; echo "=== $1"; }
# plain `pytest`, not `python3 -m pytest`: the latter puts the checkout's porter/ (no engine/) first on sys.path
stage "GPU tests";     timeout 300 pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
stage "convert qwen3"; porter convert qwen3 -o "$OUT/qwen3_engine.py" > "$OUT/convert.log" 2>&1 && tail -n 1 "$OUT/convert.log" || tail -n 20 "$OUT/convert.log"
stage "verify bf16";   timeout 150 porter verify --tiny llama --dtype bfloat16 --device cuda --json "$OUT/verify_bf16.json" 2>&1 | tail -n 14
if [ $kernel_bench = 1 ]; then
  stage "kernel bench"; timeout 240 python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log" | tail -n 45
fi
stage "end-to-end";    timeout 420 python3 benchmarks/bench_e2e.py --model-file "$OUT/qwen3_engine.py" 2>&1 | tee "$OUT/bench_e2e.log" | grep -v -E "Writing|Loading" | tail -n 20
