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

Diagnostics (from the first H200 run, whose partial-row-block stores were undefined): every check case records
where the errors are (max lse / target error per row block, bad and worst rows, whole row blocks against the last,
partial one); a failing case is rerun with ``debug="row_max"`` (the softmax sum plays no part) and, if its errors
are not confined to the last row block, on each half of the vocabulary to localise the columns. Tiny shapes
(128 x 64 x 512: one D step, one or two tiles) separate single-tile correctness from the pipelining. The
``ctas7`` config runs the persistent schedule's rounds, splits and tails at the check shape; ``grid128`` times
the schedule that at N 8192 is the former grid of 2 vocabulary splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cce_jax.autotune import timed_row  # noqa: E402
from cce_jax.cce import KernelConfig  # noqa: E402
from pallas_kernels.lse_forward import ForwardConfig, lse_forward  # noqa: E402
from pallas_kernels.mosaic_forward import MosaicForwardConfig, lse_forward_mosaic  # noqa: E402
from pallas_kernels.tiles import Problem  # noqa: E402

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}
TRITON_CFG = ForwardConfig(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=4)
M = MosaicForwardConfig
MOSAIC_CFGS = {
    "n64-v128x2-s4": M(block_n=64, block_v=128, block_d=64, stages=4, compute_wgs=2),
    "n64-v256x1-s4": M(block_n=64, block_v=256, block_d=64, stages=4, compute_wgs=1),
    "n128-v128x1-s4": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=1),
    # The library's default (KernelConfig().mosaic): one CTA per SM on the persistent schedule
    # (pallas_kernels/mosaic_schedule.py), block_d 128 in 2 stages.
    "default": KernelConfig().mosaic,
    "bd64-s3": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2),
    # Clusters of two CTAs on adjacent row blocks, the classifier tiles multicast (half read by each CTA).
    "cl2": dataclasses.replace(KernelConfig().mosaic, cluster=2),
    "cl2-bd64-s3": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, cluster=2),
    "cl2-ctas7": dataclasses.replace(KernelConfig().mosaic, cluster=2, ctas=7),
    # The target logit from XLA's gathered product instead of the epilogue's column compare.
    "tg": dataclasses.replace(KernelConfig().mosaic, target_gather=True),
    "cl2-tg": dataclasses.replace(KernelConfig().mosaic, cluster=2, target_gather=True),
    "s4": M(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2),
    "approx": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, approx_math=True),
    "bd128-s2": M(block_n=128, block_v=128, block_d=128, stages=2, compute_wgs=2),
    # 128 CTAs: at N 8192 the schedule is then the grid of 2 vocabulary splits that was the default before.
    "grid128": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, ctas=128),
    # 7 CTAs at the check shape: a round of whole row blocks, then splits with tails.
    "ctas7": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, ctas=7),
    # Row-split warpgroups: 64 rows x 256 columns each (one m64n256 wgmma per k16), one shared classifier tile.
    "n256": M(block_n=128, block_v=256, block_d=128, stages=2, compute_wgs=2, wg_split="n", target_gather=True),
    "n256-bd64-s4": M(block_n=128, block_v=256, block_d=64, stages=4, compute_wgs=2, wg_split="n",
                      target_gather=True),
    "n256-cl2": M(block_n=128, block_v=256, block_d=128, stages=2, compute_wgs=2, wg_split="n", cluster=2,
                  target_gather=True),
    # 128 x 128 CTA tiles of row-split warpgroups (64 x 128 each), without and with the overlapped epilogue.
    "n128": M(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n", target_gather=True),
    "ov": M(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n", overlap_epilogue=True,
            target_gather=True),
    "ov-bd64-s6": M(block_n=128, block_v=128, block_d=64, stages=6, compute_wgs=2, wg_split="n",
                    overlap_epilogue=True, target_gather=True),
    "ov-cl2": M(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n", overlap_epilogue=True,
                cluster=2, target_gather=True),
    "ov-cl2-ctas7": M(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n",
                      overlap_epilogue=True, cluster=2, ctas=7),
    "ov-async-s4": M(block_n=128, block_v=128, block_d=64, stages=6, compute_wgs=2, wg_split="n",
                     overlap_epilogue=True, async_wgmma=True, target_gather=True),
    # A wgmma kept in flight across pipeline steps (no tensor-core drain per step) needs a third stage: block_d
    # 96 (64-byte swizzle) fits three 72 KB stages.
    "n256-async-bd64-s4": M(block_n=128, block_v=256, block_d=64, stages=4, compute_wgs=2, wg_split="n",
                            async_wgmma=True, target_gather=True),
    "n256-async-bd96-s3": M(block_n=128, block_v=256, block_d=96, stages=3, compute_wgs=2, wg_split="n",
                            async_wgmma=True, target_gather=True),
    "n256-async-bd96-s3-cl2": M(block_n=128, block_v=256, block_d=96, stages=3, compute_wgs=2, wg_split="n",
                                async_wgmma=True, cluster=2, target_gather=True),
    "async-bd96-s3": M(block_n=128, block_v=128, block_d=96, stages=3, compute_wgs=2, async_wgmma=True,
                       target_gather=True),
    "ov-async-bd128-s3": M(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n",
                           overlap_epilogue=True, async_wgmma=True, target_gather=True),
    # Three compute warpgroups (160 registers each, compiled for 128): 128 x 384 CTA tiles.
    "v128x3": M(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=3, target_gather=True),
    "ov-async-bd128-s3-cl2": M(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n",
                               overlap_epilogue=True, async_wgmma=True, cluster=2, target_gather=True),
}
# Timed with a debug mode: (config, debug). "matmul_only" leaves out the epilogue but the row max (its cost).
DEBUG_TIMINGS = {"default-matmul-only": ("default", "matmul_only"), "grid128-matmul-only": ("grid128", "matmul_only"),
                 "cl2-matmul-only": ("cl2", "matmul_only"), "n256-matmul-only": ("n256", "matmul_only"),
                 "ov-matmul-only": ("ov", "matmul_only"),
                 "n256-async-bd96-s3-matmul-only": ("n256-async-bd96-s3", "matmul_only"),
                 "ov-async-bd128-s3-matmul-only": ("ov-async-bd128-s3", "matmul_only")}
