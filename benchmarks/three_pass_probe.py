#!/usr/bin/env python3
"""Times the variants of the three-pass training path on one GPU, to choose its defaults.

For each (shape, data recipe) it jit-compiles ``value_and_grad`` of the mean loss with respect to (e, c) for
each variant, reports the median wall time of ``--iters`` calls, the compiled temporary memory, and the
relative difference of loss and gradients to ``cce_exact`` (float32 accumulation, no filtering). ``fw`` rows
time the loss alone. Variants:

- ``baseline``: dense XLA logits + optax (cce_jax.bench_impls.baseline_loss);
- ``cce``: impl="cce" as shipped (three-pass; Mosaic GPU logits chunk on Hopper, in-place gradient, dE chosen
  per chunk, dC chosen once per call from a sampled row block);
- ``3p-triton``: the same with the Pallas-Triton logits chunk (``forward_backend="triton"``);
- ``3p-dc-sparse`` / ``3p-dc-chunk``: dC always block-sparse / chosen per chunk (``KernelConfig.chunk_dc``);
- ``3p-dense``: dense products for every chunk;
- ``3p-de``: gradient of e only (so dC's cost is ``cce`` minus this);
- ``recompute``: grad_path="recompute" (one-pass forward, recomputing backward);
- ``xla``, ``cce_exact``: as named;
- ``budget=x2``: ``cce`` with twice the default memory budget.

``--passes`` times the pieces of one chunk step in isolation (the logits pass on either kernel, the in-place
gradient, the products), each as the difference of cumulative jitted steps, scaled to the call's chunk count.

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

from cce_jax import api, bench_data, bench_impls, benchmark, cce, options, three_pass


def _config(d, dtype, **changes):
    return dataclasses.replace(cce.default_config(d, dtype), **changes)


def variants(d, dtype, grad_bytes):
    cfg = lambda **kw: dict(impl=_config(d, dtype, **kw))  # noqa: E731
    return {
        "baseline": ("baseline", {}),
        "cce": ("lib", dict(impl="cce")),
        "3p-triton": ("lib", cfg(forward_backend="triton")),
        "3p-dc-sparse": ("lib", cfg(chunk_dc="sparse")),
        "3p-dc-chunk": ("lib", cfg(chunk_dc="per_chunk")),
        "3p-dense": ("lib", cfg(chunk_dense_fraction=-1.0, chunk_dc="dense")),
        "3p-de": ("lib-e", dict(impl="cce")),
        "recompute": ("lib", dict(impl="cce", grad_path="recompute")),
        "xla": ("lib", dict(impl="xla")),
        "cce_exact": ("lib", dict(impl="cce_exact")),
        "budget=x2": ("lib", dict(impl="cce",
                                  max_temp_bytes=int(2 * three_pass.DEFAULT_BUDGET_FRACTION * grad_bytes))),
    }


def passes(shape: str, recipe: str, data, iters: int):
    """Per-piece timing of one chunk step of ``impl="cce"`` (bf16, mean loss), scaled to the whole call."""
    from cce_jax.stats import LogitSpec, LossCoefficients

    n, d, v = benchmark.SHAPES[shape]
    e, c, t = data.e, data.c, data.targets
    config = cce.default_config(d, e.dtype)
    spec = LogitSpec()
    logits = cce.ChunkLogits(spec, config, False)
    plan = cce.chunk_plan(n, d, v, e.dtype, logits, three_pass.default_budget(e.shape, c.shape, e.dtype))
    k = plan.chunk
    e_k, t_k = e[:k], t[:k]
    coeffs = LossCoefficients(jnp.full((k,), 1.0 / n), jnp.full((k,), -1.0 / n), jnp.zeros((k,)), jnp.zeros((k,)))
    sparse = three_pass.SparseProducts(filter_eps=options.resolve_filter_eps("auto", e.dtype), filter_e=True,
                                       filter_c=True,
                                       dense_fraction=config.chunk_dense_fraction, config=config.backward,
                                       interpret=False)
    rows = []

    def record(name, fn, *args, donate=None):
        try:
            f = jax.jit(fn, donate_argnums=donate) if donate is not None else jax.jit(fn)
            out = jax.block_until_ready(f(*args))
            times = []
            for _ in range(iters):
                if donate is not None:
                    args = (out,) + args[1:]
                t0 = time.perf_counter()
                out = jax.block_until_ready(f(*args))
                times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            rows.append(dict(shape=shape, data=recipe, piece=name, chunk=k, chunks=plan.num_chunks,
                             ms_chunk=ms, ms_call=ms * plan.num_chunks))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(shape=shape, data=recipe, piece=name, error=f"{type(exc).__name__}: {exc}"[:300]))
        print(json.dumps(rows[-1]), flush=True)

    for backend in ("mosaic", "triton"):
        pass_logits = cce.ChunkLogits(spec, dataclasses.replace(config, forward_backend=backend), False)

        def pass1(e_k, logits=pass_logits):
            x, m, lse, _, _ = logits(e_k, t_k, c, None)
            return x, m, lse

        def pass12(e_k, logits=pass_logits):
            x, m, lse, _, _ = logits(e_k, t_k, c, None)
            return logits.gradient(x, m, lse, t_k, coeffs, v=v, col_sums=False, dtype=e.dtype)[0]

        record(f"logits[{backend}]", pass1, e_k)
        record(f"logits+grad[{backend}]", pass12, e_k)

    def step(dc, need_de, dc_mode, de_sparse=None):
        sp = sparse if de_sparse is None else dataclasses.replace(
            sparse, dense_fraction=-1.0 if not de_sparse else 1.0)
        de0 = jnp.zeros((k, d), e.dtype) if need_de else None
        _, (de, dc, _) = three_pass._chunk_gradients(  # noqa: SLF001
            e_k, t_k, coeffs, c, None, spec=spec, logits=logits, need=(need_de, dc is not None, False),
            sparse=sp, dc_mode=dc_mode, carry=(de0, dc, None))
        return dc if dc is not None else de

    dc0 = jnp.zeros(c.shape, c.dtype)
    record("step dE dense", lambda: step(None, True, None, de_sparse=False))
    record("step dE sparse", lambda: step(None, True, None, de_sparse=True))
    record("step dC dense", lambda dc: step(dc, False, "dense"), dc0, donate=(0,))
    record("step dC sparse", lambda dc: step(dc, False, "sparse"), jnp.zeros(c.shape, c.dtype), donate=(0,))
    record("step dC per_chunk", lambda dc: step(dc, False, "per_chunk"), jnp.zeros(c.shape, c.dtype), donate=(0,))
    # The dense products alone, for the cuBLAS comparison.
    g = jnp.zeros((k, v), e.dtype) + jnp.asarray(1e-3, e.dtype)
    record("dot G c", lambda g: three_pass._dot(g, c, 1, 0), g)  # noqa: SLF001
    record("dot dC += G^T e", lambda dc, g: (dc.astype(jnp.float32) + three_pass._dot(g, e_k, 0, 0)).astype(dc.dtype),
           jnp.zeros(c.shape, c.dtype), g, donate=(0,))
    return rows


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
    p.add_argument("--passes", action="store_true", help="also time the pieces of one chunk step")
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
            data = bench_data.make_data(recipe, n, d, v, "bf16", seed=0)
            print(f"# {shape} {recipe} {data.stats}", flush=True)
            ops = (data.e, data.c, data.targets)
            exact = None
            for name, (kind, kw) in names:
                row = dict(shape=shape, data=recipe, variant=name, live_128=data.stats.get("live_128x128"),
                           live_16=data.stats.get("live_16x128"))
                try:
                    if name not in compiled:
                        if kind == "baseline":
                            loss = bench_impls.baseline_loss
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
            if args.passes:
                rows.extend(passes(shape, recipe, data, args.iters))
            if args.fw:
                for name, impl in (("fw cce", "cce"), ("fw cce-triton", _config(d, jnp.bfloat16,
                                                                               forward_backend="triton")),
                                   ("fw baseline", None)):
                    if name not in compiled:
                        f = bench_impls.baseline_loss if impl is None else (
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
        if "piece" in r:
            print(f"{r['shape']:8} {r['data']:10} {r['piece']:24} chunk {r.get('ms_chunk', float('nan')):7.3f} ms"
                  f" call {r.get('ms_call', float('nan')):7.2f} ms {r.get('error', '')[:80]}")
            continue
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
