#!/usr/bin/env python3
"""Diagnostics of the three-pass path's XLA pieces on a GPU: simple chunked XLA (the issue's probe), and the
library's chunk body with different slab widths and chunk sizes (dE only and dE + dC). Prints ms per variant and
dumps nothing unless --dump-hlo DIR is given (then the optimized HLO of the library's default variant)."""
import argparse, json, statistics, sys, time, dataclasses
import jax, jax.numpy as jnp
from jax import lax
from cce_jax import api, benchmark, cce


def simple(e, c, t, chunk, dc_f32):
    n = e.shape[0]
    def step(dc, xs):
        e_k, t_k = xs
        z = lax.dot_general(e_k, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(z, axis=1)
        g = jnp.exp(z - lse[:, None])
        g = jnp.where(jnp.arange(z.shape[1])[None, :] == t_k[:, None], g - 1.0, g) / n
        g = g.astype(e.dtype)
        de = lax.dot_general(g, c, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(e.dtype)
        upd = lax.dot_general(g, e_k, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dc = (dc.astype(jnp.float32) + upd).astype(dc.dtype)
        return dc, (de, lse)
    dc0 = jnp.zeros(c.shape, jnp.float32 if dc_f32 else c.dtype)
    dc, (de, lse) = lax.scan(step, dc0, (e.reshape(-1, chunk, e.shape[1]), t.reshape(-1, chunk)))
    return lse.sum(), de, dc


def timed(fn, args, iters=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="gemma2")
    p.add_argument("--dump-hlo", default=None)
    a = p.parse_args()
    n, d, v = benchmark.SHAPES[a.shape]
    data = benchmark.make_data("lm", n, d, v, "bf16", 0)
    ops = (data.e, data.c, data.targets)
    rows = []
    def run(name, fn):
        try:
            comp = jax.jit(fn).lower(*ops).compile()
            ms = timed(comp, ops)
            rows.append((name, ms, comp.memory_analysis().temp_size_in_bytes / 2**20))
        except Exception as exc:
            rows.append((name, float("nan"), str(exc)[:100]))
        print(rows[-1], flush=True)
    for chunk in (1024, 2048):
        run(f"simple chunk={chunk}", lambda e, c, t, chunk=chunk: simple(e, c, t, chunk, False))
    base = cce.default_config(d, jnp.bfloat16)
    for slab in (16384, 65536, 1 << 20):
        for chunk in (1024,):
            for argnums in ((0,), (0, 1)):
                cfg = dataclasses.replace(base, slab=slab, chunk_tokens=chunk, chunk_dense_fraction=-1.0)
                f = jax.value_and_grad(lambda e, c, t, cfg=cfg: api.linear_cross_entropy(e, c, t, impl=cfg), argnums=argnums)
                run(f"lib dense slab={slab} chunk={chunk} grads={argnums}", f)
    for impl in ("xla",):
        f = jax.value_and_grad(lambda e, c, t: api.linear_cross_entropy(e, c, t, impl="xla", max_temp_bytes=3 << 30), argnums=(0, 1))
        run("xla budget 3GB", f)
    if a.dump_hlo:
        cfg = dataclasses.replace(base, chunk_dense_fraction=-1.0)
        f = jax.value_and_grad(lambda e, c, t: api.linear_cross_entropy(e, c, t, impl=cfg), argnums=(0,))
        text = jax.jit(f).lower(*ops).compile().as_text()
        open(a.dump_hlo, "w").write(text)
    for r in rows:
        print(r)

main()