TIMED_CFGS = ["default", "cl2", "bd64-s3", "default-matmul-only", "cl2-matmul-only"]
CHECK_CFGS = ["n64-v128x2-s4", "n128-v128x1-s4", "ctas7", "default", "cl2", "cl2-ctas7", "tg"]
CHECK_SHAPE = (1030, 1008, {"vd": 50264, "dv": 50272})
TINY_SHAPE = (128, 128, 512)
# Tiny-shape configs: the default has one row block, n64-v256x1 two vocabulary tiles.
TINY_CFGS = ["n64-v128x2-s4", "n64-v256x1-s4", "default"]
TOL = 1e-3
INTERPRET = False  # --smoke: tiny shapes, kernels in the Mosaic GPU / Triton interpreters (CPU check of this script)


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
    return lse, zt, z.sum(axis=1), jnp.abs(z).sum(axis=1), z.max(axis=1)


_REF_CACHE = {}


def _reference(e, c, bias, t, p: Problem, tag="full"):
    """Cached by (problem, tag): the data of a problem is deterministic (_data with seed 0, or a slice of it)."""
    key = (p, tag)
    if key not in _REF_CACHE:
        _REF_CACHE.clear()  # one reference alive at a time (dense logits are up to 207 MB)
        _REF_CACHE[key] = [np.asarray(x) for x in jax.jit(_xla_stats, static_argnames="p")(e, c, bias, t, p=p)]
    return _REF_CACHE[key]


_DATA_CACHE = {}
_HALVES_DONE = []  # column localisation runs once (the first failing case with errors outside the last block)


def _cached_data(n, d, v, layout, has_bias):
    key = (n, d, v, layout, has_bias)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = _data(n, d, v, layout, has_bias)
    return _DATA_CACHE[key]


def _run(e, c, bias, t, p, cfg, need_sum, debug=None):
    f = jax.jit(lambda e, c, b, t: lse_forward_mosaic(e, c, b, t, p=p, cfg=cfg, need_sum=need_sum,
                                                       interpret=INTERPRET, debug=debug))
    return f, [np.asarray(x) for x in jax.block_until_ready(f(e, c, bias, t))]


def _by_block(err, block):
    """Max of err over each row block, formatted compactly (all blocks: 17 at N = 1030 with block_n 64)."""
    return [f"{float(err[i:i + block].max()):.1e}" for i in range(0, len(err), block)]


