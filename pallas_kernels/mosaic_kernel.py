"""The Mosaic GPU forward kernel (Hopper, sm_90): TMA + wgmma, online max/sum epilogue.

Per token ``(lse, target_logit, sum_logits)`` of ``z = softcap(e @ c^T + bias)``, all float32 (N,), in one pass
over the vocabulary, never storing a logit. :func:`forward_kernel` is the kernel body;
:func:`pallas_kernels.mosaic_forward.run_kernel` launches it and
:func:`pallas_kernels.mosaic_forward.lse_forward_mosaic` is its public face (same contract as
:func:`pallas_kernels.lse_forward.lse_forward`).

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
  with ``wg_split="n"``): for each tile it accumulates its ``(block_n, block_v)`` float32 logits tile over D with
  wgmma (e from SMEM, c from SMEM, transposed view for "vd"), then folds the tile into its running statistics in
  registers (:mod:`pallas_kernels.online_softmax`, the flash-attention recurrence; the target logit is the
  column equal to the token's target; the sum of logits when ``need_sum``). Only the last tile (the one reaching
  past V) pays for the column mask.
- At the end of a segment warpgroups ``1..compute_wgs-1`` hand their statistics to warpgroup 0 through SMEM
  (``merge_stats``), which writes one float32 per token and output through SMEM and a bulk copy into the
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
targets' loads) and :func:`pallas_kernels.mosaic_forward.gathered_target_logits` computes it in XLA from ``N``
gathered classifier rows, the same float32-accumulated product of the same half-precision operands, plus bias
and softcap.

Output stores
-------------
Pallas lowers ``copy_smem_to_gmem`` with ``OOBFillMode.UNDEFINED``, and Mosaic GPU turns a contiguous,
unswizzled SMEM->GMEM copy such as our 1-D ``(block_n,)`` statistics rows into a plain
``cp.async.bulk.global.shared::cta`` whose byte count is clamped to the end of the destination array, and
``cp.async.bulk`` needs a multiple of 16 bytes. A store of the last, partial row block into an ``(N,)`` output
was undefined for ``N % 4 != 0`` (the first H200 run: those rows were never written; the Mosaic GPU interpreter
performs the partial store, so it hid the problem). Every store is a whole row block of a padded output.

Tile stores (``store=True`` of :func:`pallas_kernels.mosaic_forward.run_kernel`, used by
:mod:`pallas_kernels.mosaic_logits_chunk` for the three-pass path): each compute warpgroup also writes every logits
tile relative to its row maxima and the maxima themselves, through per-warpgroup SMEM buffers and TMA copies
(``stages`` shrinks to fit: :func:`pallas_kernels.mosaic_config.smem_bytes`).

Debug variants (``debug=`` of :func:`pallas_kernels.mosaic_forward.lse_forward_mosaic`, for
benchmarks/mosaic_gpu_check.py): ``"row_max"`` returns the running row max instead of the lse (softmax sum not
used), ``"matmul_only"`` the row max with the rest of the epilogue left out (the matmul's own time, to price the
epilogue by difference).

Edges: N, V and D need not be multiples of the tiles. TMA reads outside an array are zero-filled on Hopper (and
in the Mosaic GPU interpreter), so D padding contributes 0 to the products and padded rows are computed, written
into the padded outputs and sliced off; columns >= V are set to -inf before the max/sum and excluded from the
target and the sum of logits (the 1-D bias copy may leave stale SMEM past V, which the same mask hides).

Precision: bf16 and fp16 inputs only (products accumulate in float32 in wgmma). float32 inputs are rejected
(wgmma would run them as TF32): the dispatcher keeps the Triton kernel (IEEE products) for float32.

Shape rules (checked by ``check_supported`` / ``supports`` of :mod:`pallas_kernels.mosaic_config`; the dispatcher
uses Triton otherwise). Mosaic GPU describes a tiled TMA copy over the whole array, tiled like the swizzled SMEM
buffer wgmma reads, so:
- the minor dimension of each operand must be a multiple of the swizzle width: D % 16 == 0 (16-bit types;
  D % 64 == 0 gets the 128-byte swizzle, D % 32 the 64-byte one, else 32-byte), and for "dv" also V % 16 == 0;
- the major dimension must be a multiple of 8 rows: V % 8 == 0 for "vd" (50257 is not: pad the classifier once,
  outside the step, or use Triton); N % 8 != 0 is handled by padding e (only e) to the next multiple of 8 rows,
  a temporary copy of e;
- every dimension at least one tile: N >= block_n, D >= block_d, V >= compute_wgs * block_v.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_schedule as schedule
from pallas_kernels.mosaic_common import run_scoped
from pallas_kernels.mosaic_config import MosaicForwardConfig, cdiv, pick_swizzle, register_split, smem_transforms
from pallas_kernels.online_softmax import exp_sum, finish_lse, merge_stats, online_rescale, softcap
from pallas_kernels.tiles import Problem

# Columns per exp slice of an overlapped epilogue (one slice per pipeline step).
EXP_SLICE = 32


def forward_kernel(*refs, p: Problem, cfg: MosaicForwardConfig, sch: schedule.Schedule, need_sum: bool, store: bool,
                   dtype, bias_dtype, debug: str | None = None):
    """The kernel body (module docstring): ``refs`` are the operands (e, c, then bias and targets where used), the
    outputs (lse, then target logit and sum of logits where used, then with ``store`` the logits buffer and the
    tile maxima) of :func:`pallas_kernels.mosaic_forward.run_kernel`'s ``plgpu.kernel`` call."""
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
