#!/usr/bin/env python3
"""Times Mosaic GPU tile configurations of the logits chunk and of the forward on one Hopper GPU.

For each shape it builds the three-pass plan of ``impl="cce"`` and, per candidate config:

- ``chunk <name>``: the logits-chunk kernel (tile stores on) over every chunk of the batch in one jitted scan,
  i.e. the whole call's pass 1, with TFLOP/s against ``2 N D V``; checked on the first chunk against XLA's
  float32 logits (lse, target logit, and the stored tiles plus their maxima);
- ``chunk-nostore <name>``: the same grid without the stores (the forward kernel at the chunk's shape), which
  separates the cost of the stores from that of the chunking;
- ``fwbw <name>``: ``value_and_grad`` of the mean loss with ``impl="cce"`` and that logits-chunk config;
- ``fw <name>``: the forward kernel over the whole batch, and ``fw-loss <name>`` the loss with that config;
- the XLA baseline (``fw`` and ``fwbw``) in the same run.

    MOSAIC_GPU_DUMP_PTXAS=1 python3 benchmarks/mosaic_tiles_probe.py --json out.json > tiles.log

(ptxas' register and spill report of every kernel then lands in tiles.log between the JSON rows.) Each row
costs ~30 s, mostly compiling: the defaults take more than one 10-minute device call; pass --shape, --chunk,
--fw and --fwbw subsets. ``--interpret --dims 256,64,1024`` dry-runs the script on a CPU (one compute
warpgroup, timings meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from cce_jax import api, bench_data, bench_impls, benchmark, cce, three_pass  # noqa: E402
from cce_jax.autotune import median_ms  # noqa: E402
from cce_jax.stats import LogitSpec  # noqa: E402
from pallas_kernels import mosaic_forward as mf  # noqa: E402
from pallas_kernels import mosaic_logits_chunk as mlc  # noqa: E402
from three_pass_probe import rel  # noqa: E402  (this directory is on sys.path when run as a script)

M = mf.MosaicForwardConfig
CHUNK_CFGS = {
    "bd64-s3": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2),
    "bd64-s3-async": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, async_wgmma=True),
    "bd32-s6": M(block_n=128, block_v=128, block_d=32, stages=6, compute_wgs=2),
    "bd32-s6-async": M(block_n=128, block_v=128, block_d=32, stages=6, compute_wgs=2, async_wgmma=True),
    "bd32-s5-async": M(block_n=128, block_v=128, block_d=32, stages=5, compute_wgs=2, async_wgmma=True),
    "bv64-s5": M(block_n=128, block_v=64, block_d=64, stages=5, compute_wgs=2),
}
FW_CFGS = {
    "bd64-s4": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2),
    "bd64-s4-async": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2, async_wgmma=True),
    "bd32-s8": M(block_n=128, block_v=128, block_d=32, stages=8, compute_wgs=2),
    "bd32-s8-async": M(block_n=128, block_v=128, block_d=32, stages=8, compute_wgs=2, async_wgmma=True),
}


INTERPRET = False  # --interpret: the Mosaic GPU interpreter (a CPU dry run of the script at --dims)


def _cfg(cfg):
    # The interpreter can starve with two compute warpgroups on a small CPU (tests/test_mosaic_forward.py).
    return dataclasses.replace(cfg, compute_wgs=1) if INTERPRET else cfg


def pass1_call(e, c, t, plan, p_chunk, cfg, store: bool):
    """jit: the kernel over every chunk of e (a scan), returning a scalar so nothing is dropped."""
    starts = jnp.asarray(plan.starts(e.shape[0]), jnp.int32)
    k = plan.chunk

    def step(acc, start):
        e_k = lax.dynamic_slice_in_dim(e, start, k)
        t_k = lax.dynamic_slice_in_dim(t, start, k)
        if store:
            z, m, lse, _, _ = mlc.logits_chunk_mosaic(e_k, c, None, t_k, p=p_chunk, cfg=cfg, need_sum=False,
                                                        interpret=INTERPRET)
            return acc + lse.sum() + z[0, 0].astype(jnp.float32) + m[0, 0], None
        lse, _, _ = mf.lse_forward_mosaic(e_k, c, None, t_k, p=p_chunk, cfg=cfg, need_sum=False,
                                          interpret=INTERPRET)
        return acc + lse.sum(), None

    return jax.jit(lambda e, c, t: lax.scan(step, jnp.zeros((), jnp.float32), starts)[0])


def check_chunk(e_k, c, t_k, p_chunk, cfg):
    z_rel, m, lse, zt, _ = jax.jit(lambda e, c, t: mlc.logits_chunk_mosaic(
        e, c, None, t, p=p_chunk, cfg=cfg, need_sum=False, interpret=INTERPRET))(e_k, c, t_k)
    rows = 256
    z = jnp.dot(e_k[:rows].astype(jnp.float32), c.astype(jnp.float32).T, precision="highest")
    v = c.shape[0]
    got = (z_rel[:rows].astype(jnp.float32) + jnp.repeat(m[:rows], cfg.block_v, axis=1))[:, :v]
    ref_lse = jax.nn.logsumexp(z, axis=1)
    ref_zt = jnp.take_along_axis(z, t_k[:rows, None], axis=1)[:, 0]
    return dict(err_lse=float(jnp.abs(lse[:rows] - ref_lse).max()), err_zt=float(jnp.abs(zt[:rows] - ref_zt).max()),
                err_z=rel(got, z))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gemma2,llama3")
    ap.add_argument("--data", default="lm")
    ap.add_argument("--chunk", default=",".join(CHUNK_CFGS))
    ap.add_argument("--fw", default=",".join(FW_CFGS))
    ap.add_argument("--fwbw", default="", help="chunk configs to time end to end (default: every --chunk one)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dims", default=None, help="N,D,V instead of --shape (with --interpret: a CPU dry run)")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    global INTERPRET
    INTERPRET = args.interpret
    shapes = dict(benchmark.SHAPES)
    if args.dims:
        shapes = {"dims": tuple(int(x) for x in args.dims.split(","))}
        args.shape = "dims"
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)

    def attempt(row, fn):
        t0 = time.perf_counter()
        try:
            row.update(fn())
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        emit(row)

    chunk_names = [x for x in args.chunk.split(",") if x]
    fwbw_names = chunk_names if not args.fwbw else [x for x in args.fwbw.split(",") if x]
    for shape in args.shape.split(","):
        n, d, v = shapes[shape]
        data = bench_data.make_data(args.data, n, d, v, "bf16", seed=0)
        e, c, t = data.e, data.c, data.targets
        flops = 2.0 * n * d * v
        base = cce.default_config(d, e.dtype)
        if args.interpret:
            base = dataclasses.replace(base, forward_backend="mosaic", mosaic=_cfg(base.mosaic),
                                       mosaic_chunk=_cfg(base.mosaic_chunk))
        logits = cce.ChunkLogits(LogitSpec(), base, args.interpret)
        plan = cce.chunk_plan(n, d, v, e.dtype, logits, three_pass.default_budget(e.shape, c.shape, e.dtype))
        p_chunk = three_pass.problem(plan.chunk, d, v, LogitSpec())
        head = dict(shape=shape, data=args.data, chunk=plan.chunk, chunks=plan.num_chunks)

        for name in chunk_names:
            cfg = _cfg(CHUNK_CFGS[name])
            for store in (True, False):
                def run(cfg=cfg, store=store):
                    sch = mf.make_schedule(p_chunk, cfg)
                    out = dict(smem=mf.smem_bytes(cfg, e.dtype, store), splits=sch.splits, tail=sch.tail)
                    if store:
                        out.update(check_chunk(e[:plan.chunk], c, t[:plan.chunk], p_chunk, cfg))
                    f = pass1_call(e, c, t, plan, p_chunk, cfg, store)
                    ms = median_ms(f, e, c, t, iters=args.iters)
                    return dict(out, ms=ms, tflops=flops * plan.chunk * plan.num_chunks / n / ms / 1e9)
                attempt(dict(head, what="chunk" if store else "chunk-nostore", cfg=name), run)

        grads = {}
        for name in ["baseline"] + fwbw_names:
            def run(name=name):
                if name == "baseline":
                    loss = bench_impls.baseline_loss
                else:
                    impl = dataclasses.replace(base, mosaic_chunk=_cfg(CHUNK_CFGS[name]))
                    loss = lambda e, c, t, impl=impl: api.linear_cross_entropy(  # noqa: E731
                        e, c, t, impl=impl, interpret=args.interpret or None)
                f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(e, c, t).compile()
                out = dict(temp_mb=f.memory_analysis().temp_size_in_bytes / 2**20,
                           ms=median_ms(f, e, c, t, iters=max(3, args.iters // 2)))
                val = f(e, c, t)
                if grads:
                    ref = grads["baseline"]
                    out.update(err_loss=rel(val[0], ref[0]), err_de=rel(val[1][0], ref[1][0]),
                               err_dc=rel(val[1][1], ref[1][1]))
                    again = f(e, c, t)
                    out["det"] = all(bool(jnp.array_equal(a, b)) for a, b in
                                     zip(jax.tree.leaves(val), jax.tree.leaves(again)))
                else:
                    grads["baseline"] = val
                return out
            attempt(dict(head, what="fwbw", cfg=name), run)
        grads.clear()

        p_full = three_pass.problem(n, d, v, LogitSpec())
        for name in ["baseline"] + [x for x in args.fw.split(",") if x]:
            def run(name=name):
                if name == "baseline":
                    f = jax.jit(bench_impls.baseline_loss)
                    return dict(ms=median_ms(f, e, c, t, iters=args.iters))
                cfg = _cfg(FW_CFGS[name])
                kern = jax.jit(lambda e, c, t: mf.lse_forward_mosaic(e, c, None, t, p=p_full, cfg=cfg,
                                                                     need_sum=False, interpret=INTERPRET)[0].sum())
                ms_kernel = median_ms(kern, e, c, t, iters=args.iters)
                impl = dataclasses.replace(base, mosaic=cfg)
                loss = jax.jit(lambda e, c, t: api.linear_cross_entropy(e, c, t, impl=impl,
                                                                        interpret=args.interpret or None))
                ms_loss = median_ms(loss, e, c, t, iters=args.iters)
                ref = jax.jit(bench_impls.baseline_loss)(e, c, t)
                return dict(ms_kernel=ms_kernel, tflops=flops / ms_kernel / 1e9, ms=ms_loss,
                            err_loss=rel(loss(e, c, t), ref))
            attempt(dict(head, what="fw", cfg=name), run)
        del data, e, c, t
    return 0


if __name__ == "__main__":
    sys.exit(main())