def _locate(rec, lse, zt, r_lse, r_zt, block_n):
    """Where the errors are: per row block, bad rows, worst rows, whole row blocks vs the last partial one."""
    n = len(lse)
    le, te = np.abs(lse - r_lse), np.abs(zt - r_zt)
    le = np.where(np.isfinite(le), le, np.inf)
    te = np.where(np.isfinite(te), te, np.inf)
    rec["lse_err_by_block"] = _by_block(le, block_n)
    rec["tgt_err_by_block"] = _by_block(te, block_n)
    bad = np.nonzero((le > TOL) | (te > TOL))[0]
    rec["bad_rows"] = int(len(bad))
    if len(bad):
        rec["bad_rows_first_last"] = [int(bad[0]), int(bad[-1])]
        rec["bad_rows_list"] = [int(i) for i in bad[:16]]
    worst = np.argsort(-le)[:5]
    rec["worst_rows"] = [(int(i), float(lse[i]), float(r_lse[i])) for i in worst]
    full = n - n % block_n
    rec["lse_err_whole_blocks"] = float(le[:full].max()) if full else None
    rec["lse_err_last_partial_block"] = float(le[full:].max()) if full < n else None


def check_case(layout, n, d, v, has_bias, cap, need_sum, name, *, debug=None, label="", diagnose=True, log=print):
    cfg = MOSAIC_CFGS[name]
    rec = dict(label=label, layout=layout, n=n, d=d, v=v, bias=has_bias, softcap=cap, need_sum=need_sum, cfg=name,
               debug=debug)
    try:
        p = Problem(n=n, d=d, v=v, layout=layout, softcap=cap, has_bias=has_bias)
        e, c, bias, t = _cached_data(n, d, v, layout, has_bias)
        r_lse, r_zt, r_zs, r_abs, r_max = _reference(e, c, bias, t, p)
        f, (lse, zt, zs) = _run(e, c, bias, t, p, cfg, need_sum, debug)
        b = [np.asarray(x) for x in jax.block_until_ready(f(e, c, bias, t))]
        rec["lse_max_abs_err"] = float(np.abs(lse - r_lse).max())
        rec["target_max_abs_err"] = float(np.abs(zt - r_zt).max())
        rec["sum_max_rel_err"] = float((np.abs(zs - r_zs) / r_abs).max()) if need_sum else None
        rec["sum_zero_when_not_needed"] = None if need_sum else bool((zs == 0).all())
        rec["finite"] = bool(np.isfinite(lse).all() & np.isfinite(zt).all() & np.isfinite(zs).all())
        rec["bit_identical_repeat"] = all(bool((x == y).all()) for x, y in zip((lse, zt, zs), b))
        if not rec["bit_identical_repeat"]:
            diff = np.nonzero((lse != b[0]) | (zt != b[1]) | (zs != b[2]))[0]
            rec["repeat_differs_rows"] = [int(diff[0]), int(diff[-1]), int(len(diff))]
        rec["ok"] = (rec["finite"] and rec["bit_identical_repeat"] and rec["lse_max_abs_err"] < TOL
                     and rec["target_max_abs_err"] < TOL
                     and (rec["sum_max_rel_err"] < 1e-4 if need_sum else rec["sum_zero_when_not_needed"]))
        _locate(rec, lse, zt, r_lse, r_zt, cfg.block_n)
        if not rec["ok"] and diagnose and debug is None:
            # (i) softmax disabled: the kernel's running row max against the reference row max.
            _, (m, _, _) = _run(e, c, bias, t, p, cfg, need_sum, "row_max")
            me = np.abs(m - r_max)
            rec["rowmax_max_abs_err"] = float(me.max())
            rec["rowmax_err_by_block"] = _by_block(me, cfg.block_n)
            # Column localisation, only if the errors are not confined to the last partial row block.
            whole = rec["lse_err_whole_blocks"]
            if whole is not None and whole > TOL and not _HALVES_DONE:
                _HALVES_DONE.append(rec["cfg"])
                rec.update(_halves(e, c, bias, t, p, cfg, need_sum))
    except Exception as exc:  # noqa: BLE001
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        traceback.print_exc()
    log(f"check {rec}")
    return rec


