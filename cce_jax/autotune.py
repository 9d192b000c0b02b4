"""Measure kernel block configurations on the current GPU and print the best as a ``TUNED`` table entry.

    python -m cce_jax.autotune --n 8192 --d 2304 --v 256000 --dtype bf16

Triton (``--kernels triton`` or ``all``): forward candidates are timed on the forward kernel alone; backward
candidates (the recompute path's kernels) on ``value_and_grad`` with the best forward, with filtering on
(preset "cce") and off ("cce_exact"). Mosaic GPU (``--kernels mosaic`` or ``all``, Hopper GPUs and 16-bit
inputs only): forward candidates on the loss alone, then logits-chunk candidates of the three-pass path on
``value_and_grad`` of preset "cce" with the best Mosaic forward, both on the benchmark's LM-like data (a
candidate that falls back to another kernel is skipped), then block-sparse dE candidates on the kernel alone
(one token chunk of random gradients with ``SPARSE_DE_LIVE_FRACTION`` of the tiles live: LM-like data keeps
every tile live, so the three-pass path would not run the sparse product there). Results go to stdout and, with ``--json``, to a file.
``--save TABLE`` adds the best entry to a tuning table that the kernels read when the environment variable
``CCE_JAX_TUNING_FILE`` names it (or paste it into ``cce_jax.cce.TUNED``).

It times GPU kernels: without a GPU it stops with exit status 2, unless a shape (``--n``, ``--d``, ``--v``) or
``--interpret`` is given; it then runs the kernels in Pallas interpret mode, which only checks that they run
(interpret timings say nothing about a GPU, and the default shape takes tens of minutes there).
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

import cce_jax
from cce_jax import cce as cce_lib
from cce_jax.cce import KernelConfig, shape_class
from pallas_kernels.backward import BackwardConfig
from pallas_kernels.lse_forward import ForwardConfig
from pallas_kernels.mosaic_forward import MosaicForwardConfig
from pallas_kernels.mosaic_sparse_de import MosaicSparseDeConfig

FORWARD_CANDIDATES = [
    ForwardConfig(bn, bv, bd, w, s)
    for (bn, bv, bd, w, s) in [
        (64, 256, 64, 4, 4), (64, 256, 64, 8, 4), (64, 256, 64, 4, 3), (64, 512, 32, 8, 4), (64, 128, 64, 4, 4),
    ]
]
# (block_n, block_v, block_d, block_dout, block_vout, grad warps, grad stages, product warps, product stages)
BACKWARD_CANDIDATES = [
    BackwardConfig(bn, bv, bd, bo, bvo, chunk_v=8192, grad_warps=gw, grad_stages=gs, product_warps=pw,
                   product_stages=ps)
    for (bn, bv, bd, bo, bvo, gw, gs, pw, ps) in [
        (64, 256, 64, 128, 128, 4, 4, 4, 3), (64, 256, 64, 128, 64, 4, 4, 4, 3), (64, 256, 64, 64, 128, 4, 4, 4, 3),
        (128, 128, 64, 128, 128, 8, 4, 8, 3), (64, 128, 64, 128, 128, 4, 4, 4, 3),
    ]
]

# (block_d, stages, cluster, target_gather) of 128 x 128 tiles with two compute warpgroups on the persistent grid (one
# CTA per SM). On an H200 3 stages beat 4 at block_d 64 (2026-12-02), block_d 128 in 2 stages beat both, and the
# gathered target and the 2-CTA clusters were within 1.5% of it (2026-12-03): close enough to tune per GPU.
MOSAIC_FORWARD_CANDIDATES = [
    MosaicForwardConfig(block_n=128, block_v=128, block_d=bd, stages=st, compute_wgs=2, cluster=cl,
                        target_gather=tg)
    for (bd, st, cl, tg) in [(128, 2, 1, True), (128, 2, 2, True), (128, 2, 1, False), (64, 3, 1, True),
                             (64, 3, 2, True), (64, 4, 1, True), (32, 6, 1, True)]
] + [
    # Row-split warpgroups (64 x 256 each, one m64n256 wgmma per k16), alone and in clusters of two CTAs: within
    # 1.5% of the default either way on an H200 (2026-12-03, fourth session).
    MosaicForwardConfig(block_n=128, block_v=256, block_d=128, stages=2, compute_wgs=2, wg_split="n", cluster=cl,
                        target_gather=True)
    for cl in (1, 2)
]
# (block_d, stages, async_wgmma) of 128 x 128 tiles with two compute warpgroups (the three-pass product tiles
# subdivide block_v).
MOSAIC_CHUNK_CANDIDATES = [
    MosaicForwardConfig(block_n=128, block_v=128, block_d=bd, stages=st, compute_wgs=2, async_wgmma=aw)
    for (bd, st, aw) in [(64, 3, False), (32, 6, False), (32, 6, True), (64, 2, False)]
]
# (block_out, stages, compute_wgs, block_k) of the Mosaic GPU block-sparse dE product (64-row blocks).
MOSAIC_SPARSE_DE_CANDIDATES = [
    MosaicSparseDeConfig(block_n=64, block_k=bk, block_out=bo, stages=st, compute_wgs=cw)
    for (bo, st, cw, bk) in [(128, 3, 2, 64), (128, 2, 2, 64), (256, 3, 1, 64), (64, 4, 2, 64), (128, 5, 2, 32)]
]
SPARSE_DE_LIVE_FRACTION = 0.3  # random live tiles of the timed chunk
KERNEL_FAMILIES = ("all", "triton", "mosaic")


def median_ms(fn, *args, iters: int = 10) -> float:
    """Median wall-clock milliseconds of ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timed_row(row: dict, fn, *args, iters: int = 10, flops: float | None = None) -> dict:
    """Adds ``ms`` (:func:`median_ms` of ``jax.jit(fn)``) and, with ``flops``, ``tflops`` to ``row``, or an
    ``error`` line if the call fails (a benchmark row that fails does not stop the run); returns ``row``."""
    try:
        ms = median_ms(jax.jit(fn), *args, iters=iters)
        row.update(ms=ms, **({} if flops is None else {"tflops": flops / ms / 1e9}))
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    return row


