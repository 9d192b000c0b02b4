"""Mosaic GPU forward on one Hopper GPU: correctness (compiled) and timing against XLA and the Triton forward.

    python3 benchmarks/mosaic_gpu_check.py --json out.json     # H100/H200, under 3 minutes

(a) Correctness of ``pallas_kernels.mosaic_forward.lse_forward_mosaic`` at ragged shapes (1030 x 1008 x 50264
    for "vd", 50272 for "dv": the kernel needs D % 16 == 0, V % 8 == 0 for "vd" and V % 16 == 0 for "dv", see
    its docstring), bf16, with and without bias / softcap / need_sum, both layouts and a few configs, against
    XLA float32 (dense logits of the upcast inputs at Precision.HIGHEST); plus bit-identical repeats.
(b) Timing (median of --iters after a warm-up, block_until_ready) at gemma2 (8192 x 2304 x 256000) and llama3
    (8192 x 4096 x 128256), bf16: the bare cuBLAS logits matmul, the XLA baseline forward (f32 logits +
    logsumexp + target gather), the Triton forward and several Mosaic configs, with TFLOP/s = 2 N D V / time and
    the ratio to the XLA forward. Every config is wrapped in try/except so one failure does not stop the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.lse_forward import ForwardConfig, lse_forward  # noqa: E402
from pallas_kernels.mosaic_forward import MosaicForwardConfig, lse_forward_mosaic  # noqa: E402
from pallas_kernels.tiles import Problem  # noqa: E402

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}
TRITON_CFG = ForwardConfig(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=4)
M = MosaicForwardConfig
MOSAIC_CFGS = {
    "n64-v128x2-s4": M(block_n=64, block_v=128, block_d=64, stages=4, compute_wgs=2),
    "n64-v128x2-s4-approx": M(block_n=64, block_v=128, block_d=64, stages=4, compute_wgs=2, approx_math=True),
    "n64-v128x2-s6": M(block_n=64, block_v=128, block_d=64, stages=6, compute_wgs=2),
    "n64-v256x2-s3": M(block_n=64, block_v=256, block_d=64, stages=3, compute_wgs=2),
    "n64-v256x1-s4": M(block_n=64, block_v=256, block_d=64, stages=4, compute_wgs=1),
    "n128-v128x2-s4-split2": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2, v_splits=2),
    "n128-v128x2-s4": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2),
    "n128-v128x1-s4-split2": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=1, v_splits=2),
}
CHECK_CFGS = ["n64-v128x2-s4", "n64-v256x1-s4", "n128-v128x2-s4-split2"]
CHECK_SHAPE = (1030, 1008, {"vd": 50264, "dv": 50272})
INTERPRET = False  # --smoke: tiny shapes, kernels in the Mosaic GPU / Triton interpreters (CPU check of this script)


def median_ms(fn, *args, iters: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _data(n, d, v, layout, has_bias, seed=0):
    ke, kc, kb, kt = jax.random.split(jax.random.key(seed), 4)
    e = jax.random.normal(ke, (n, d), jnp.float32).astype(jnp.bfloat16)
    c = (jax.random.normal(kc, (v, d), jnp.float32) / d**0.5).astype(jnp.bfloat16)
    if layout == "dv":
        c = c.T
    bias = jax.random.normal(kb, (v,), jnp.float32) * 0.5 if has_bias else None
    t = jax.random.randint(kt, (n,), -1, v + 2).astype(jnp.int32)  # includes -1 and out-of-range ids
    return jax.block_until_ready((e, c, bias, t))


def _xla_stats(e, c, bias, t, p: Problem):
    """float32 reference: dense logits of the upcast inputs at HIGHEST precision."""
    c32 = c.astype(jnp.float32)
    z = jnp.dot(e.astype(jnp.float32), c32.T if p.layout == "vd" else c32, precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        z = z + bias.astype(jnp.float32)[None, :]
    if p.softcap is not None:
        z = p.softcap * jnp.tanh(z / p.softcap)
    lse = jax.nn.logsumexp(z, axis=1)
    ok = (t >= 0) & (t < p.v)
    zt = jnp.where(ok, jnp.take_along_axis(z, jnp.clip(t, 0, p.v - 1)[:, None], axis=1)[:, 0], 0.0)
    return lse, zt, z.sum(axis=1), jnp.abs(z).sum(axis=1)


def correctness(log):
    n, d, vs = CHECK_SHAPE
    cases = []
    for layout, v in vs.items():
        for has_bias, cap, need_sum in ((False, None, False), (True, 30.0, True), (False, 5.0, True)):
            for name in CHECK_CFGS if (has_bias and layout == "vd") else CHECK_CFGS[:1]:
                cases.append((layout, v, has_bias, cap, need_sum, name))
    out = []
    ref_cache = {}
    for layout, v, has_bias, cap, need_sum, name in cases:
        rec = dict(layout=layout, n=n, d=d, v=v, bias=has_bias, softcap=cap, need_sum=need_sum, cfg=name)
        try:
            p = Problem(n=n, d=d, v=v, layout=layout, softcap=cap, has_bias=has_bias)
            e, c, bias, t = _data(n, d, v, layout, has_bias)
            key = (layout, has_bias, cap)
            if key not in ref_cache:
                ref_cache[key] = jax.jit(_xla_stats, static_argnames="p")(e, c, bias, t, p=p)
            r_lse, r_zt, r_zs, r_abs = ref_cache[key]
            f = jax.jit(lambda e, c, b, t: lse_forward_mosaic(e, c, b, t, p=p, cfg=MOSAIC_CFGS[name],
                                                               need_sum=need_sum, interpret=INTERPRET))
            a = jax.block_until_ready(f(e, c, bias, t))
            b = jax.block_until_ready(f(e, c, bias, t))
            lse, zt, zs = a
            rec["lse_max_abs_err"] = float(jnp.abs(lse - r_lse).max())
            rec["target_max_abs_err"] = float(jnp.abs(zt - r_zt).max())
            rec["sum_max_rel_err"] = float((jnp.abs(zs - r_zs) / r_abs).max()) if need_sum else None
            rec["sum_zero_when_not_needed"] = None if need_sum else bool((zs == 0).all())
            rec["finite"] = bool(jnp.isfinite(lse).all() & jnp.isfinite(zt).all() & jnp.isfinite(zs).all())
            rec["bit_identical_repeat"] = all(bool((x == y).all()) for x, y in zip(a, b))
            rec["ok"] = (rec["finite"] and rec["bit_identical_repeat"] and rec["lse_max_abs_err"] < 1e-3
                         and rec["target_max_abs_err"] < 1e-3
                         and (rec["sum_max_rel_err"] < 1e-4 if need_sum else rec["sum_zero_when_not_needed"]))
        except Exception as exc:  # noqa: BLE001
            rec["ok"] = False
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            traceback.print_exc()
        log(f"check {rec}")
        out.append(rec)
    return out


def timing(shapes, iters, cfg_names, log):
    rows = []
    for shape_name in shapes:
        n, d, v = SHAPES[shape_name]
        flops = 2.0 * n * d * v
        p = Problem(n=n, d=d, v=v)
        e, c, _, t = _data(n, d, v, "vd", False)
        t = jnp.clip(t, 0, v - 1)

        def xla_matmul(e, c, t):
            return e @ c.T

        def xla_fw(e, c, t):
            z = jnp.dot(e, c.T, preferred_element_type=jnp.float32)
            return jax.nn.logsumexp(z, axis=1), jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]

        def triton_fw(e, c, t):
            return lse_forward(e, c, None, t, p=p, cfg=TRITON_CFG, need_sum=False, interpret=INTERPRET)

        entries = [("xla matmul (bf16 logits)", xla_matmul), ("xla fw (f32 logits + lse)", xla_fw),
                   ("triton fw " + "x".join(map(str, (TRITON_CFG.block_n, TRITON_CFG.block_v, TRITON_CFG.block_d,
                                                       TRITON_CFG.num_warps, TRITON_CFG.num_stages))), triton_fw)]
        for name in cfg_names:
            cfg = MOSAIC_CFGS[name]
            entries.append((f"mosaic {name}", lambda e, c, t, cfg=cfg: lse_forward_mosaic(
                e, c, None, t, p=p, cfg=cfg, need_sum=False, interpret=INTERPRET)))
        xla_ms = None
        for label, fn in entries:
            row = dict(shape=shape_name, impl=label)
            try:
                ms = median_ms(jax.jit(fn), e, c, t, iters=iters)
                row.update(ms=ms, tflops=flops / ms / 1e9)
                if label.startswith("xla fw"):
                    xla_ms = ms
                if xla_ms is not None:
                    row["vs_xla_fw"] = ms / xla_ms
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
            log(f"time {row}")
            rows.append(row)
        del e, c, t
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--shapes", type=str, default="gemma2,llama3")
    ap.add_argument("--configs", type=str, default=",".join(MOSAIC_CFGS), help="comma-separated Mosaic config names")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (runs on a CPU)")
    args = ap.parse_args()
    if args.smoke:
        global INTERPRET, CHECK_SHAPE
        INTERPRET, CHECK_SHAPE = True, (130, 112, {"vd": 520, "dv": 528})
        SHAPES.update(gemma2=(128, 128, 1024), llama3=(128, 256, 1024))
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    log(f"jax {jax.__version__}, devices {jax.devices()}, kind {jax.devices()[0].device_kind}")
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "configs": {k: dataclasses.asdict(v) for k, v in MOSAIC_CFGS.items()},
              "triton_config": dataclasses.asdict(TRITON_CFG)}
    result["check"] = [] if args.skip_check else correctness(log)
    result["timing"] = timing([s for s in args.shapes.split(",") if s], args.iters,
                              [c for c in args.configs.split(",") if c], log)

    print("\n== correctness ==")
    for r in result["check"]:
        print(f"{'OK  ' if r['ok'] else 'FAIL'} {r['layout']} v={r['v']} bias={r['bias']} cap={r['softcap']} "
              f"sum={r['need_sum']} {r['cfg']:<24} lse={r.get('lse_max_abs_err', float('nan')):.2e} "
              f"tgt={r.get('target_max_abs_err', float('nan')):.2e} sum_rel={r.get('sum_max_rel_err')} "
              f"repeat={r.get('bit_identical_repeat')} {r.get('error', '')[:120]}")
    print("\n== timing (bf16) ==")
    print(f"{'shape':<8} {'impl':<40} {'ms':>8} {'TFLOP/s':>8} {'/xla fw':>8}")
    for r in result["timing"]:
        if "ms" in r:
            print(f"{r['shape']:<8} {r['impl']:<40} {r['ms']:8.2f} {r['tflops']:8.1f} "
                  f"{r.get('vs_xla_fw', float('nan')):8.3f}")
        else:
            print(f"{r['shape']:<8} {r['impl']:<40} ERROR {r['error'][:150]}")
    result["total_s"] = time.time() - t_start
    print(f"\ntotal {result['total_s']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
