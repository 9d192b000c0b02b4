#!/usr/bin/env python3
"""Where the time of one compiled fw-bw (or fw) call goes, kernel by kernel, on the GPU.

For each (shape, data recipe, variant) it compiles ``jax.value_and_grad`` of the mean loss w.r.t. (e, c)
(``--kind fw``: the loss alone),
warms it up, times ``--iters`` calls by wall clock, then records ``--trace-calls`` calls under
``jax.profiler.trace`` (CUPTI; kernels run as they do outside the profiler, concurrently where XLA lets them) and
sums the GPU kernels' durations per call by kernel name and by the XLA op that launched them. The GPU's busy
time against the wall span shows how much of a call is idle (launch gaps, host waits).

Per-call host cost: ``ms`` is the median of blocked calls (each waits for its result, as the benchmark's rows
do); ``pipelined_ms`` is the wall time of ``--iters`` calls dispatched back to back, then waited for once, per
call, in rounds interleaved with the blocked ones (so a drift of the GPU clock hits both alike). A call whose
blocked time exceeds its pipelined time by more than the kernel launch latency pays a fixed cost per call
(host work before its kernels start) that back-to-back dispatch hides.

    python3 benchmarks/kernel_breakdown.py --shape gemma2 --data lm --variant cce,baseline --json out.json

Variants: ``baseline`` (dense XLA + optax), ``kernel`` (``--kind fw`` only: the library's forward kernel alone,
``cce``'s default config, its per-token outputs summed), ``cce``, ``cce_exact``, ``xla``, ``budget=xK`` (``cce`` with K times
the default memory budget), ``chunk=T`` (``cce`` with T-token chunks), ``sort`` (``cce`` with
``KernelConfig.sort_vocab``), ``de=B`` (``cce`` with ``KernelConfig.sparse_de_backend=B``: ``triton``,
``auto``, ``mosaic``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cce_jax import api, bench_data, bench_impls, benchmark, cce, three_pass  # noqa: E402
from cce_jax.stats import LogitSpec  # noqa: E402


def loss_fn(variant: str, d: int, grad_bytes: int):
    if variant == "baseline":
        return bench_impls.baseline_loss
    if variant == "kernel":
        return forward_kernel_loss
    kw: dict = {}
    if variant in ("cce", "cce_exact", "xla"):
        kw = dict(impl=variant)
    elif variant.startswith("budget=x"):
        kw = dict(impl="cce", max_temp_bytes=int(float(variant[8:]) * three_pass.DEFAULT_BUDGET_FRACTION
                                                 * grad_bytes))
    elif variant == "sort":
        kw = dict(impl=dataclasses.replace(cce.default_config(d, jnp.bfloat16), sort_vocab=True))
    elif variant.startswith("de="):
        kw = dict(impl=dataclasses.replace(cce.default_config(d, jnp.bfloat16), sparse_de_backend=variant[3:]))
    elif variant.startswith("chunk="):
        kw = dict(impl=dataclasses.replace(cce.default_config(d, jnp.bfloat16), chunk_tokens=int(variant[6:])))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return lambda e, c, t: api.linear_cross_entropy(e, c, t, **kw)


def forward_kernel_loss(e, c, t):
    """The sum of the per-token lse of the forward kernel that ``cce`` dispatches to (``cce._forward``: Mosaic
    GPU on Hopper, Triton elsewhere, in interpret mode without a GPU), with its default config."""
    interpret = jax.default_backend() != "gpu"
    config = cce.default_config(e.shape[1], e.dtype)
    return cce._forward(e, c, None, t, LogitSpec(), config, interpret).lse.sum()  # noqa: SLF001


def timings(fn, ops, iters: int, rounds: int = 3) -> dict:
    """Median blocked and pipelined wall milliseconds per call (module docstring), rounds interleaved."""
    blocked, pipelined = [], []
    for _ in range(rounds):
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*ops))
            blocked.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*ops) for _ in range(iters)])
        pipelined.append((time.perf_counter() - t0) * 1e3 / iters)
    return dict(ms=statistics.median(blocked), pipelined_ms=statistics.median(pipelined))


def _short(name: str) -> str:
    name = re.sub(r"\(.*", "", name)
    return name if len(name) <= 90 else name[:87] + "..."


def kernel_events(trace_dir: str):
    """(name, hlo_op, ts_us, dur_us) of every GPU kernel/memcpy event in the perfetto trace under trace_dir."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"no trace file under {trace_dir}: {glob.glob(trace_dir + '/**', recursive=True)[:20]}")
    with gzip.open(sorted(paths)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # Device rows: processes whose name mentions the GPU.
    pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
            and re.search(r"/device:GPU|GPU:|gpu", str(e.get("args", {}).get("name", "")))}
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in pids:
            continue
        args = e.get("args", {})
        hlo = args.get("hlo_op") or args.get("long_name") or ""
        out.append((e.get("name", "?"), str(hlo), float(e["ts"]), float(e.get("dur", 0.0))))
    return out, sorted({str(e.get("args", {}).get("name")) for e in events
                        if e.get("ph") == "M" and e.get("name") == "process_name"})


