#!/usr/bin/env bash
# One device call: optional kernel timing, the GPU tests of the kernels, then optional benchmark steps, each
# line-buffered into $OUT so that a timeout keeps what ran.
# Usage (on the GPU machine, from the repository root): OUT=<dir> CCE_BENCH_COMMIT=<commit> benchmarks/gpu_check.sh
# Optional: TESTS_K (a pytest -k expression; default all GPU tests, which take several minutes), SKIP_TESTS=1,
# TESTS_TIMEOUT; MOSAIC_ARGS (run benchmarks/mosaic_gpu_check.py with these arguments, first: the Mosaic forward's
# check and per-config timing); BEST_OF=1 (then run the tests and the benchmark with that run's fastest config,
# through benchmarks/variant_table.py --best-of); BENCH_ARGS (run python -m cce_jax.benchmark with these, writing
# bench.json and bench.md under $OUT); SKIP_PROBE=1, PROBE_ARGS, PROBE_TIMEOUT (the three-pass probe: variants +
# per-pass timing).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
  --format=csv,noheader | tee "$OUT/gpu.txt"
# SM clock, power and temperature every 200 ms while the steps run (a power-capped clock explains timing drift).
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 200 > "$OUT/clocks.csv" 2>&1 &
CLOCKS_PID=$!
trap 'kill $CLOCKS_PID 2>/dev/null' EXIT
if [ -n "${MOSAIC_ARGS:-}" ]; then
  timeout "${MOSAIC_TIMEOUT:-300}" python3 -u benchmarks/mosaic_gpu_check.py $MOSAIC_ARGS --json "$OUT/mosaic.json" \
    > "$OUT/mosaic.log" 2>&1
  echo "mosaic check rc=$?"; sed -n '/^== /,$p' "$OUT/mosaic.log" | tail -40
fi
if [ -n "${BEST_OF:-}" ] && [ -f "$OUT/mosaic.json" ]; then
  # The fastest Mosaic forward config of that run becomes the library's for the steps below (variant table).
  python3 benchmarks/variant_table.py "$OUT/variant_table.json" --best-of "$OUT/mosaic.json" | tee "$OUT/variant.txt" \
    && export CCE_JAX_TUNING_FILE="$OUT/variant_table.json"
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -v -x -p no:cacheprovider tests/test_gpu_kernels.py \
    ${TESTS_K:+-k "$TESTS_K"} > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "PASS|FAIL|Error|passed|failed" "$OUT/gpu_tests.log" | tail -30
fi
if [ -n "${BENCH_ARGS:-}" ]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 -m cce_jax.benchmark $BENCH_ARGS --json "$OUT/bench.json" \
    --markdown "$OUT/bench.md" > "$OUT/bench.log" 2>&1
  echo "benchmark rc=$?"; grep "^|" "$OUT/bench.md" | tail -40
fi
if [ -z "${SKIP_PROBE:-}" ]; then
  PROBE_ARGS=${PROBE_ARGS:---shape gemma2,llama3 --data lm,flat --iters 5 --passes --fw}
  timeout "${PROBE_TIMEOUT:-420}" python3 -u benchmarks/three_pass_probe.py $PROBE_ARGS --json "$OUT/probe.json" \
    > "$OUT/probe.log" 2>&1
  echo "probe rc=$?"; grep -v "^WARNING\|^I0000\|^W0000" "$OUT/probe.log" | tail -60
fi
