"""Mosaic GPU block-sparse dE product on one Hopper GPU: correctness (compiled) and timing against Triton and XLA.

    python3 benchmarks/mosaic_sparse_de_check.py --json out.json      # H100/H200, about a minute

(a) Correctness of ``pallas_kernels.mosaic_sparse_de.sparse_de_mosaic`` at ragged shapes (D not a multiple of
    the output tile, V not a multiple of the tile, one row block with no live tile), both classifier layouts,
    bf16, against float64 NumPy over the live tiles; plus bit-identical repeats.
(b) Timing (median of --iters) at the three-pass path's chunk shapes (gemma2: 1024 tokens x 256000 x 2304;
    llama3: 1664 x 128256 x 4096) with random live masks at several live fractions: the Mosaic kernel, the Triton
    ``accumulate_de`` (into zeros, as the three-pass path calls it) and XLA's dense ``G @ c``, with TFLOP/s of the
    live work (``2 * live * R * tile_v * D``, the rows' ``tflops``).

``--smoke``: tiny shapes in interpret mode (a CPU check of this script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cce_jax.autotune import timed_row  # noqa: E402
from pallas_kernels import backward as triton_bw  # noqa: E402
from pallas_kernels import mosaic_sparse_de as msd  # noqa: E402
from pallas_kernels.tiles import Problem  # noqa: E402

TILE_V = 128
CFG = msd.MosaicSparseDeConfig()
TRITON_CFG = triton_bw.BackwardConfig()
SHAPES = {"gemma2": (1024, 256000, 2304), "llama3": (1664, 128256, 4096)}
FRACTIONS = (0.05, 0.1, 0.3, 0.55, 1.0)
INTERPRET = False


def _case(rng, r, v, d, layout, frac):
    t = -(-v // TILE_V)
    g = rng.standard_normal((r, t * TILE_V)).astype(np.float32) * 1e-2
    g[:, v:] = 0
    live = (rng.random((r // CFG.block_n, t)) < frac).astype(np.int32)
    live[min(1, len(live) - 1)] = 0
    g = jnp.asarray(g, jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((v, d)) / np.sqrt(d), jnp.bfloat16)
    return g, (c if layout == "vd" else c.T), jnp.asarray(live)


def _mosaic(g, c, live, layout):
    return msd.sparse_de_mosaic(g, msd.live_lists(live), c, layout=layout, tile_v=TILE_V, cfg=CFG,
                                interpret=INTERPRET)


def _triton(g, c, live, layout, v, d):
    cfg = triton_bw.BackwardConfig(chunk_v=g.shape[1])
    cols, count, _, _ = triton_bw.live_lists(live)
    p = Problem(n=g.shape[0], d=d, v=v, layout=layout)
    return triton_bw.accumulate_de(g, cols, count, c, jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((g.shape[0], d), jnp.float32), p=p, cfg=cfg, interpret=INTERPRET)


def correctness(log, shapes):
    rng = np.random.default_rng(0)
    out = []
    for r, v, d in shapes:
        for layout in ("vd", "dv"):
            rec = dict(r=r, v=v, d=d, layout=layout)
            try:
                g, c, live = _case(rng, r, v, d, layout, 0.4)
                f = jax.jit(lambda g, c, live, layout=layout: _mosaic(g, c, live, layout))
                a = np.asarray(jax.block_until_ready(f(g, c, live)))
                b = np.asarray(jax.block_until_ready(f(g, c, live)))
                mask = np.repeat(np.repeat(np.asarray(live), CFG.block_n, 0), TILE_V, 1)
                c64 = np.asarray(c.astype(jnp.float32), np.float64)
                ref = (np.asarray(g.astype(jnp.float32), np.float64) * mask)[:, :v] @ (c64 if layout == "vd"
                                                                                        else c64.T)
                rec["max_abs_err"] = float(np.abs(a - ref).max())
                rec["ref_max"] = float(np.abs(ref).max())
                rec["dead_rows_zero"] = bool((a[CFG.block_n:2 * CFG.block_n] == 0).all())
                rec["bit_identical_repeat"] = bool((a == b).all())
                rec["ok"] = (rec["max_abs_err"] < 1e-4 * rec["ref_max"] and rec["dead_rows_zero"]
                             and rec["bit_identical_repeat"])
            except Exception as exc:  # noqa: BLE001
                rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:600]}")
            log(f"check {rec}")
            out.append(rec)
    return out


def timing(log, shapes, iters):
    rng = np.random.default_rng(1)
    rows = []
    for name, (r, v, d) in shapes.items():
        for frac in FRACTIONS:
            g, c, live = _case(rng, r, v, d, "vd", frac)
            live_frac = float(np.asarray(live).mean())
            work = 2.0 * live_frac * r * g.shape[1] * d
            entries = [("mosaic", lambda g, c, live: _mosaic(g, c, live, "vd")),
                       ("triton", lambda g, c, live: _triton(g, c, live, "vd", v, d))]
            if frac == FRACTIONS[-1]:
                entries.append(("xla dense", lambda g, c, live: jnp.dot(g[:, :v], c,
                                                                        preferred_element_type=jnp.float32)))
            for label, fn in entries:
                row = timed_row(dict(shape=name, live=live_frac, impl=label), fn, g, c, live, iters=iters,
                                flops=work)
                log(f"time {row}")
                rows.append(row)
            del g, c, live
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (runs on a CPU)")
    args = ap.parse_args()
    check_shapes = [(320, 5008, 1040), (192, 50272, 2320)]  # V % 16 == 0 for "dv", ragged against the tiles
    shapes = SHAPES
    if args.smoke:
        global INTERPRET
        INTERPRET = True
        check_shapes = [(192, 336, 208)]
        shapes = {"tiny": (128, 520, 256)}
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    log(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    result = dict(jax=jax.__version__, device=jax.devices()[0].device_kind, config=str(CFG),
                  check=correctness(log, check_shapes), timing=timing(log, shapes, args.iters))
    print("\n== correctness ==")
    for rec in result["check"]:
        print(f"{'OK  ' if rec['ok'] else 'FAIL'} {rec}")
    print("\n== timing (bf16; live TFLOP/s = live work / time) ==")
    for row in result["timing"]:
        if "ms" in row:
            print(f"{row['shape']:<7} live {row['live']:.3f} {row['impl']:<10} {row['ms']:8.3f} ms "
                  f"{row['tflops']:7.1f}")
        else:
            print(f"{row['shape']:<7} live {row['live']:.3f} {row['impl']:<10} ERROR {row['error'][:150]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
