"""Log-sum-exp forward on Pallas' Mosaic GPU backend (Hopper, sm_90): TMA + wgmma, online max/sum epilogue.

Per token ``(lse, target_logit, sum_logits)`` of ``z = softcap(e @ c^T + bias)``, all float32 (N,), in one pass
over the vocabulary, never storing a logit. Same contract as :func:`pallas_kernels.lse_forward.lse_forward`.

Grid and block layout
---------------------
- A persistent grid of ``ctas`` CTAs (default: one per SM, a single wave). The work is the matrix of row blocks
  (``block_n`` tokens) by CTA tiles (``W = compute_wgs * block_v`` vocabulary columns, ``block_v`` with
  ``wg_split="n"``: "Warpgroup split" below); each CTA runs a short
  list of *segments*, a row block and a contiguous range of its tiles, given by
  :mod:`pallas_kernels.mosaic_schedule` (whole row blocks in rounds, then the last row blocks split along the
  vocabulary, and the CTAs left over taking the tails of those splits, so every SM is busy to the end while the
  CTAs running together read the same classifier tiles).
- Each CTA runs ``compute_wgs + 1`` warpgroups. The last one is the memory warpgroup: it streams, for every tile
  ``j`` of every segment and every ``block_d`` slice ``k`` of the hidden size, the ``(block_n, block_d)`` tile of
  ``e`` and the ``(W, block_d)`` (layout "vd") or ``(block_d, W)`` (layout "dv") tile of ``c`` into a ring of
  ``stages`` SMEM slots with TMA (one "loaded" barrier per slot and operand, one "consumed" barrier per slot that
  every compute warpgroup arrives on after its wgmma finished reading the slot), the bias slice of each tile into
  a double buffer, and the targets of each segment's row block into another. The ring runs on across segments.
- Compute warpgroup ``w`` owns columns ``[w * block_v, (w + 1) * block_v)`` of every CTA tile (by default; rows
  with ``wg_split="n"``): for each tile it
  accumulates its ``(block_n, block_v)`` float32 logits tile over D with wgmma (e from SMEM, c from SMEM,
  transposed view for "vd"), then folds the tile into its running statistics in registers
  (:func:`online_update`, the flash-attention recurrence; the target logit is the column equal to the token's
  target; the sum of logits when ``need_sum``). Only the last tile (the one reaching past V) pays for the column
  mask.
- At the end of a segment warpgroups ``1..compute_wgs-1`` hand their statistics to warpgroup 0 through SMEM
  (:func:`merge_stats`), which writes one float32 per token and output through SMEM and a bulk copy into the
  segment's slot of ``(slots, N_pad)`` partial outputs, ``N_pad = round_up(N, block_n)`` (never a partial store:
  see "Output stores" below). XLA merges the slots (:func:`pallas_kernels.mosaic_schedule.merge`):
  ``4 * slots * N_pad`` bytes per output (lse, target logit, and the sum of logits only with ``need_sum``); 4
  slots, 256 KB, at N 8192 on an H200.

Clusters
--------
With ``cluster=2`` the schedule's unit is a pair of adjacent row blocks (``2 * block_n`` tokens) and each unit is
run by a cluster of two CTAs, CTA ``r`` of the cluster on row block ``2 * unit + r``, over the same segments. The
memory warpgroups issue each ``c`` tile as a multicast copy: each CTA reads half of it and the TMA unit writes
it into both CTAs' SMEM, so the classifier crosses from L2 once per cluster instead of once per CTA (at llama3
with 128 x 256 CTA tiles the L2 reads fall by a third). A slot may then be refilled only once the compute
warpgroups of *both* CTAs have read it: "consumed" is a cluster barrier (each compute warpgroup arrives on it in
both CTAs). With an odd number of row blocks the last cluster's second CTA repeats the last row block's loads
(it must take part in the multicast) and writes its statistics into the padding of the partial outputs, which
the merge drops.

Warpgroup split
---------------
By default (``wg_split="v"``) compute warpgroup ``w`` owns ``block_v`` columns ``w`` of the CTA tile and all
``block_n`` rows: with 128 rows a warpgroup issues two m64 wgmma instructions per 16-deep slice, each reading
its classifier slice from SMEM, and warpgroup 0 merges the statistics at the end of a segment. With
``wg_split="n"`` warpgroup ``w`` owns rows ``[w * R, (w + 1) * R)``, ``R = block_n / compute_wgs``, of a
``block_v``-wide tile: every warpgroup reads the one classifier tile of a ring slot (one TMA copy per step), with
64 x 256 per warpgroup each slice is a single m64n256 instruction (a sixth less SMEM read per product than two
m64n128), and each warpgroup writes its own rows' statistics (no merge).

Overlapped epilogue
-------------------
The epilogue (online max and sum: an exp per logit on the MUFU units) otherwise runs while the tensor cores wait,
since both warpgroups finish each tile's matmul together. With ``overlap_epilogue`` a warpgroup keeps the
previous tile's logits in registers beside the accumulator (two ``R x block_v`` float32 tiles, so at most 64 x 128
per warpgroup) and runs the previous tile's epilogue in pieces between issuing a pipeline step's wgmma and
waiting for it: the *head* (bias, softcap, target, sum, mask, row max, rescale) during step 0, then the exps
of ``EXP_SLICE``-column slices during steps 1, 2, ... (pieces left when the tile has fewer steps run in its
last step). A segment's first tile has no predecessor and its last tile's epilogue follows the loop, so only
that one can be the ragged tile past V (masked). The bias double buffer still suffices: a tile's bias slot is
released during the next tile's step 0, before the producer needs it for the tile after.

Target logit
------------
By default each compute warpgroup picks the target logit out of every tile it computes (the column equal to the
token's target, a compare, a select and an add per logit). With ``target_gather`` the kernel skips it (and the
targets' loads) and :func:`gathered_target_logits` computes it in XLA from ``N`` gathered classifier rows, the
same float32-accumulated product of the same half-precision operands, plus bias and softcap.

Output stores
-------------
Pallas lowers ``copy_smem_to_gmem`` with ``OOBFillMode.UNDEFINED``, and Mosaic GPU turns a contiguous,
unswizzled SMEM->GMEM copy such as our 1-D ``(block_n,)`` statistics rows into a plain
``cp.async.bulk.global.shared::cta`` whose byte count is clamped to the end of the destination array, and
``cp.async.bulk`` needs a multiple of 16 bytes. A store of the last, partial row block into an ``(N,)`` output
was undefined for ``N % 4 != 0`` (the first H200 run: those rows were never written; the Mosaic GPU interpreter
performs the partial store, so it hid the problem). Every store is a whole row block of a padded output.

Tile stores (``store=True`` of :func:`run_kernel`, used by :mod:`pallas_kernels.mosaic_logits_chunk` for the
three-pass path): each compute warpgroup also writes every logits tile relative to its row maxima and the maxima
themselves, through per-warpgroup SMEM buffers and TMA copies (``stages`` shrinks to fit: :func:`smem_bytes`).

Debug variants (``debug=`` of :func:`lse_forward_mosaic`, for benchmarks/mosaic_gpu_check.py): ``"row_max"``
returns the running row max instead of the lse (softmax sum not used), ``"matmul_only"`` the row max with the
rest of the epilogue left out (the matmul's own time, to price the epilogue by difference).

Edges: N, V and D need not be multiples of the tiles. TMA reads outside an array are zero-filled on Hopper (and
in the Mosaic GPU interpreter), so D padding contributes 0 to the products and padded rows are computed, written
into the padded outputs and sliced off; columns >= V are set to -inf before the max/sum and excluded from the
target and the sum of logits (the 1-D bias copy may leave stale SMEM past V, which the same mask hides).

Precision: bf16 and fp16 inputs only (products accumulate in float32 in wgmma). float32 inputs are rejected
(wgmma would run them as TF32): the dispatcher keeps the Triton kernel (IEEE products) for float32.

Shape rules (checked by :func:`check_supported` / :func:`supports`; the dispatcher uses Triton otherwise). Mosaic
GPU describes a tiled TMA copy over the whole array, tiled like the swizzled SMEM buffer wgmma reads, so:
- the minor dimension of each operand must be a multiple of the swizzle width: D % 16 == 0 (16-bit types;
  D % 64 == 0 gets the 128-byte swizzle, D % 32 the 64-byte one, else 32-byte), and for "dv" also V % 16 == 0;
- the major dimension must be a multiple of 8 rows: V % 8 == 0 for "vd" (50257 is not: pad the classifier once,
  outside the step, or use Triton); N % 8 != 0 is handled by padding e (only e) to the next multiple of 8 rows,
  a temporary copy of e;
- every dimension at least one tile: N >= block_n, D >= block_d, V >= compute_wgs * block_v.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_schedule as schedule
from pallas_kernels.tiles import Problem

LOG2E = math.log2(math.e)
# Entries of one warpgroup's tile with overlap_epilogue: two float32 tiles of 64 registers per thread each.
OVERLAP_TILE = 64 * 128
# Columns per exp slice of an overlapped epilogue (one slice per pipeline step).
EXP_SLICE = 32


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
    """Tiling of :func:`lse_forward_mosaic`.

    Attributes:
      block_n: tokens per CTA (a multiple of 64: wgmma's M).
      block_v: vocabulary columns per compute warpgroup and tile (a multiple of 64, at most 256: wgmma's N).
      block_d: hidden-size slice per pipeline step (64 for 16-bit types gives 128-byte rows, the widest swizzle).
      stages: SMEM ring depth of the TMA pipeline (max concurrent steps).
      compute_wgs: compute warpgroups per CTA (1, 2 or 3), each with its own block_v columns of the CTA tile (or
        rows: ``wg_split``). With 3 each gets 160 registers per thread (:func:`register_split`).
      ctas: CTAs of the persistent grid (:mod:`pallas_kernels.mosaic_schedule`); None: one per SM of the GPU
        (132 without a GPU), a single wave.
      cluster: CTAs per cluster (1 or 2). With 2, the CTAs of a cluster take adjacent row blocks over the same
        vocabulary tiles, and each classifier tile is read from L2 once per cluster, half by each CTA and
        multicast into both (module docstring, "Clusters"); ``ctas`` is then rounded down to a multiple of 2.
      approx_math: approximate exp/log/tanh (MUFU); exp2/log stay accurate to ~1e-6 relative, tanh to ~1e-3.
      target_gather: take the target logit from a gathered product in XLA (``e[i] . c[t[i]]``, N x D work and
        N x D of gathered classifier rows) instead of the epilogue's column compare, which costs three of the
        epilogue's per-logit instructions (module docstring, "Target logit").
      async_wgmma: keep one wgmma in flight while the next is issued (each slot is released one step later, so
        the ring holds one fewer step in flight: give it a stage more). Off by default: with two compute
        warpgroups the other one already keeps the tensor cores busy, and on an H200 it was 3-10% slower
        (benchmarks/results.md, pass 1 configs).
      wg_split: how the compute warpgroups share the CTA tile. ``"v"``: warpgroup ``w`` owns ``block_v`` columns
        ``w`` of the ``compute_wgs * block_v``-wide tile and all ``block_n`` rows, and warpgroup 0 merges their
        statistics at the end of each segment. ``"n"``: warpgroup ``w`` owns ``block_n / compute_wgs`` rows
        (a multiple of 64) of a ``block_v``-wide tile, all warpgroups read the same classifier tile, and each
        writes its own rows (no merge). With 64 rows by 256 columns per warpgroup each wgmma is one m64n256
        instruction, which reads the classifier slice from shared memory once per warpgroup instead of once per
        64 rows (module docstring, "Warpgroup split").
      overlap_epilogue: run each tile's epilogue during the next tile's matmul (module docstring, "Overlapped
        epilogue"): a warpgroup keeps the previous tile's logits in registers beside the accumulator, so its
        tile must be at most 8192 entries (e.g. 64 x 128 with ``wg_split="n"``).
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    stages: int = 4
    compute_wgs: int = 2
    ctas: int | None = None
    cluster: int = 1
    approx_math: bool = False
    async_wgmma: bool = False
    target_gather: bool = False
    wg_split: str = "v"
    overlap_epilogue: bool = False

    def __post_init__(self):
        if self.block_n % 64 or self.block_n <= 0:
            raise ValueError(f"block_n={self.block_n} must be a positive multiple of 64")
        if self.block_v % 64 or not 64 <= self.block_v <= 256:
            raise ValueError(f"block_v={self.block_v} must be 64, 128, 192 or 256")
        if self.block_d % 16 or self.block_d <= 0:
            raise ValueError(f"block_d={self.block_d} must be a positive multiple of 16")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be at least 2")
        if self.compute_wgs not in (1, 2, 3):
            raise ValueError(f"compute_wgs={self.compute_wgs} must be 1, 2 or 3")
        if self.cluster not in (1, 2):
            raise ValueError(f"cluster={self.cluster} must be 1 or 2")
        if self.ctas is not None and self.ctas < self.cluster:
            raise ValueError(f"ctas={self.ctas} must be None or at least cluster={self.cluster}")
        if self.wg_split not in ("v", "n"):
            raise ValueError(f'wg_split={self.wg_split!r} must be "v" or "n"')
        if self.wg_split == "n" and self.block_n % (64 * self.compute_wgs):
            raise ValueError(f'wg_split="n" needs block_n={self.block_n} to be a multiple of 64 * '
                             f"compute_wgs={self.compute_wgs} (64-row wgmma tiles per warpgroup)")
        if self.overlap_epilogue and self.wg_rows * self.block_v > OVERLAP_TILE:
            raise ValueError(f"overlap_epilogue keeps two {self.wg_rows} x {self.block_v} float32 tiles per "
                             f"warpgroup in registers: its tile must be at most {OVERLAP_TILE} entries (e.g. "
                             'block_v=128 with 64 rows per warpgroup: wg_split="n", block_n=128)')

    @property
    def tile_v(self) -> int:
        """Columns of one CTA vocabulary tile."""
        return self.block_v if self.wg_split == "n" else self.compute_wgs * self.block_v

    @property
    def wg_rows(self) -> int:
        """Rows of one compute warpgroup's tile."""
        return self.block_n // self.compute_wgs if self.wg_split == "n" else self.block_n

    @property
    def c_copies(self) -> int:
        """Classifier tiles (TMA copies of at most 256 columns) per pipeline step: one per compute warpgroup,
        or one shared by all with ``wg_split="n"``."""
        return 1 if self.wg_split == "n" else self.compute_wgs


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------------------
# Pure math shared with other backends: the online log-sum-exp recurrence and its merges.


def online_update(m: jax.Array, s: jax.Array, z: jax.Array, z_max: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Folds a (rows, cols) tile ``z`` (masked entries -inf) into the running max ``m`` and sum ``s`` (rows,).

    ``s`` is the sum of ``exp(z - m)`` over the columns seen so far. A row with no finite entry yet keeps
    ``m = -inf, s = 0`` (no NaN from ``-inf - -inf``). ``z_max``: the tile's row maxima, if already known.
    """
    m_new, s, shift = online_rescale(m, s, z.max(axis=1) if z_max is None else z_max)
    return m_new, s + exp_sum(z, shift)


def online_rescale(m: jax.Array, s: jax.Array, z_max: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first half of :func:`online_update`: the new running max, the old sum rescaled to it, and the shift
    (the new max in base 2, 0 for a row with no finite entry yet) that :func:`exp_sum` takes."""
    m_new = jnp.maximum(m, z_max)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    return m_new, s * jnp.exp2((m - m_safe) * LOG2E), m_safe * LOG2E


def exp_sum(z: jax.Array, shift: jax.Array) -> jax.Array:
    """The second half of :func:`online_update`, over any columns of the tile: ``sum(exp(z - m_new))`` per row."""
    return jnp.exp2(z * LOG2E - lax.broadcast_in_dim(shift, z.shape, [0])).sum(axis=1)


def merge_stats(m_a, s_a, m_b, s_b) -> tuple[jax.Array, jax.Array]:
    """Merges two running (max, sum) pairs over disjoint column sets."""
    m = jnp.maximum(m_a, m_b)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    return m, s_a * jnp.exp2((m_a - m_safe) * LOG2E) + s_b * jnp.exp2((m_b - m_safe) * LOG2E)


def finish_lse(m: jax.Array, s: jax.Array) -> jax.Array:
    """log-sum-exp from a running (max, sum) pair; -inf where no column was seen."""
    return m + jnp.log(s)


def softcap(z: jax.Array, cap: float | None) -> jax.Array:
    return z if cap is None else cap * jnp.tanh(z * (1.0 / cap))


# --------------------------------------------------------------------------------------------------------------


def widest_swizzle(minor_bytes) -> int:
    """The widest SMEM swizzle (128, 64 or 32 bytes) dividing every given minor-dimension size in bytes, else 0.

    Mosaic GPU describes a tiled TMA copy over the whole array tiled like the SMEM buffer, so the minor dimension
    of each array (and of each tile) must be a multiple of the swizzle width (wgmma has no unswizzled mode), and
    the major one a multiple of 8 rows.
    """
    for swizzle in (128, 64, 32):
        if all(x % swizzle == 0 for x in minor_bytes):
            return swizzle
    return 0


def pick_swizzle(p: Problem, cfg: MosaicForwardConfig, dtype) -> int:
    """The SMEM swizzle (bytes) shared by both wgmma operands of the forward, or 0 if none fits."""
    isz = jnp.dtype(dtype).itemsize
    minors = [p.d, cfg.block_d] + ([p.v, cfg.block_v] if p.layout == "dv" else [])
    return widest_swizzle([x * isz for x in minors])


SMEM_BYTES = 227 * 1024  # per CTA on sm_90


def smem_bytes(cfg: MosaicForwardConfig, dtype, store: bool) -> int:
    """Shared memory of one CTA: the operand ring, and with ``store`` the logits tile of every warpgroup."""
    isz = jnp.dtype(dtype).itemsize
    ring = cfg.stages * (cfg.block_n + cfg.tile_v) * cfg.block_d * isz
    out = cfg.compute_wgs * cfg.wg_rows * (cfg.block_v * isz + 4) if store else 0
    return ring + out + 4096  # statistics, targets, bias, barriers


def check_supported(e: jax.Array, c: jax.Array, p: Problem, cfg: MosaicForwardConfig, store: bool = False) -> None:
    """Raises NotImplementedError when the Mosaic kernel cannot run this problem (the caller uses Triton).
    ``store``: the logits-chunk variant (:mod:`pallas_kernels.mosaic_logits_chunk`), which also needs whole row
    blocks and the SMEM of its tile buffers."""
    if e.dtype not in (jnp.bfloat16, jnp.float16) or c.dtype != e.dtype:
        raise NotImplementedError(f"Mosaic forward needs bf16/fp16 e and c of one dtype, got {e.dtype}, {c.dtype}")
    if p.layout not in ("vd", "dv"):
        raise ValueError(f"unknown layout {p.layout!r}")
    if not pick_swizzle(p, cfg, e.dtype):
        minor = "D" if p.layout == "vd" else "D and V"
        raise NotImplementedError(
            f"{minor} (D={p.d}, V={p.v}) and block_d/block_v must be multiples of 16 elements for a swizzled "
            "TMA copy")
    if p.layout == "vd" and p.v % 8:
        raise NotImplementedError(f"layout 'vd' needs V % 8 == 0 (TMA tiles of 8 rows), got V={p.v}")
    if p.n < cfg.block_n or p.d < cfg.block_d or p.v < cfg.tile_v:
        raise NotImplementedError(
            f"arrays smaller than one tile: N={p.n} < {cfg.block_n}, D={p.d} < {cfg.block_d} or "
            f"V={p.v} < {cfg.tile_v}")
    if store and p.n % (cfg.block_n * cfg.cluster):
        raise NotImplementedError(f"the logits-chunk kernel needs N % (block_n * cluster) == 0 (no phantom row "
                                  f"blocks), got N={p.n}, block_n={cfg.block_n}, cluster={cfg.cluster}")
    if smem_bytes(cfg, e.dtype, store) > SMEM_BYTES:
        raise NotImplementedError(f"config {cfg} needs {smem_bytes(cfg, e.dtype, store)} bytes of shared memory "
                                  f"per CTA, more than {SMEM_BYTES}")


def supports(e: jax.Array, c: jax.Array, p: Problem, cfg: MosaicForwardConfig, store: bool = False) -> bool:
    """Whether :func:`lse_forward_mosaic` (``store``: the logits-chunk variant) runs this problem (dtype and
    shape rules of the TMA copies, shared memory)."""
    try:
        check_supported(e, c, p, cfg, store)
    except NotImplementedError:
        return False
    return True


def smem_transforms(swizzle: int, dtype) -> tuple:
    """The SMEM tiling and swizzle of a wgmma operand (or TMA-stored tile) with this swizzle width."""
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)


def _kernel(*refs, p: Problem, cfg: MosaicForwardConfig, sch: schedule.Schedule, need_sum: bool, store: bool,
            dtype, bias_dtype, debug: str | None = None):
    need_target = not cfg.target_gather
    refs = list(refs)
    e_ref, c_ref = refs.pop(0), refs.pop(0)
    b_ref = refs.pop(0) if p.has_bias else None
    t_ref = refs.pop(0) if need_target else None
    lse_ref = refs.pop(0)
    zt_ref = refs.pop(0) if need_target else None
    zs_ref = refs.pop(0) if need_sum else None
    z_ref, m_ref = refs if store else (None, None)
    out_refs = [r for r in (lse_ref, zt_ref, zs_ref) if r is not None]

    bn, bv, bd, S, cw, cl = cfg.block_n, cfg.block_v, cfg.block_d, cfg.stages, cfg.compute_wgs, cfg.cluster
    rows, nc, split_n = cfg.wg_rows, cfg.c_copies, cfg.wg_split == "n"
    merge = cw > 1 and not split_n  # warpgroups of one row block hand their statistics to warpgroup 0
    n_blocks = cdiv(p.n, bn)
    W = cfg.tile_v
    kd = cdiv(p.d, bd)
    n_full = p.v // W  # tiles entirely below V skip the column mask
    ROW = plgpu.Layout.WGMMA.reduce(1)
    COL = plgpu.Layout.WGMMA.reduce(0)

    def final_stat(m, s):
        return m if debug in ("row_max", "matmul_only") else finish_lse(m, s)

    c_tile = (bv, bd) if p.layout == "vd" else (bd, bv)  # one TMA copy per classifier tile (<= 256 wide)
    transforms = smem_transforms(pick_swizzle(p, cfg, dtype), dtype)
    scratch = dict(
        e_smem=plgpu.SMEM((S, bn, bd), dtype, transforms=transforms),
        c_smem=plgpu.SMEM((S, nc, *c_tile), dtype, transforms=transforms),
        t_smem=plgpu.SMEM((2, bn), jnp.int32) if need_target else None,
        stat_smem=plgpu.SMEM((cw, 4, bn), jnp.float32) if merge else None,
        out_smem=plgpu.SMEM((cw if split_n else 1, len(out_refs), rows), jnp.float32),
        b_smem=plgpu.SMEM((2, nc, bv), bias_dtype) if p.has_bias else None,
        loaded=plgpu.Barrier(num_arrivals=1 + nc, num_barriers=S),  # the e tile and the classifier tiles
        consumed=(plgpu.Barrier(num_arrivals=cw, num_barriers=S) if cl == 1 else
                  plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=cw, num_barriers=S)),
        t_bar=plgpu.Barrier(num_barriers=2) if need_target else None,
        t_consumed=plgpu.Barrier(num_arrivals=cw, num_barriers=2) if need_target else None,
        b_bar=plgpu.Barrier(num_arrivals=nc, num_barriers=2) if p.has_bias else None,
        b_consumed=plgpu.Barrier(num_arrivals=cw, num_barriers=2) if p.has_bias else None,
        merge_bar=plgpu.Barrier(num_arrivals=cw - 1, num_barriers=1) if merge else None,
        merge_free=plgpu.Barrier(num_arrivals=1, num_barriers=1) if merge else None,
        z_smem=plgpu.SMEM((cw, rows, bv), dtype, transforms=smem_transforms(128, dtype)) if store else None,
        m_smem=plgpu.SMEM((cw, rows), jnp.float32) if store else None,
    )

    def body(e_smem, c_smem, t_smem, stat_smem, out_smem, b_smem, loaded, consumed, t_bar, t_consumed, b_bar,
             b_consumed, merge_bar, merge_free, z_smem, m_smem):
        wg = lax.axis_index("wg")
        cta = lax.axis_index("cta")  # the cluster's index in the grid (a CTA's own without clusters)
        rank = lax.axis_index("cluster") if cl > 1 else 0
        n_seg = jnp.asarray(schedule.num_segments(sch, cta), jnp.int32)

        def segments(fn):
            """Runs ``fn(q, row, first, end, slot, lt) -> lt`` over this CTA's segments (``row``: its own row
            block in the cluster's unit); ``lt`` counts the CTA's tiles (the pipeline's step ``lt * kd + k``
            picks the ring slot and its phase)."""
            def seg(q, lt):
                unit, first, end, slot = (jnp.asarray(x, jnp.int32) for x in schedule.segment(sch, cta, q))
                return fn(q, unit * cl + rank, first, end, slot, lt)

            return lax.fori_loop(0, n_seg, seg, jnp.int32(0))

        # ---------------- memory warpgroup: TMA producer ----------------
        def load_segment(q, row, first, end, slot, lt):
            n0 = jnp.minimum(row, n_blocks - 1) * bn  # a cluster's phantom row block (module docstring) repeats
            if need_target:
                t_slot = lax.rem(q, 2)

                @pl.when(q >= 2)
                def _():
                    plgpu.barrier_wait(t_consumed.at[t_slot])

                plgpu.copy_gmem_to_smem(t_ref.at[pl.ds(n0, bn)], t_smem.at[t_slot], t_bar.at[t_slot])

            def tile(j, lt):
                v0 = j * W
                if p.has_bias:
                    b_slot = lax.rem(lt, 2)

                    @pl.when(lt >= 2)
                    def _():
                        plgpu.barrier_wait(b_consumed.at[b_slot])

                    for i in range(nc):
                        plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(v0 + i * bv, bv)], b_smem.at[b_slot, i],
                                                b_bar.at[b_slot])

                def k_step(k, carry):
                    step = lt * kd + k
                    s = lax.rem(step, S)

                    @pl.when(step >= S)
                    def _():
                        plgpu.barrier_wait(consumed.at[s])

                    plgpu.copy_gmem_to_smem(e_ref.at[pl.ds(n0, bn), pl.ds(k * bd, bd)], e_smem.at[s], loaded.at[s])
                    for i in range(nc):
                        if p.layout == "vd":
                            src = c_ref.at[pl.ds(v0 + i * bv, bv), pl.ds(k * bd, bd)]
                        else:
                            src = c_ref.at[pl.ds(k * bd, bd), pl.ds(v0 + i * bv, bv)]
                        plgpu.copy_gmem_to_smem(src, c_smem.at[s, i], loaded.at[s],
                                                collective_axes="cluster" if cl > 1 else None)
                    return carry

                lax.fori_loop(0, kd, k_step, None)
                return lt + 1

            return lax.fori_loop(first, end, tile, lt)

        def drain(lo, hi, bar, n):
            """Observes the completions of ``bar`` this warpgroup has not waited for (the interpreter checks this at
            deallocation; on the GPU it only delays this warpgroup's exit)."""
            def wait(i, carry):
                plgpu.barrier_wait(bar.at[lax.rem(i, n)])
                return carry

            lax.fori_loop(jnp.maximum(lo, 0), hi, wait, None)

        @pl.when(wg == cw)
        def _memory_wg():
            if cw > 1:
                plgpu.set_max_registers(register_split(cw)[0], action="decrease")
            n_tiles = segments(load_segment)
            drain(n_tiles * kd - S, n_tiles * kd, consumed, S)
            if need_target:
                drain(n_seg - 2, n_seg, t_consumed, 2)
            if p.has_bias:
                drain(n_tiles - 2, n_tiles, b_consumed, 2)

        # ---------------- compute warpgroups ----------------
        def origin(w):
            """Warpgroup ``w``'s first row and column in the CTA tile, and its classifier tile in a ring slot."""
            return (w * rows, 0, 0) if split_n else (0, w * bv, w)

        def logits_tile(lt, w, chunks=()):
            """float32 (rows, bv) tile of e @ c^T for warpgroup ``w``'s part of the CTA's tile ``lt`` (no bias).

            ``chunks``: functions ``state -> state`` run while the wgmma of pipeline steps 0, 1, ... is in flight
            (the last step runs any left over), from ``state = None``; returns ``(tile, state)``."""
            r0, _, ci = origin(w)
            lag = int(cfg.async_wgmma)

            def mm(acc_ref):
                def k_step(k, state, work=()):
                    slot = lax.rem(lt * kd + k, S)
                    plgpu.barrier_wait(loaded.at[slot])
                    rhs = c_smem.at[slot, ci]
                    if p.layout == "vd":
                        rhs = rhs.transpose((1, 0))
                    lhs = e_smem.at[slot, pl.ds(r0, rows)] if split_n else e_smem.at[slot]
                    plgpu.wgmma(acc_ref, lhs, rhs)
                    for fn in work:  # CUDA-core work while the tensor cores run this step
                        state = fn(state)
                    # With ``lag`` the previous step's wgmma has now finished reading its slot.
                    plgpu.wgmma_wait(lag)
                    if lag:
                        @pl.when(k > 0)
                        def _():
                            plgpu.barrier_arrive(consumed.at[lax.rem(lt * kd + k - 1, S)])
                    else:
                        plgpu.barrier_arrive(consumed.at[slot])
                    return state

                peel = min(kd, len(chunks))
                state = None
                for k in range(peel):
                    state = k_step(k, state, chunks[k:k + 1] if k < peel - 1 else chunks[k:])
                lax.fori_loop(peel, kd, k_step, None)
                if lag:
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[lax.rem(lt * kd + kd - 1, S)])
                return acc_ref[...], state

            return pl.run_scoped(mm, plgpu.ACC((rows, bv), jnp.float32))

        def compute(w, emit):
            """Warpgroup ``w``'s statistics of every segment, handed to ``emit(row, slot, m, s, zt, zs)``."""
            if cw > 1:
                plgpu.set_max_registers(register_split(cw)[1], action="increase")
            r0, col0, ci = origin(w)
            cols = plgpu.broadcasted_iota(jnp.int32, (rows, bv), 1, layout=plgpu.Layout.WGMMA)

            def segment(q, row, first, end, slot, lt):
                t_rel = None
                if need_target:
                    t_slot = lax.rem(q, 2)
                    plgpu.barrier_wait(t_bar.at[t_slot])
                    t_rel = plgpu.load(t_smem.at[t_slot, pl.ds(r0, rows)], layout=ROW) - col0  # tile 0's columns
                    plgpu.barrier_arrive(t_consumed.at[t_slot])

                def head(z, j, stats, masked: bool):
                    """Everything of tile ``j``'s epilogue before the exps: bias, softcap, the target logit, the
                    sum of logits, the column mask, the row max and the rescaled sum. Returns ``(z, stats,
                    shift)``, ``shift`` None when no exps follow (debug "matmul_only")."""
                    m, s, zt, zs = stats
                    if p.has_bias:
                        b_slot = lax.rem(lt + j - first, 2)
                        plgpu.barrier_wait(b_bar.at[b_slot])
                        b = plgpu.load(b_smem.at[b_slot, ci], layout=COL).astype(jnp.float32)
                        plgpu.barrier_arrive(b_consumed.at[b_slot])
                        z = z + lax.broadcast_in_dim(b, z.shape, [1])
                    z = softcap(z, p.softcap)
                    valid = cols < (p.v - col0 - j * W) if masked else None
                    if debug == "matmul_only":
                        z = jnp.where(valid, z, -jnp.inf) if masked else z
                        return z, (jnp.maximum(m, z.max(axis=1)), s, zt, zs), None
                    if need_target:
                        hit = cols == lax.broadcast_in_dim(t_rel - j * W, z.shape, [0])
                        if masked:
                            hit = hit & valid
                        zt = zt + jnp.where(hit, z, 0.0).sum(axis=1)
                    if need_sum:
                        zs = zs + (jnp.where(valid, z, 0.0) if masked else z).sum(axis=1)
                    if masked:
                        z = jnp.where(valid, z, -jnp.inf)
                    z_max = z.max(axis=1)
                    if store:
                        store_tile(row, j, w, z, z_max)
                    m, s, shift = online_rescale(m, s, z_max)
                    return z, (m, s, zt, zs), shift

                def epilogue(z, j, stats, masked: bool):
                    z, stats, shift = head(z, j, stats, masked)
                    if shift is None:
                        return stats
                    m, s, zt, zs = stats
                    return m, s + exp_sum(z, shift), zt, zs

                def fill(x):
                    return plgpu.layout_cast(jnp.full((rows,), x, jnp.float32), ROW)

                stats = (fill(-jnp.inf), fill(0.0), fill(0.0), fill(0.0))
                if cfg.overlap_epilogue:
                    stats = overlapped_tiles(w, lt, first, end, stats, head, epilogue)
                else:
                    def v_step(j, stats, masked: bool):
                        z, _ = logits_tile(lt + j - first, w)
                        return epilogue(z, j, stats, masked)

                    stats = lax.fori_loop(first, jnp.minimum(end, n_full), functools.partial(v_step, masked=False),
                                          stats)
                    stats = lax.fori_loop(jnp.maximum(first, n_full), end, functools.partial(v_step, masked=True),
                                          stats)
                emit(row, slot, *stats)
                return lt + end - first

            segments(segment)
            if store:
                plgpu.wait_smem_to_gmem(0)

        def overlapped_tiles(w, lt, first, end, stats, head, epilogue):
            """A segment's tiles with each epilogue run during the next tile's matmul (module docstring,
            "Overlapped epilogue"): the head of tile ``j - 1`` during step 0 of tile ``j``, then its exps in
            slices of ``EXP_SLICE`` columns, one slice per step. Only the segment's last tile can reach past V;
            its epilogue follows the loop, masked or not."""
            slices = [(a, min(a + EXP_SLICE, bv)) for a in range(0, bv, EXP_SLICE)]

            def tile_step(j, carry):
                z_prev, stats = carry

                def start(_):
                    return head(z_prev, j - 1, stats, False)

                def exps(a, b):
                    def fn(state):
                        z, (m, s, zt, zs), shift = state
                        if shift is not None:
                            s = s + exp_sum(z[:, a:b], shift)
                        return z, (m, s, zt, zs), shift
                    return fn

                z, (_, stats, _) = logits_tile(lt + j - first, w, [start] + [exps(a, b) for a, b in slices])
                return z, stats

            z_first, _ = logits_tile(lt, w)
            z_last, stats = lax.fori_loop(first + 1, end, tile_step, (z_first, stats))

            def last(masked: bool):
                return lambda _, stats: epilogue(z_last, end - 1, stats, masked)

            ragged = (end - 1 >= n_full).astype(jnp.int32)
            stats = lax.fori_loop(0, 1 - ragged, last(False), stats)
            return lax.fori_loop(0, ragged, last(True), stats)

        def store_tile(row, j, w, z, z_max):
            """The tile relative to its row maxima (input precision) and the maxima, through SMEM and TMA; the
            previous tile's copies must have finished reading this warpgroup's buffers first."""
            r0, col0, ci = origin(w)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            shift = jnp.where(z_max == -jnp.inf, 0.0, z_max)
            z_smem.at[w][...] = (z - lax.broadcast_in_dim(shift, z.shape, [0])).astype(dtype)
            m_smem.at[w][...] = z_max
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(z_smem.at[w], z_ref.at[pl.ds(row * bn + r0, rows), pl.ds(j * W + col0, bv)])
            plgpu.copy_smem_to_gmem(m_smem.at[w], m_ref.at[j * nc + ci, pl.ds(row * bn + r0, rows)])

        def write(row, slot, w, m, s, zt, zs):
            """One row block's (``wg_split="n"``: one warpgroup's rows') statistics into its output slot."""
            r0, _, _ = origin(w)
            buf = out_smem.at[w if split_n else 0]
            values = [final_stat(m, s)] + [zt] * need_target + [zs] * need_sum
            for i, x in enumerate(values):
                buf.at[i][...] = x
            plgpu.commit_smem()
            for i, ref in enumerate(out_refs):
                plgpu.copy_smem_to_gmem(buf.at[i], ref.at[slot, pl.ds(row * bn + r0, rows)])
            plgpu.wait_smem_to_gmem(0)

        def hand_over(row, slot, m, s, zt, zs):
            for i, x in enumerate((m, s, zt, zs)):
                stat_smem.at[wg, i][...] = x
            plgpu.barrier_arrive(merge_bar.at[0])
            plgpu.barrier_wait(merge_free.at[0])  # warpgroup 0 has read them: the next segment may overwrite

        def merge_and_write(row, slot, m, s, zt, zs):
            plgpu.barrier_wait(merge_bar.at[0])
            for other in range(1, cw):
                m1, s1, zt1, zs1 = (plgpu.load(stat_smem.at[other, i], layout=ROW) for i in range(4))
                m, s = merge_stats(m, s, m1, s1)
                zt, zs = zt + zt1, zs + zs1
            plgpu.barrier_arrive(merge_free.at[0])
            write(row, slot, 0, m, s, zt, zs)

        def emit(w, row, slot, m, s, zt, zs):
            if not merge:
                write(row, slot, w, m, s, zt, zs)
                return

            @pl.when(wg > 0)
            def _():
                hand_over(row, slot, m, s, zt, zs)

            @pl.when(wg == 0)
            def _():
                merge_and_write(row, slot, m, s, zt, zs)

        @pl.when(wg < cw)
        def _compute_wg():
            w = wg if cw > 1 else 0
            compute(w, functools.partial(emit, w))

    run_scoped(body, scratch)


