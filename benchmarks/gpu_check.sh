#!/usr/bin/env bash
# One device call: the GPU tests of the kernels, then the three-pass probe (variants + per-pass timing).
# Usage (on the GPU machine, from the repository root): OUT=<dir> CCE_BENCH_COMMIT=<commit> benchmarks/gpu_check.sh
# Optional: PROBE_ARGS (default below), SKIP_TESTS=1.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
fi
PROBE_ARGS=${PROBE_ARGS:---shape gemma2,llama3 --data lm,flat --iters 5 --passes --fw}
timeout ${PROBE_TIMEOUT:-420} python3 benchmarks/three_pass_probe.py $PROBE_ARGS --json "$OUT/probe.json" 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT/probe.log" | tail -80
