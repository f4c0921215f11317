#!/usr/bin/env bash
# Tensor parallelism on two GPUs in one device call (kind nvidia-h200-x2), from the repo root:
#   the GPU TP test (TP=2 bf16 greedy close to TP=1), `porter verify --tp 2` in bf16 against HF,
#   and benchmarks/bench_tp.py (TP=1 vs TP=2 throughput and batch-1 decode, Qwen3-0.6B shape).
# Installs with benchmarks/gpu_setup.sh.
set -uo pipefail
# NVLink multicast stays off (the machine's rule: it can take the host's shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/porter-gpu-tp-out}; mkdir -p "$OUT"
source benchmarks/gpu_setup.sh
python3 -c "import torch, triton, transformers; print('GPUs', torch.cuda.device_count())"

stage() { echo; echo "=== $1"; }
# plain `pytest`, not `python3 -m pytest`: the latter puts the checkout's porter/ (no engine/) first on sys.path
stage "GPU TP test";   timeout 120 pytest -q -m gpu tests/test_tp_llama.py -k tp2_bf16 2>&1 | tee "$OUT/gpu_tp_test.log" | tail -n 15
stage "verify TP=2 bf16"; timeout 100 porter verify --tiny llama --tp 2 --dtype bfloat16 --device cuda \
  --json "$OUT/verify_tp2_bf16.json" 2>&1 | tee "$OUT/verify_tp2.log" | tail -n 16
stage "convert qwen3"; porter convert qwen3 -o "$OUT/qwen3_engine.py" > "$OUT/convert.log" 2>&1 && tail -n 1 "$OUT/convert.log" || tail -n 20 "$OUT/convert.log"
stage "bench TP=1 vs TP=2"; timeout 300 python3 benchmarks/bench_tp.py --model-file "$OUT/qwen3_engine.py" \
  --json "$OUT/bench_tp.json" 2>&1 | tee "$OUT/bench_tp.log" | grep -v -E "Writing|Loading" | tail -n 16