def run_scoped(body, scratch: dict):
    """``pl.run_scoped`` over the scratch dict (collective over the warpgroups), passing None for the entries a
    problem does not need."""
    names = list(scratch)
    present = {k: v for k, v in scratch.items() if v is not None}

    def inner(**refs):
        body(*(refs.get(k) for k in names))

    pl.run_scoped(inner, **present, collective_axes="wg")


def register_split(compute_wgs: int) -> tuple[int, int]:
    """Registers per thread of the memory warpgroup and of each compute warpgroup (``setmaxnreg``; the SM's
    65536 shared by ``(compute_wgs + 1) * 128`` threads, multiples of 8): the producer only issues copies."""
    return {1: (40, 232), 2: (40, 232), 3: (24, 160)}[compute_wgs]


# Threads of XLA's CPU pool the Mosaic GPU interpreter needs: the launch, and the two compute warpgroups and the
# memory warpgroup of each CTA in a cluster of two (run together) can each block one while they wait on a barrier.
INTERPRETER_THREADS = 8


def cpu_pool_threads() -> int:
    """Threads of XLA's CPU pool: ``PJRT_NPROC`` when set, else one per core."""
    try:
        return int(os.environ["PJRT_NPROC"])
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def interpret_params(interpret, needed: int = INTERPRETER_THREADS):
    """``plgpu.kernel``'s ``interpret`` argument from ours: True (the interpreter's defaults), False / None
    (compiled) or the interpreter's parameters as given. Warns when XLA's CPU pool has fewer than ``needed``
    threads (at least :data:`INTERPRETER_THREADS`), as the interpreter can then deadlock (README, Development)."""
    if interpret is False or interpret is None:
        return None
    threads, needed = cpu_pool_threads(), max(needed, INTERPRETER_THREADS)
    if threads < needed:
        warnings.warn(
            f"the Mosaic GPU interpreter can deadlock with {threads} threads in XLA's CPU pool: set "
            f"PJRT_NPROC={needed} (or more) in the environment before JAX starts", RuntimeWarning,
            stacklevel=3)
    return plgpu.InterpretGPUParams() if interpret is True else interpret


