"""Measure kernel block configurations on the current GPU and print the best as a ``TUNED`` table entry.

    python -m cce_jax.autotune --n 8192 --d 2304 --v 256000 --dtype bf16

Forward candidates are timed on the forward kernel alone; backward candidates on ``value_and_grad`` with the
best forward, with filtering on (preset "cce") and off ("cce_exact"). Results go to stdout and, with
``--json``, to a file; paste the printed entry into ``cce_jax.cce.TUNED``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import cce_jax
from cce_jax.cce import KernelConfig, shape_class
from pallas_kernels.backward import BackwardConfig
from pallas_kernels.lse_forward import ForwardConfig

FORWARD_CANDIDATES = [
    ForwardConfig(bn, bv, bd, w, s)
    for (bn, bv, bd, w, s) in [
        (64, 256, 64, 8, 4), (64, 256, 64, 8, 5), (64, 256, 64, 4, 4), (64, 256, 32, 8, 5),
        (32, 256, 64, 4, 4), (64, 512, 32, 8, 4), (128, 256, 32, 8, 4), (64, 128, 64, 4, 4),
    ]
]
BACKWARD_CANDIDATES = [
    BackwardConfig(bn, bv, bd, bo, chunk_v=8192, grad_warps=gw, grad_stages=gs, product_warps=pw,
                   product_stages=ps)
    for (bn, bv, bd, bo, gw, gs, pw, ps) in [
        (64, 256, 64, 128, 8, 4, 8, 3), (64, 256, 64, 64, 8, 4, 4, 3), (64, 256, 64, 128, 8, 4, 4, 3),
        (64, 128, 64, 128, 4, 4, 4, 3), (128, 128, 64, 128, 8, 4, 8, 3), (64, 256, 32, 128, 8, 5, 8, 3),
    ]
]


def _median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _data(n, d, v, dtype, seed=0):
    ke, kc, kt = jax.random.split(jax.random.key(seed), 3)
    e = jax.random.normal(ke, (n, d), jnp.float32).astype(dtype)
    c = (jax.random.normal(kc, (v, d), jnp.float32) / d**0.5).astype(dtype)
    t = jax.random.randint(kt, (n,), 0, v)
    return e, c, t


def tune(n: int, d: int, v: int, dtype, iters: int = 5, log=print) -> dict:
    e, c, t = _data(n, d, v, dtype)
    results = {"forward": [], "backward": []}

    def loss_fn(impl):
        return jax.jit(lambda e, c: cce_jax.linear_cross_entropy(e, c, t, impl=impl))

    best_fw, best_ms = None, float("inf")
    for fw in FORWARD_CANDIDATES:
        try:
            ms = _median_ms(loss_fn(KernelConfig(forward=fw)), e, c, iters=iters)
        except Exception as err:  # a candidate that does not compile (e.g. out of shared memory) is skipped
            log(f"forward {fw}: failed ({type(err).__name__}: {str(err)[:120]})")
            continue
        results["forward"].append({"config": dataclasses.asdict(fw), "ms": ms})
        log(f"forward {fw}: {ms:.2f} ms")
        if ms < best_ms:
            best_fw, best_ms = fw, ms

    best_bw = {}
    for preset in ("cce", "cce_exact"):
        best = (None, float("inf"))
        for bw in BACKWARD_CANDIDATES:
            cfg = KernelConfig(forward=best_fw, backward=bw)
            exact = preset == "cce_exact"
            fn = jax.jit(jax.value_and_grad(
                lambda e, c, cfg=cfg, exact=exact: cce_jax.linear_cross_entropy(
                    e, c, t, impl=cfg, filter_eps=None if exact else "auto",
                    accum_e_fp32=exact, accum_c_fp32=exact),
                argnums=(0, 1)))
            try:
                ms = _median_ms(fn, e, c, iters=iters)
            except Exception as err:
                log(f"{preset} backward {bw}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            results["backward"].append({"preset": preset, "config": dataclasses.asdict(bw), "ms": ms})
            log(f"{preset} fw-bw {bw}: {ms:.2f} ms")
            if ms < best[1]:
                best = (bw, ms)
        best_bw[preset] = best
    results["best"] = {
        "device_kind": jax.devices()[0].device_kind,
        "shape_class": shape_class(d, dtype),
        "forward": dataclasses.asdict(best_fw) if best_fw else None,
        "forward_ms": best_ms,
        "backward": {k: (dataclasses.asdict(b) if b else None, ms) for k, (b, ms) in best_bw.items()},
    }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--v", type=int, default=256000)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[args.dtype]
    results = tune(args.n, args.d, args.v, dtype, args.iters, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(results["best"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