def _data(n, d, v, dtype, seed=0):
    ke, kc, kt = jax.random.split(jax.random.key(seed), 3)
    e = jax.random.normal(ke, (n, d), jnp.float32).astype(dtype)
    c = (jax.random.normal(kc, (v, d), jnp.float32) / d**0.5).astype(dtype)
    t = jax.random.randint(kt, (n,), 0, v)
    return e, c, t


def _mosaic_eligible(dtype) -> bool:
    return cce_lib._on_hopper() and jnp.dtype(dtype).itemsize == 2  # noqa: SLF001


def tune_mosaic(n: int, d: int, v: int, dtype, base: KernelConfig, iters: int = 5, log=print) -> dict:
    """Times the Mosaic GPU candidates (see the module docstring) on LM-like data; returns
    ``{"mosaic": [...], "mosaic_chunk": [...], "best": KernelConfig or None}``."""
    from cce_jax import bench_data  # noqa: PLC0415

    name = next(k for k, x in bench_data.DTYPES.items() if jnp.dtype(x) == jnp.dtype(dtype))
    data = bench_data.make_data("lm", n, d, v, name, seed=0)
    e, c, t = data.e, data.c, data.targets
    out = {"mosaic": [], "mosaic_chunk": []}

    def timed(kind, cfg, grad, marker):
        def loss(e, c):
            return cce_jax.linear_cross_entropy(e, c, t, impl=cfg)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)) if grad else loss)
        try:
            if marker not in fn.lower(e, c).as_text():
                log(f"mosaic {kind} {getattr(cfg, kind)}: skipped (runs another kernel)")
                return None
            return median_ms(fn, e, c, iters=iters)
        except Exception as err:  # a candidate that does not compile (e.g. out of shared memory) is skipped
            log(f"mosaic {kind} {getattr(cfg, kind)}: failed ({type(err).__name__}: {str(err)[:120]})")
            return None

    best = dataclasses.replace(base, forward_backend="mosaic")
    for kind, candidates, grad, marker in (("mosaic", MOSAIC_FORWARD_CANDIDATES, False, "cce_lse_forward_mosaic"),
                                           ("mosaic_chunk", MOSAIC_CHUNK_CANDIDATES, True, "cce_logits_chunk_mosaic")):
        best_ms = float("inf")
        winner = None
        for cand in candidates:
            cfg = dataclasses.replace(best, **{kind: cand})
            ms = timed(kind, cfg, grad, marker)
            if ms is None:
                continue
            out[kind].append({"config": dataclasses.asdict(cand), "ms": ms})
            log(f"mosaic {'fw' if kind == 'mosaic' else 'fw-bw'} {cand}: {ms:.2f} ms")
            if ms < best_ms:
                winner, best_ms = cand, ms
        if winner is None:
            out["best"] = None
            return out
        best = dataclasses.replace(best, **{kind: winner})
    out["mosaic_sparse_de"] = []
    best_ms, winner = float("inf"), None
    for cand in MOSAIC_SPARSE_DE_CANDIDATES:
        ms = time_sparse_de(n, d, v, dtype, cand, iters=iters, log=log)
        if ms is None:
            continue
        out["mosaic_sparse_de"].append({"config": dataclasses.asdict(cand), "ms": ms})
        log(f"mosaic sparse dE {cand}: {ms:.3f} ms")
        if ms < best_ms:
            winner, best_ms = cand, ms
    if winner is not None:
        best = dataclasses.replace(best, mosaic_sparse_de=winner)
    out["best"] = dataclasses.replace(best, forward_backend=base.forward_backend)
    return out