DEBUG_MODES = (None, "row_max", "matmul_only")
H200_SMS = 132
# Temporary memory of the partial outputs that XLA merges (per output; at least two slots per row block).
MERGE_BYTES = 2**20


def device_sms() -> int:
    """CTAs of one wave: the GPU's SMs (one CTA each: the kernel's shared memory), or an H200's 132 without a
    GPU (lowering for an abstract H200, the interpreter)."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or H200_SMS) if dev.platform == "gpu" else H200_SMS


def make_schedule(p: Problem, cfg: MosaicForwardConfig) -> schedule.Schedule:
    """The persistent grid's work assignment (:mod:`pallas_kernels.mosaic_schedule`) for this problem: its rows
    are the clusters' units of ``cfg.cluster`` row blocks, its CTAs the clusters."""
    units = cdiv(p.n, unit_rows(cfg))
    max_slots = max(2, MERGE_BYTES // (units * unit_rows(cfg) * 4))
    return schedule.make(units, cdiv(p.v, cfg.tile_v), (cfg.ctas or device_sms()) // cfg.cluster, max_slots)


def unit_rows(cfg: MosaicForwardConfig) -> int:
    """Tokens of one schedule unit: the row blocks of one cluster."""
    return cfg.block_n * cfg.cluster


def run_kernel(e, c, bias, targets, *, p: Problem, cfg: MosaicForwardConfig, need_sum: bool, interpret, debug,
               store: bool):
    """The kernel's outputs: ``(schedule, lse, zt, zs)`` with (slots, N_pad) partials (``zt`` None with
    ``cfg.target_gather``, ``zs`` None unless ``need_sum``), plus with ``store`` the logits buffer
    (N, cdiv(V, W) * W) and the transposed tile maxima (cdiv(V, W) * compute_wgs, N)."""
    check_supported(e, c, p, cfg, store)
    if debug not in DEBUG_MODES:
        raise ValueError(f"debug={debug!r} must be one of {DEBUG_MODES}")
    if (bias is not None) != p.has_bias:
        raise ValueError("bias must be given exactly when p.has_bias")
    targets = targets.astype(jnp.int32)
    if p.n % 8:
        # TMA copies of e are tiled in 8-row groups over the whole array: pad e (only e, never c) to 8k rows.
        e = jnp.pad(e, ((0, 8 - p.n % 8), (0, 0)))
    sch = make_schedule(p, cfg)
    kernel = functools.partial(_kernel, p=p, cfg=cfg, sch=sch, need_sum=need_sum, store=store, dtype=e.dtype,
                               bias_dtype=None if bias is None else bias.dtype, debug=debug)
    need_target = not cfg.target_gather
    args = (e, c) + ((bias,) if p.has_bias else ()) + ((targets,) if need_target else ())
    # Whole row blocks only: a store into an (N,) array would be a bulk copy clamped to 4 * (N % block_n) bytes
    # for the last block, undefined unless a multiple of 16 (module docstring, "Output stores").
    out = jax.ShapeDtypeStruct((sch.slots, sch.row_blocks * unit_rows(cfg)), jnp.float32)
    out_type = [out] * (1 + need_target + need_sum)
    if store:
        out_type += [jax.ShapeDtypeStruct((p.n, sch.tiles * cfg.tile_v), e.dtype),
                     jax.ShapeDtypeStruct((sch.tiles * cfg.c_copies, p.n), jnp.float32)]
    f = plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        grid=(sch.grid,),
        grid_names=("cta",),
        **(dict(cluster=(cfg.cluster,), cluster_names=("cluster",)) if cfg.cluster > 1 else {}),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=cfg.approx_math),
        interpret=interpret_params(interpret, 1 + cfg.cluster * (cfg.compute_wgs + 1)),
        kernel_name="cce_logits_chunk_mosaic" if store else "cce_lse_forward_mosaic",
    )
    outs = list(f(*args))
    if not need_target:
        outs.insert(1, None)
    if not need_sum:
        outs.insert(2, None)
    return (sch, *outs)