def breakdown(fn, ops, calls: int):
    tmp = tempfile.mkdtemp(prefix="cce_trace_")
    jax.block_until_ready(fn(*ops))
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(fn(*ops))
    events, processes = kernel_events(tmp)
    if not events:
        return dict(error="no GPU events", processes=processes)
    # Streams overlap (XLA may run kernels concurrently): busy time is the union of the intervals.
    spans = sorted((ts, ts + dur) for _, _, ts, dur in events)
    busy, end = 0.0, -1e30
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    by_name = collections.defaultdict(lambda: [0.0, 0])
    by_op = collections.defaultdict(lambda: [0.0, 0])
    for name, hlo, _, dur in events:
        by_name[_short(name)][0] += dur / calls / 1e3
        by_name[_short(name)][1] += 1
        key = re.sub(r"\.\d+$", "", hlo.split("=")[0].strip()) if hlo else _short(name)
        by_op[key][0] += dur / calls / 1e3
        by_op[key][1] += 1
    top = lambda d: sorted(([k, round(v[0], 3), v[1] // calls] for k, v in d.items()),  # noqa: E731
                           key=lambda r: -r[1])[:40]
    return dict(span_ms=(spans[-1][1] - spans[0][0]) / calls / 1e3, busy_ms=busy / calls / 1e3,
                kernel_ms=sum(dur for *_, dur in events) / calls / 1e3, kernels_per_call=len(events) / calls,
                by_name=top(by_name), by_op=top(by_op))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gemma2")
    p.add_argument("--data", default="lm")
    p.add_argument("--variant", default="cce,baseline")
    p.add_argument("--kind", default="fw-bw", choices=("fw-bw", "fw"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--trace-calls", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for shape in args.shape.split(","):
        n, d, v = benchmark.SHAPES[shape]
        grad_bytes = 2 * (n * d + v * d)
        for recipe in args.data.split(","):
            data = bench_data.make_data(recipe, n, d, v, "bf16", seed=0)
            ops = (data.e, data.c, data.targets)
            for variant in args.variant.split(","):
                row = dict(shape=shape, data=recipe, variant=variant, kind=args.kind)
                try:
                    if variant == "kernel" and args.kind != "fw":
                        raise ValueError("variant kernel times the forward alone: use --kind fw")
                    loss = loss_fn(variant, d, grad_bytes)
                    fn = jax.jit(loss if args.kind == "fw" else jax.value_and_grad(loss, argnums=(0, 1)))
                    fn = fn.lower(*ops).compile()
                    row["temp_mb"] = fn.memory_analysis().temp_size_in_bytes / 2**20
                    jax.block_until_ready(fn(*ops))
                    row.update(timings(fn, ops, args.iters))
                    row.update(breakdown(fn, ops, args.trace_calls))
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                rows.append(row)
                print(f"\n## {shape} {recipe} {variant}: {row.get('ms', float('nan')):.2f} ms wall "
                      f"({row.get('pipelined_ms', float('nan')):.2f} pipelined), "
                      f"GPU busy {row.get('busy_ms', float('nan')):.2f} ms, span {row.get('span_ms', float('nan')):.2f}"
                      f" ms, kernels {row.get('kernel_ms', float('nan')):.2f} ms, temp {row.get('temp_mb', 0):.0f} MB "
                      f"{row.get('error', '')}", flush=True)
                for k, ms, count in row.get("by_op", []):
                    print(f"  {ms:8.3f} ms  x{count:<4} {k}")
                print("  -- by kernel name --")
                for k, ms, count in row.get("by_name", [])[:15]:
                    print(f"  {ms:8.3f} ms  x{count:<4} {k}")
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                       commit=os.environ.get("CCE_BENCH_COMMIT"), rows=rows), f, indent=1)
            del data, ops
    return 0


if __name__ == "__main__":
    sys.exit(main())