def time_sparse_de(n: int, d: int, v: int, dtype, cfg: MosaicSparseDeConfig, iters: int = 5, log=print):
    """Milliseconds of the Mosaic GPU block-sparse dE product on one token chunk (up to 1024 rows) of random
    gradients with ``SPARSE_DE_LIVE_FRACTION`` of 64 x 128 tiles live, or None if the candidate cannot run."""
    from pallas_kernels import mosaic_sparse_de as msd  # noqa: PLC0415

    tile_v = 128
    rows = max(cfg.block_n, min(n, 1024) // cfg.block_n * cfg.block_n)
    tiles = -(-v // tile_v)
    kg, kc, kl = jax.random.split(jax.random.key(1), 3)
    g = (jax.random.normal(kg, (rows, tiles * tile_v), jnp.float32) * 1e-2).astype(dtype)
    c = (jax.random.normal(kc, (v, d), jnp.float32) / d**0.5).astype(dtype)
    live = (jax.random.uniform(kl, (rows // cfg.block_n, tiles)) < SPARSE_DE_LIVE_FRACTION).astype(jnp.int32)
    lists = msd.live_lists(live)
    if not msd.supports(g, c, lists, "vd", tile_v, cfg):
        log(f"mosaic sparse dE {cfg}: skipped (its shape rules)")
        return None
    fn = jax.jit(lambda g, c, lists: msd.sparse_de_mosaic(g, lists, c, layout="vd", tile_v=tile_v, cfg=cfg))
    try:
        return median_ms(fn, g, c, lists, iters=iters)
    except Exception as err:  # a candidate that does not compile is skipped
        log(f"mosaic sparse dE {cfg}: failed ({type(err).__name__}: {str(err)[:120]})")
        return None


def tune(n: int, d: int, v: int, dtype, iters: int = 5, log=print, kernels: str = "all") -> dict:
    if kernels not in KERNEL_FAMILIES:
        raise ValueError(f"kernels must be one of {KERNEL_FAMILIES}, got {kernels!r}")
    results = {"forward": [], "backward": []}
    base = cce_lib.default_config(d, dtype)
    if kernels != "triton":
        if _mosaic_eligible(dtype):
            mosaic = tune_mosaic(n, d, v, dtype, base, iters=iters, log=log)
            results.update(mosaic=mosaic["mosaic"], mosaic_chunk=mosaic["mosaic_chunk"],
                           mosaic_sparse_de=mosaic.get("mosaic_sparse_de", []))
            if mosaic["best"] is not None:
                base = dataclasses.replace(base, mosaic=mosaic["best"].mosaic,
                                           mosaic_chunk=mosaic["best"].mosaic_chunk,
                                           mosaic_sparse_de=mosaic["best"].mosaic_sparse_de)
        else:
            log("mosaic: skipped (needs a Hopper GPU and bf16 / fp16 inputs)")
    if kernels == "mosaic":
        return _finish(results, d, dtype, base, base.forward, float("nan"), {})
    e, c, t = _data(n, d, v, dtype)

    def loss_fn(impl):
        return jax.jit(lambda e, c: cce_jax.linear_cross_entropy(e, c, t, impl=impl))

    best_fw, best_ms = None, float("inf")
    for fw in FORWARD_CANDIDATES:
        try:
            ms = median_ms(loss_fn(dataclasses.replace(base, forward=fw, forward_backend="triton")), e, c, iters=iters)
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
            cfg = dataclasses.replace(base, forward=best_fw, backward=bw, forward_backend="triton")
            exact = preset == "cce_exact"
            fn = jax.jit(jax.value_and_grad(
                lambda e, c, cfg=cfg, exact=exact: cce_jax.linear_cross_entropy(
                    e, c, t, impl=cfg, filter_eps=None if exact else "auto",
                    accum_e_fp32=exact, accum_c_fp32=exact),
                argnums=(0, 1)))
            try:
                ms = median_ms(fn, e, c, iters=iters)
            except Exception as err:
                log(f"{preset} backward {bw}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            results["backward"].append({"preset": preset, "config": dataclasses.asdict(bw), "ms": ms})
            log(f"{preset} fw-bw {bw}: {ms:.2f} ms")
            if ms < best[1]:
                best = (bw, ms)
        best_bw[preset] = best
    if best_fw is None or best_bw["cce"][0] is None:
        results["best"], results["entry"] = None, None
        return results
    return _finish(results, d, dtype, dataclasses.replace(base, forward=best_fw, backward=best_bw["cce"][0]),
                   best_fw, best_ms, best_bw)


def _finish(results: dict, d: int, dtype, config: KernelConfig, best_fw, best_ms: float, best_bw: dict) -> dict:
    """Adds the tuning-table entry (``config``'s block configs) and a summary of the winners to ``results``."""
    key = {"device_kind": jax.devices()[0].device_kind, "shape_class": shape_class(d, dtype)}
    blocks = {name: dataclasses.asdict(getattr(config, name))
              for name in ("forward", "backward", "mosaic", "mosaic_chunk", "mosaic_sparse_de")}
    results["entry"] = {**key, "config": blocks}
    results["best"] = {
        **key,
        "forward": dataclasses.asdict(best_fw) if best_fw else None,
        "forward_ms": best_ms,
        "backward": {k: (dataclasses.asdict(b) if b else None, ms) for k, (b, ms) in best_bw.items()},
        "mosaic": blocks["mosaic"] if results.get("mosaic") else None,
        "mosaic_ms": min((r["ms"] for r in results.get("mosaic", [])), default=None),
        "mosaic_chunk": blocks["mosaic_chunk"] if results.get("mosaic_chunk") else None,
        "mosaic_chunk_ms": min((r["ms"] for r in results.get("mosaic_chunk", [])), default=None),
        "mosaic_sparse_de": blocks["mosaic_sparse_de"] if results.get("mosaic_sparse_de") else None,
        "mosaic_sparse_de_ms": min((r["ms"] for r in results.get("mosaic_sparse_de", [])), default=None),
    }
    return results


def per_kernel(n: int, d: int, v: int, dtype, config: KernelConfig | None = None, iters: int = 5, log=print):
    """Times each kernel of one fw-bw at this shape (flat data, mean loss) and the XLA baseline beside it."""
    import optax  # noqa: PLC0415

    from cce_jax import cce as cce_lib  # noqa: PLC0415
    from pallas_kernels.backward import accumulate_de, live_lists, logit_grad, write_dc  # noqa: PLC0415
    from pallas_kernels.lse_forward import lse_forward  # noqa: PLC0415
    from pallas_kernels.tiles import Problem, cdiv  # noqa: PLC0415

    e, c, t = _data(n, d, v, dtype)
    config = config or cce_lib.default_config(d, dtype)
    p = Problem(n=n, d=d, v=v)
    cfg = cce_lib._chunk(config, p, jnp.dtype(dtype).itemsize)
    chunks = cdiv(v, cfg.chunk_v)
    eps = float(jnp.finfo(dtype).eps) / 32
    rows = {}
    ip = cce_lib.resolve_interpret(None)
    fw = jax.jit(lambda e, c: lse_forward(e, c, None, t, p=p, cfg=config.forward, need_sum=False, interpret=ip))
    rows["lse_forward"] = median_ms(fw, e, c, iters=iters)
    lse = fw(e, c)[0]
    g = jnp.full((n,), 1.0 / n, jnp.float32)
    vs = jnp.zeros((1,), jnp.int32)
    grad = jax.jit(lambda e, c, vs: logit_grad(e, c, None, t, lse, g, -g, g * 0, vs, p=p, cfg=cfg, need_sum=False,
                                              filter_eps=eps, store_all=False, interpret=ip))
    rows[f"logit_grad x{chunks}"] = median_ms(grad, e, c, vs, iters=iters) * chunks
    gbuf, live = grad(e, c, vs)
    rows["live tile fraction (chunk 0)"] = float(live.mean())
    cols, ncols, rws, nrows = jax.jit(live_lists)(live)
    de0 = jnp.zeros((n, d), dtype)
    de_fn = jax.jit(lambda gb, c, vs, de: accumulate_de(gb, cols, ncols, c, vs, de, p=p, cfg=cfg, interpret=ip))
    rows[f"accumulate_de (filtered) x{chunks}"] = median_ms(de_fn, gbuf, c, vs, de0, iters=iters) * chunks
    dc_fn = jax.jit(lambda gb, e, vs, dc, db: write_dc(gb, rws, nrows, e, vs, dc, db, p=p, cfg=cfg, interpret=ip))
    dc0, db0 = jnp.zeros(c.shape, dtype), jnp.zeros((1,), jnp.float32)
    rows[f"write_dc (filtered) x{chunks}"] = median_ms(dc_fn, gbuf, e, vs, dc0, db0, iters=iters) * chunks
    width = min(cfg.chunk_v, v)
    dense_de = jax.jit(lambda gb, c: jnp.dot(gb[:, :width], c[:width], preferred_element_type=jnp.float32))
    rows[f"xla G@c chunk x{chunks}"] = median_ms(dense_de, gbuf, c, iters=iters) * chunks

    def baseline(e, c):
        logits = jnp.dot(e, c.T, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

    rows["xla baseline fw"] = median_ms(jax.jit(baseline), e, c, iters=iters)
    rows["xla baseline fw-bw"] = median_ms(jax.jit(jax.value_and_grad(baseline, argnums=(0, 1))), e, c, iters=iters)
    for preset in ("cce", "cce_exact"):
        fn = jax.jit(jax.value_and_grad(lambda e, c, preset=preset: cce_jax.linear_cross_entropy(
            e, c, t, impl=preset), argnums=(0, 1)))
        rows[f"{preset} fw-bw"] = median_ms(fn, e, c, iters=iters)
    for name, ms in rows.items():
        log(f"{name:40s} {ms:10.3f}")
    return rows


def save_entry(path: str, entry: dict) -> None:
    """Adds (or replaces) one (device kind, shape class) entry of a tuning table file."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"entries": []}
    key = (entry["device_kind"], entry["shape_class"])
    table["entries"] = [x for x in table["entries"] if (x["device_kind"], x["shape_class"]) != key] + [entry]
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


DEFAULT_SHAPE = {"n": 8192, "d": 2304, "v": 256000}  # gemma2: 8192 tokens, d_model 2304, vocabulary 256000


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and appends each flag's default to its help."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cce_jax.autotune", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--n", type=int, default=argparse.SUPPRESS,
                        help=f"tokens per step, N (default: {DEFAULT_SHAPE['n']})")
    parser.add_argument("--d", type=int, default=argparse.SUPPRESS,
                        help=f"hidden size, D (default: {DEFAULT_SHAPE['d']})")
    parser.add_argument("--v", type=int, default=argparse.SUPPRESS,
                        help=f"vocabulary size, V (default: {DEFAULT_SHAPE['v']})")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="dtype of the hidden states and the classifier")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per candidate (the median is kept)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every measurement to this file")
    parser.add_argument("--kernels", default="all", choices=list(KERNEL_FAMILIES),
                        help="which kernels' candidates to time (mosaic: Hopper GPUs, bf16 / fp16)")
    parser.add_argument("--per-kernel", action="store_true",
                        help="time each kernel of the default config (and the XLA baseline) instead of tuning")
    parser.add_argument("--save", default=None, metavar="TABLE",
                        help="add the best config to this tuning table (read via CCE_JAX_TUNING_FILE)")
    parser.add_argument("--interpret", action="store_true",
                        help="allow running without a GPU, in Pallas interpret mode (slow; checks only that the "
                             "candidates run)")
    args = parser.parse_args(argv)
    for name in ("n", "d", "v", "iters"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive int, got {value}")
    explicit_shape = any(hasattr(args, k) for k in DEFAULT_SHAPE)
    if jax.default_backend() != "gpu" and not (explicit_shape or args.interpret):
        parser.exit(2, (
            f"cce_jax.autotune: no GPU (the default JAX backend is {jax.default_backend()!r}). It times the Pallas "
            "GPU kernels; on this machine they would run in interpret mode (the default shape "
            f"{DEFAULT_SHAPE['n']} x {DEFAULT_SHAPE['d']} x {DEFAULT_SHAPE['v']} takes tens of minutes and "
            "its timings mean nothing). Run it on a GPU, or pass a small shape (--n/--d/--v) or --interpret to "
            "run it anyway.\n"
        ))
    for k, value in DEFAULT_SHAPE.items():
        if not hasattr(args, k):
            setattr(args, k, value)
    if jax.default_backend() != "gpu":
        print(f"cce_jax.autotune: no GPU; running {args.n} x {args.d} x {args.v} in Pallas interpret mode",
              file=sys.stderr, flush=True)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[args.dtype]
    if args.per_kernel:
        rows = per_kernel(args.n, args.d, args.v, dtype, iters=args.iters)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    results = tune(args.n, args.d, args.v, dtype, args.iters, log=lambda s: print(s, file=sys.stderr, flush=True),
                   kernels=args.kernels)
    print(json.dumps(results["best"], indent=1))
    if args.save and results["entry"] is not None:
        save_entry(args.save, results["entry"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
