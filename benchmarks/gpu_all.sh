#!/usr/bin/env bash
# Check and benchmark the GPU path in one device call (see the README's GPU section):
#   GPU tests (kernels vs references, engine GPU vs CPU parity), bf16 verify, kernel bench, end-to-end bench.
# Run from the repo root on the GPU machine; carry wheels/ (a libcst wheel for that machine's Python).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/porter-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps wheels/*.whl 2>&1 | grep -v -i warning
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

stage() { echo; echo "=== $1"; }
stage "GPU tests";      timeout 240 python3 -m pytest -q -x -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
stage "convert qwen3";  porter convert qwen3 -o "$OUT/qwen3_engine.py" > "$OUT/convert.log" 2>&1 || tail -n 20 "$OUT/convert.log"
stage "verify bf16";    timeout 120 porter verify --tiny llama --dtype bfloat16 --device cuda --json "$OUT/verify_bf16.json" 2>&1 | tail -n 20
stage "kernel bench";   timeout 240 python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log" | tail -n 40
stage "end-to-end";     timeout 420 python3 benchmarks/bench_e2e.py --model-file "$OUT/qwen3_engine.py" 2>&1 | tee "$OUT/bench_e2e.log" | tail -n 20
