#!/usr/bin/env python3
"""Times the variants of the three-pass training path on one GPU, to choose its defaults.

For each (shape, data recipe) it jit-compiles ``value_and_grad`` of the mean loss with respect to (e, c) for
each variant, reports the median wall time of ``--iters`` calls, the compiled temporary memory, and the
relative difference of loss and gradients to ``cce_exact`` (float32 accumulation, no filtering). ``fw`` rows
time the loss alone. Variants:

- ``baseline``: dense XLA logits + optax (cce_jax.benchmark.baseline_loss);
- ``recompute``: impl="cce" with grad_path="recompute" (one-pass forward, recomputing backward);
- ``3p-dense``: impl="cce", three-pass, dense products for every chunk;
- ``3p-sparse``: three-pass, block-sparse products for every chunk;
- ``3p-auto``: three-pass, per-chunk choice for dE, block-sparse dC (the default);
- ``3p-dccond``: three-pass, per-chunk choice for dE and dC (KernelConfig.chunk_dc_cond);
- ``3p-de``: three-pass, gradient of e only (so dC's cost is 3p-auto minus this);
- ``xla``, ``cce_exact``: as named;
- ``budget=x2``: 3p-auto with twice the default memory budget.

    python3 benchmarks/three_pass_probe.py --shape gemma2,llama3 --data lm,lm-sorted,flat --json probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from cce_jax import api, benchmark, cce, three_pass


def _config(d, dtype, **changes):
    return dataclasses.replace(cce.default_config(d, dtype), **changes)


def variants(d, dtype, grad_bytes):
    base = dict(impl="cce")
    out = {
        "baseline": ("baseline", {}),
        "recompute": ("lib", dict(base, grad_path="recompute")),
        "3p-dense": ("lib", dict(impl=_config(d, dtype, chunk_dense_fraction=-1.0, chunk_dc_cond=True))),
        "3p-sparse": ("lib", dict(impl=_config(d, dtype, chunk_dense_fraction=1.0))),
        "3p-dccond": ("lib", dict(impl=_config(d, dtype, chunk_dc_cond=True))),
        "3p-auto": ("lib", dict(base)),
        "3p-de": ("lib-e", dict(base)),
        "xla": ("lib", dict(impl="xla")),
        "cce_exact": ("lib", dict(impl="cce_exact")),
        "budget=x2": ("lib", dict(base, max_temp_bytes=int(2 * three_pass.DEFAULT_BUDGET_FRACTION * grad_bytes))),
    }
    return out


def timed(fn, args, iters):
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gemma2,llama3")
    p.add_argument("--data", default="lm,lm-sorted,flat")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--fw", action="store_true", help="also time the loss alone (cce, xla, baseline)")
    args = p.parse_args(argv)
    rows = []
    wanted = None if args.variants is None else set(args.variants.split(",")) | {"cce_exact"}
    for shape in args.shape.split(","):
        n, d, v = benchmark.SHAPES[shape]
        grad_bytes = 2 * (n * d + v * d)
        names = [(k, x) for k, x in variants(d, jnp.bfloat16, grad_bytes).items() if wanted is None or k in wanted]
        names.sort(key=lambda kv: kv[0] != "cce_exact")
        compiled = {}
        for recipe in args.data.split(","):
            data = benchmark.make_data(recipe, n, d, v, "bf16", seed=0)
            print(f"# {shape} {recipe} {data.stats}", flush=True)
            ops = (data.e, data.c, data.targets)
            exact = None
            for name, (kind, kw) in names:
                row = dict(shape=shape, data=recipe, variant=name, live_128=data.stats.get("live_128x128"),
                           live_16=data.stats.get("live_16x128"))
                try:
                    if name not in compiled:
                        if kind == "baseline":
                            loss = benchmark.baseline_loss
                        else:
                            loss = lambda e, c, t, kw=kw: api.linear_cross_entropy(e, c, t, **kw)  # noqa: E731
                        argnums = (0,) if kind == "lib-e" else (0, 1)
                        t0 = time.perf_counter()
                        compiled[name] = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*ops).compile()
                        row["compile_s"] = time.perf_counter() - t0
                    fn = compiled[name]
                    row["temp_mb"] = fn.memory_analysis().temp_size_in_bytes / 2**20
                    out, row["ms"] = timed(fn, ops, args.iters)
                    again = jax.block_until_ready(fn(*ops))
                    row["det"] = all(bool(jnp.array_equal(a, b)) for a, b in
                                     zip(jax.tree.leaves(out), jax.tree.leaves(again)))
                    if name == "cce_exact":
                        exact = out
                    elif exact is not None:
                        row["err_loss"] = rel(out[0], exact[0])
                        row["err_de"] = rel(out[1][0], exact[1][0])
                        if len(out[1]) > 1:
                            row["err_dc"] = rel(out[1][1], exact[1][1])
                    del out, again
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.fw:
                for name, impl in (("fw cce", "cce"), ("fw xla", "xla"), ("fw baseline", None)):
                    if name not in compiled:
                        f = benchmark.baseline_loss if impl is None else (
                            lambda e, c, t, impl=impl: api.linear_cross_entropy(e, c, t, impl=impl))
                        compiled[name] = jax.jit(f).lower(*ops).compile()
                    fn = compiled[name]
                    _, ms = timed(fn, ops, args.iters)
                    rows.append(dict(shape=shape, data=recipe, variant=name, ms=ms,
                                     temp_mb=fn.memory_analysis().temp_size_in_bytes / 2**20))
                    print(json.dumps(rows[-1]), flush=True)
            del data, ops
        del compiled
        if args.json:
            _write(args.json, rows)
    print(f"\n{'shape':8} {'data':10} {'variant':12} {'ms':>8} {'temp MB':>9} {'err dE':>8} {'err dC':>8} det")
    for r in rows:
        print(f"{r['shape']:8} {r['data']:10} {r['variant']:12} {r.get('ms', float('nan')):8.2f} "
              f"{r.get('temp_mb', float('nan')):9.1f} {r.get('err_de', float('nan')):8.1e} "
              f"{r.get('err_dc', float('nan')):8.1e} {r.get('det', '')} {r.get('error', '')[:80]}")
    if args.json:
        _write(args.json, rows)
    return 0


def _write(path, rows):
    with open(path, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