def gathered_target_logits(e: jax.Array, c: jax.Array, bias: jax.Array | None, targets: jax.Array,
                           p: Problem) -> jax.Array:
    """(N,) float32 ``softcap(e[i] . c[t[i]] + bias[t[i]])``, 0 where the target is outside [0, V): the target
    logits from N gathered classifier rows (``cfg.target_gather``), products accumulated in float32."""
    ok = (targets >= 0) & (targets < p.v)
    t = jnp.where(ok, targets, 0)
    rows = jnp.take(c, t, axis=0 if p.layout == "vd" else 1)
    if p.layout == "dv":
        rows = rows.T
    z = jnp.einsum("nd,nd->n", e, rows, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias[t].astype(jnp.float32)
    return jnp.where(ok, softcap(z, p.softcap), 0.0)


def merge_outputs(sch: schedule.Schedule, lse, zt, zs, p: Problem, cfg: MosaicForwardConfig, operands,
                  debug=None):
    """(N,) ``(lse, target_logit, sum_logits)`` from the kernel's partials (``sum_logits`` zeros when None; the
    target logits from ``operands = (e, c, bias, targets)`` when the kernel left them out)."""
    lse, zt, zs = schedule.merge(sch, unit_rows(cfg), p.n, lse, zt, zs,
                                 row_max=debug in ("row_max", "matmul_only"))
    if zt is None:
        zt = gathered_target_logits(*operands, p)
    return lse, zt, jnp.zeros_like(lse) if zs is None else zs


@functools.partial(jax.jit, static_argnames=("p", "cfg", "need_sum", "interpret", "debug"))
def lse_forward_mosaic(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    p: Problem,
    cfg: MosaicForwardConfig,
    need_sum: bool,
    interpret=False,
    debug: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``(lse, target_logit, sum_logits)`` of ``softcap(e @ c^T + bias)``, all float32 (N,).

    ``e`` is (N, D), ``c`` (V, D) for ``p.layout == "vd"`` or (D, V) for ``"dv"``, bf16 or fp16 (one dtype);
    ``bias`` (V,) any float dtype or None (must match ``p.has_bias``); ``targets`` (N,) int32 local column ids,
    ``-1`` (or any id outside [0, V)) gives a target logit of 0. ``sum_logits`` is zeros unless ``need_sum``.
    ``interpret``: False (compiled, Hopper GPU), True (Mosaic GPU interpreter with default parameters) or a
    ``plgpu.InterpretGPUParams``. ``debug``: None (normal), ``"row_max"`` (first output is the row max of the
    logits instead of the lse) or ``"matmul_only"`` (the row max with the rest of the epilogue left out). See the
    module docstring for the grid, the block layout and the limits.
    """
    sch, lse, zt, zs = run_kernel(e, c, bias, targets, p=p, cfg=cfg, need_sum=need_sum, interpret=interpret,
                                  debug=debug, store=False)
    return merge_outputs(sch, lse, zt, zs, p, cfg, (e, c, bias, targets), debug)
