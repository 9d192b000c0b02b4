#!/usr/bin/env bash
# One device call: the GPU tests of the kernels, then the three-pass probe (variants + per-pass timing).
# Usage (on the GPU machine, from the repository root): OUT=<dir> CCE_BENCH_COMMIT=<commit> benchmarks/gpu_check.sh
# Optional: TESTS_K (a pytest -k expression; default all GPU tests, which take several minutes), SKIP_TESTS=1,
# TESTS_TIMEOUT, PROBE_ARGS, PROBE_TIMEOUT. Output is line-buffered so that a timeout keeps what ran.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -v -x -p no:cacheprovider tests/test_gpu_kernels.py \
    ${TESTS_K:+-k "$TESTS_K"} > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "PASS|FAIL|Error|passed|failed" "$OUT/gpu_tests.log" | tail -30
fi
PROBE_ARGS=${PROBE_ARGS:---shape gemma2,llama3 --data lm,flat --iters 5 --passes --fw}
timeout "${PROBE_TIMEOUT:-420}" python3 -u benchmarks/three_pass_probe.py $PROBE_ARGS --json "$OUT/probe.json" \
  > "$OUT/probe.log" 2>&1
echo "probe rc=$?"; grep -v "^WARNING\|^I0000\|^W0000" "$OUT/probe.log" | tail -60