def _halves(e, c, bias, t, p, cfg, need_sum):
    """lse error of the kernel on the first and on the second half of the vocabulary (columns localisation)."""
    out = {}
    h = (p.v // 2) // 256 * 256
    for name, lo, hi in (("first_half", 0, h), ("second_half", h, p.v)):
        try:
            ph = dataclasses.replace(p, v=hi - lo)
            ch = c[lo:hi] if p.layout == "vd" else c[:, lo:hi]
            bh = None if bias is None else bias[lo:hi]
            th = jnp.where((t >= lo) & (t < hi), t - lo, -1)
            r_lse, r_zt = _reference(e, ch, bh, th, ph, tag=(lo, hi))[:2]
            _, (lse, zt, _) = _run(e, ch, bh, th, ph, cfg, need_sum)
            le = np.abs(lse - r_lse)
            out[f"{name}_cols"] = [lo, hi]
            out[f"{name}_lse_err"] = float(le.max())
            out[f"{name}_tgt_err"] = float(np.abs(zt - r_zt).max())
            out[f"{name}_lse_err_by_block"] = _by_block(le, cfg.block_n)
        except Exception as exc:  # noqa: BLE001
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def correctness(log, budget_s: float = 120.0, only=None):
    """The check cases; ``only``: these configs alone, at the tiny shape and in every ragged case."""
    t0 = time.time()
    n, d, vs = CHECK_SHAPE
    out = []
    # 1) Tiny shapes first: single-tile correctness, separated from the pipelining.
    tn, td, tv = TINY_SHAPE
    for name in [x for x in only or TINY_CFGS if MOSAIC_CFGS[x].block_n <= tn]:  # one row block at most
        out.append(check_case("vd", tn, td, tv, False, None, True, name, label="tiny", log=log))
    if not only:
        out.append(check_case("dv", tn, td, tv, True, 30.0, True, "n64-v128x2-s4", label="tiny", log=log))
    # 2) The ragged check shape (as in the first run).
    for layout, v in vs.items():
        for has_bias, cap, need_sum in ((False, None, False), (True, 30.0, True), (False, 5.0, True)):
            names = CHECK_CFGS if (has_bias and layout == "vd") else [CHECK_CFGS[0], "default", "cl2", "tg"]
            for name in only or names:
                out.append(check_case(layout, n, d, v, has_bias, cap, need_sum, name, label="ragged",
                                      diagnose=time.time() - t0 < budget_s, log=log))
    # 3) N a multiple of block_n.
    v = vs["vd"]
    n_round = n // 128 * 128
    for name in only or ["n64-v128x2-s4"]:
        out.append(check_case("vd", n_round, d, v, False, None, True, name, label=f"n{n_round}", log=log))
    _DATA_CACHE.clear()
    _REF_CACHE.clear()
    log(f"correctness took {time.time() - t0:.1f} s")
    return out


def timing(shapes, iters, cfg_names, log, rounds=1):
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
            cfg, debug = (MOSAIC_CFGS[DEBUG_TIMINGS[name][0]], DEBUG_TIMINGS[name][1]) if name in DEBUG_TIMINGS \
                else (MOSAIC_CFGS[name], None)
            entries.append((f"mosaic {name}", lambda e, c, t, cfg=cfg, debug=debug: lse_forward_mosaic(
                e, c, None, t, p=p, cfg=cfg, need_sum=False, interpret=INTERPRET, debug=debug)))
        # Every entry is timed once per round, the rounds interleaved, so that a drift of the GPU's clock (power,
        # temperature) over the run does not favour the entries timed first; ms is the median over the rounds.
        per_round = {label: [] for label, _ in entries}
        errors = {}
        entries = [(label, jax.jit(fn)) for label, fn in entries]
        for _ in range(rounds):
            for label, fn in entries:
                if label in errors:
                    continue
                row = timed_row({}, fn, e, c, t, iters=iters)
                if "error" in row:
                    errors[label] = row["error"]
                else:
                    per_round[label].append(row["ms"])
        xla_ms = None
        for label, _ in entries:
            row = dict(shape=shape_name, impl=label)
            if label in errors:
                row["error"] = errors[label]
            else:
                ms = float(np.median(per_round[label]))
                row.update(ms=ms, tflops=flops / ms / 1e9, rounds_ms=[round(x, 3) for x in per_round[label]])
                if label.startswith("xla fw"):
                    xla_ms = ms
                if xla_ms is not None:
                    row["vs_xla_fw"] = ms / xla_ms
            log(f"time {row}")
            rows.append(row)
        del e, c, t
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds, interleaving the entries (median kept)")
    ap.add_argument("--shapes", type=str, default="gemma2,llama3")
    ap.add_argument("--configs", type=str, default=",".join(TIMED_CFGS),
                    help=f"comma-separated Mosaic configs to time, of {sorted(MOSAIC_CFGS) + sorted(DEBUG_TIMINGS)}")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-configs", type=str, default="",
                    help="comma-separated configs to check (at every check shape) instead of the built-in list")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (runs on a CPU)")
    args = ap.parse_args()
    if args.smoke:
        global INTERPRET, CHECK_SHAPE
        global TINY_SHAPE
        INTERPRET, CHECK_SHAPE, TINY_SHAPE = True, (270, 272, {"vd": 520, "dv": 528}), (128, 128, 512)
        SHAPES.update(gemma2=(128, 128, 1024), llama3=(128, 256, 1024))
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    log(f"jax {jax.__version__}, devices {jax.devices()}, kind {jax.devices()[0].device_kind}")
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "configs": {k: dataclasses.asdict(v) for k, v in MOSAIC_CFGS.items()},
              "triton_config": dataclasses.asdict(TRITON_CFG)}
    result["check"] = [] if args.skip_check else correctness(
        log, only=[c for c in args.check_configs.split(",") if c] or None)
    result["timing"] = [] if args.skip_timing else timing(
        [s for s in args.shapes.split(",") if s], args.iters, [c for c in args.configs.split(",") if c], log,
        rounds=args.rounds)

    print("\n== correctness ==")
    for r in result["check"]:
        print(f"{'OK  ' if r['ok'] else 'FAIL'} {r['label']:<14} {r['layout']} n={r['n']} v={r['v']} "
              f"bias={r['bias']} cap={r['softcap']} sum={r['need_sum']} {r['cfg']:<24} "
              f"lse={r.get('lse_max_abs_err', float('nan')):.2e} "
              f"tgt={r.get('target_max_abs_err', float('nan')):.2e} sum_rel={r.get('sum_max_rel_err')} "
              f"repeat={r.get('bit_identical_repeat')} bad_rows={r.get('bad_rows')} "
              f"whole_blocks={r.get('lse_err_whole_blocks')} last_block={r.get('lse_err_last_partial_block')} "
              f"{r.get('error', '')[:120]}")
        if not r["ok"] and "lse_err_by_block" in r:
            print(f"     lse err by row block: {' '.join(r['lse_err_by_block'])}")
            print(f"     bad rows: {r.get('bad_rows_first_last')} {r.get('bad_rows_list')}; "
                  f"worst (row, kernel, ref): {r.get('worst_rows')}; repeat differs: {r.get('repeat_differs_rows')}")
            if "rowmax_max_abs_err" in r:
                print(f"     row max (softmax off) err={r['rowmax_max_abs_err']:.2e} by block: "
                      f"{' '.join(r['rowmax_err_by_block'])}")
            for h in ("first_half", "second_half"):
                if f"{h}_lse_err" in r:
                    print(f"     {h} cols {r[f'{h}_cols']}: lse={r[f'{h}_lse_err']:.2e} tgt={r[f'{h}_tgt_err']:.2e} "
                          f"by block: {' '.join(r[f'{h}_lse_err_by_block'])}")
    print("\n== timing (bf16) ==")
    print(f"{'shape':<8} {'impl':<40} {'ms':>8} {'TFLOP/s':>8} {'/xla fw':>8}")
    for r in result["timing"]:
        if "ms" in r:
            print(f"{r['shape']:<8} {r['impl']:<40} {r['ms']:8.2f} {r['tflops']:8.1f} "
                  f"{r.get('vs_xla_fw', float('nan')):8.3f}  rounds {r['rounds_ms']}")
        else:
            print(f"{r['shape']:<8} {r['impl']:<40} ERROR {r['error'][:150]}")
    result["total_s"] = time.time() - t_start
    print(f"\ntotal {result['total_s']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
