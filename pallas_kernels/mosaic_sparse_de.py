"""Block-sparse dE product of the three-pass path on Pallas' Mosaic GPU backend (Hopper, sm_90): TMA + wgmma.

``out = G @ c`` over the live tiles of G only, in float32: ``G`` (R, W) is a token chunk's logit gradient in the
input's precision (zero past V), ``c`` the classifier, (V, D) for layout "vd" or (D, V) for "dv". A tile is
``block_n`` rows by ``tile_v`` columns of G; ``lists`` says, per row block, how many tiles are live and which,
in ascending order (:func:`live_lists`). Rows whose block has no live tile come out 0. The contract is that of
:func:`pallas_kernels.backward.accumulate_de` into zeros, so the three-pass path uses either kernel.

Grid and block layout
---------------------
- Grid ``(R / block_n, cdiv(D, compute_wgs * block_out))`` of CTAs. CTA ``(i, k)`` owns rows
  ``[i * block_n, (i + 1) * block_n)`` of the output and hidden columns ``[k * U, (k + 1) * U)``,
  ``U = compute_wgs * block_out``; compute warpgroup ``w`` owns the ``block_out`` columns ``w`` of those.
- Each CTA runs ``compute_wgs + 1`` warpgroups. All of them first read the row block's list into SMEM (one TMA
  copy, one barrier). The memory warpgroup then streams, for each live tile and each ``block_k`` slice of its
  columns (``tile_v / block_k`` pipeline steps per tile), the ``(block_n, block_k)`` slice of G and one
  ``(block_k, block_out)`` (layout "vd") or ``(block_out, block_k)`` ("dv") slice of c per compute warpgroup into
  a ring of ``stages`` SMEM slots (one "loaded" barrier per slot, one "consumed" barrier per slot on which every
  compute warpgroup arrives once its wgmma has read the slot).
- Compute warpgroup ``w`` accumulates its ``(block_n, block_out)`` float32 tile with wgmma over the live steps,
  then stores it through SMEM with a TMA copy (clipped at D). The steps are data-dependent, so the work of a CTA
  is proportional to its row block's live tiles: a dead tile costs neither memory traffic nor tensor-core time.

Deterministic: each output element has one owner, which sums its tiles in the list's (ascending) order.

Speed (one H200, benchmarks/results.md): 7% slower to 8% faster than the Triton kernel at 5-52% live tiles and
1.1-1.3x faster near 100%, but half as fast as XLA's dense product there: every 64-row block re-reads its live
tiles' rows of c (16-26 row blocks per chunk at the benchmark shapes), so the kernel is bound by those reads,
not by the tensor cores.

Shape rules (:func:`check_supported`; the caller uses the Triton kernel otherwise): bf16/fp16 G and c of one
dtype; R a multiple of ``block_n``; W a multiple of ``tile_v`` and ``tile_v`` of ``block_k``; the TMA rules of
:mod:`pallas_kernels.mosaic_kernel` for c (D % 16 == 0, and V % 8 == 0 for "vd" / V % 16 == 0 for "dv").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import backward
from pallas_kernels.mosaic_common import interpret_params, run_scoped
from pallas_kernels.mosaic_config import SMEM_BYTES, cdiv, smem_transforms, widest_swizzle

LIST_ALIGN = 4  # int32 entries: a row of ``lists`` is a whole number of 16-byte TMA units


@dataclasses.dataclass(frozen=True)
class MosaicSparseDeConfig:
    """Tiling of :func:`sparse_de_mosaic`.

    Attributes:
      block_n: rows of G per CTA, the filter tile's rows (64: one wgmma M per warpgroup).
      block_k: G columns (reduction slice) per pipeline step (64 for 16-bit types: 128-byte rows).
      block_out: hidden columns per compute warpgroup (a multiple of 64, at most 256: wgmma's N).
      stages: SMEM ring depth.
      compute_wgs: compute warpgroups per CTA (1 or 2), each with its own block_out columns.
    """

    block_n: int = 64
    block_k: int = 64
    block_out: int = 128
    stages: int = 3
    compute_wgs: int = 2

    def __post_init__(self):
        if self.block_n % 64 or self.block_n <= 0:
            raise ValueError(f"block_n={self.block_n} must be a positive multiple of 64")
        if self.block_k % 16 or self.block_k <= 0:
            raise ValueError(f"block_k={self.block_k} must be a positive multiple of 16")
        if self.block_out % 64 or not 64 <= self.block_out <= 256:
            raise ValueError(f"block_out={self.block_out} must be 64, 128, 192 or 256")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be at least 2")
        if self.compute_wgs not in (1, 2):
            raise ValueError(f"compute_wgs={self.compute_wgs} must be 1 or 2")


def list_width(num_tiles: int) -> int:
    """Entries per row of ``lists``: the count, then ``num_tiles`` tile ids, padded to whole TMA units."""
    return -(-(num_tiles + 1) // LIST_ALIGN) * LIST_ALIGN


def live_lists(live: jax.Array) -> jax.Array:
    """``(row blocks, list_width(T))`` int32 from the (row blocks, T) live flags: per row block the number of
    live tiles, then their column indices in ascending order (a stable sort: a fixed order), then padding."""
    rows, num = live.shape
    cols, count, _, _ = backward.live_lists(live)  # the Triton product's per-row lists (XLA drops the rest)
    pad = list_width(num) - num - 1
    return jnp.concatenate([count[:, None], cols, jnp.zeros((rows, pad), jnp.int32)], axis=1)


def operand_swizzle(w: int, v: int, d: int, layout: str, cfg: MosaicSparseDeConfig, dtype) -> int:
    """The SMEM swizzle shared by the G and c slices (0: none fits): G's W columns and the slice widths, and
    c's minor dimension (D for "vd", V for "dv")."""
    isz = jnp.dtype(dtype).itemsize
    minors = [w, cfg.block_k] + ([d, cfg.block_out] if layout == "vd" else [v])
    return widest_swizzle([x * isz for x in minors])


def smem_bytes(cfg: MosaicSparseDeConfig, dtype, list_len: int) -> int:
    isz = jnp.dtype(dtype).itemsize
    ring = cfg.stages * (cfg.block_n + cfg.compute_wgs * cfg.block_out) * cfg.block_k * isz
    out = cfg.compute_wgs * cfg.block_n * cfg.block_out * 4
    return ring + out + 4 * list_len + 1024


def check_supported(g, c, lists, layout: str, tile_v: int, cfg: MosaicSparseDeConfig) -> None:
    """Raises NotImplementedError when the kernel cannot run these arrays (the caller uses Triton)."""
    if g.dtype not in (jnp.bfloat16, jnp.float16) or c.dtype != g.dtype:
        raise NotImplementedError(f"the Mosaic dE product needs bf16/fp16 G and c of one dtype, got {g.dtype}, "
                                  f"{c.dtype}")
    if layout not in ("vd", "dv"):
        raise ValueError(f"unknown layout {layout!r}")
    r, w = g.shape
    v, d = c.shape if layout == "vd" else c.shape[::-1]
    if r % cfg.block_n or w % tile_v or tile_v % cfg.block_k:
        raise NotImplementedError(f"G {g.shape} needs whole row blocks of {cfg.block_n} and tiles of {tile_v} "
                                  f"columns, and tile_v a multiple of block_k={cfg.block_k}")
    if lists.shape != (r // cfg.block_n, list_width(w // tile_v)) or lists.dtype != jnp.int32:
        raise ValueError(f"lists must be int32 {(r // cfg.block_n, list_width(w // tile_v))} (live_lists), got "
                         f"{lists.dtype} {lists.shape}")
    if not operand_swizzle(w, v, d, layout, cfg, g.dtype):
        raise NotImplementedError(f"D={d} (and V={v} for 'dv') must be multiples of 16 elements for a swizzled "
                                  "TMA copy")
    if layout == "vd" and v % 8:
        raise NotImplementedError(f"layout 'vd' needs V % 8 == 0 (TMA tiles of 8 rows), got V={v}")
    if d < cfg.block_out or v < cfg.block_k:
        raise NotImplementedError(f"c smaller than one tile: D={d} < {cfg.block_out} or V={v} < {cfg.block_k}")
    if smem_bytes(cfg, g.dtype, lists.shape[1]) > SMEM_BYTES:
        raise NotImplementedError(f"config {cfg} needs {smem_bytes(cfg, g.dtype, lists.shape[1])} bytes of "
                                  f"shared memory per CTA, more than {SMEM_BYTES}")


def supports(g, c, lists, layout: str, tile_v: int, cfg: MosaicSparseDeConfig) -> bool:
    try:
        check_supported(g, c, lists, layout, tile_v, cfg)
    except NotImplementedError:
        return False
    return True


def _kernel(g_ref, l_ref, c_ref, o_ref, *, layout: str, tile_v: int, list_len: int, cfg: MosaicSparseDeConfig,
            dtype):
    bn, bk, bo, S, cw = cfg.block_n, cfg.block_k, cfg.block_out, cfg.stages, cfg.compute_wgs
    ks = tile_v // bk  # pipeline steps per live tile
    v, d = c_ref.shape if layout == "vd" else c_ref.shape[::-1]
    transforms = smem_transforms(operand_swizzle(g_ref.shape[1], v, d, layout, cfg, dtype), dtype)
    out_swizzle = widest_swizzle([d * 4, bo * 4])  # float32 output: at least 64 bytes since D % 16 == 0
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // 4)), plgpu.SwizzleTransform(out_swizzle))
    c_tile = (bk, bo) if layout == "vd" else (bo, bk)
    scratch = dict(
        l_smem=plgpu.SMEM((list_len,), jnp.int32),
        g_smem=plgpu.SMEM((S, bn, bk), dtype, transforms=transforms),
        c_smem=plgpu.SMEM((S, cw, *c_tile), dtype, transforms=transforms),
        o_smem=plgpu.SMEM((cw, bn, bo), jnp.float32, transforms=out_transforms),
        l_bar=plgpu.Barrier(num_barriers=1),
        loaded=plgpu.Barrier(num_arrivals=1 + cw, num_barriers=S),
        consumed=plgpu.Barrier(num_arrivals=cw, num_barriers=S),
    )

    def body(l_smem, g_smem, c_smem, o_smem, l_bar, loaded, consumed):
        wg = lax.axis_index("wg")
        i = lax.axis_index("n")
        d0 = lax.axis_index("d") * (cw * bo)

        # Every warpgroup needs the list's count; the memory warpgroup issues the copy. ``l_ref`` is the flat
        # lists and a row is in bounds by construction, so it is one plain bulk copy (a tiled TMA copy is limited
        # to 256 entries per dimension; a vocabulary of 256000 has 2000 tiles).
        @pl.when(wg == cw)
        def _():
            plgpu.copy_gmem_to_smem(l_ref.at[pl.ds(i * list_len, list_len)], l_smem, l_bar.at[0],
                                    oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

        plgpu.barrier_wait(l_bar.at[0])
        steps = l_smem[0] * ks

        @pl.when(wg == cw)
        def _memory_wg():
            if cw > 1:
                plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, steps)
            def _issue(step):
                slot = lax.rem(step, S)

                @pl.when(step >= S)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                col = l_smem[1 + lax.div(step, ks)] * tile_v + lax.rem(step, ks) * bk
                plgpu.copy_gmem_to_smem(g_ref.at[pl.ds(i * bn, bn), pl.ds(col, bk)], g_smem.at[slot],
                                        loaded.at[slot])
                for w in range(cw):
                    if layout == "vd":
                        src = c_ref.at[pl.ds(col, bk), pl.ds(d0 + w * bo, bo)]
                    else:
                        src = c_ref.at[pl.ds(d0 + w * bo, bo), pl.ds(col, bk)]
                    plgpu.copy_gmem_to_smem(src, c_smem.at[slot, w], loaded.at[slot])

            # Drain: observe the last completion of every slot this warpgroup waited on or would reuse.
            @pl.loop(jnp.maximum(steps - S, 0), steps)
            def _drain(step):
                plgpu.barrier_wait(consumed.at[lax.rem(step, S)])

        def compute(w):
            if cw > 1:
                plgpu.set_max_registers(232, action="increase")

            def mm(acc_ref):
                def k_step(step, carry):
                    slot = lax.rem(step, S)
                    plgpu.barrier_wait(loaded.at[slot])
                    rhs = c_smem.at[slot, w]
                    if layout == "dv":
                        rhs = rhs.transpose((1, 0))
                    plgpu.wgmma(acc_ref, g_smem.at[slot], rhs)
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return carry

                lax.fori_loop(0, steps, k_step, None)
                return acc_ref[...]

            acc = pl.run_scoped(mm, plgpu.ACC((bn, bo), jnp.float32))
            o_smem.at[w][...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[w], o_ref.at[pl.ds(i * bn, bn), pl.ds(d0 + w * bo, bo)])
            plgpu.wait_smem_to_gmem(0)

        if cw == 1:
            pl.when(wg == 0)(lambda: compute(0))
        else:
            @pl.when(wg < cw)
            def _compute_wg():
                compute(wg)

    run_scoped(body, scratch)


@functools.partial(jax.jit, static_argnames=("layout", "tile_v", "cfg", "interpret"))
def sparse_de_mosaic(g: jax.Array, lists: jax.Array, c: jax.Array, *, layout: str, tile_v: int,
                     cfg: MosaicSparseDeConfig, interpret=False) -> jax.Array:
    """float32 (R, D) ``G @ c`` over the live tiles of ``g``; ``lists`` from :func:`live_lists` of the (R /
    block_n, W / tile_v) live flags. ``interpret``: False (compiled, Hopper GPU), True (the Mosaic GPU
    interpreter) or a ``plgpu.InterpretGPUParams``. See the module docstring for the grid and the limits."""
    check_supported(g, c, lists, layout, tile_v, cfg)
    d = c.shape[1] if layout == "vd" else c.shape[0]
    kernel = functools.partial(_kernel, layout=layout, tile_v=tile_v, list_len=lists.shape[1], cfg=cfg,
                               dtype=g.dtype)
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((g.shape[0], d), jnp.float32),
        grid=(g.shape[0] // cfg.block_n, cdiv(d, cfg.compute_wgs * cfg.block_out)),
        grid_names=("n", "d"),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        interpret=interpret_params(interpret),
        kernel_name="cce_sparse_de_mosaic",
    )
    return f(g, lists.reshape(-1), c)
