"""Tiling of the Mosaic GPU forward (:mod:`pallas_kernels.mosaic_kernel`) and the rules a problem must meet.

:class:`MosaicForwardConfig` says how a CTA tile is cut (rows, columns, hidden-size slices, pipeline stages,
warpgroups, clusters) and which epilogue variants run; :func:`check_supported` / :func:`supports` apply the
rules of the TMA copies (swizzled, tiled SMEM buffers that wgmma reads), of shared memory and of tile sizes
that the kernel's docstring explains, so that the dispatcher can fall back to Triton before tracing a kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.tiles import Problem

# Entries of one warpgroup's tile with overlap_epilogue: two float32 tiles of 64 registers per thread each.
OVERLAP_TILE = 64 * 128


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
    """Tiling of :func:`pallas_kernels.mosaic_forward.lse_forward_mosaic` ("kernel docstring": the module docstring
    of :mod:`pallas_kernels.mosaic_kernel`).

    Attributes:
      block_n: tokens per CTA (a multiple of 64: wgmma's M).
      block_v: vocabulary columns per compute warpgroup and tile (a multiple of 64, at most 256: wgmma's N).
      block_d: hidden-size slice per pipeline step (64 for 16-bit types gives 128-byte rows, the widest swizzle).
      stages: SMEM ring depth of the TMA pipeline (max concurrent steps).
      compute_wgs: compute warpgroups per CTA (1, 2 or 3), each with its own block_v columns of the CTA tile (or
        rows: ``wg_split``). With 3 each gets 160 registers per thread (:func:`register_split`), but ptxas
        compiles for 128, so then block_v <= 128 and no ``overlap_epilogue``.
      ctas: CTAs of the persistent grid (:mod:`pallas_kernels.mosaic_schedule`); None: one per SM of the GPU
        (132 without a GPU), a single wave.
      cluster: CTAs per cluster (1 or 2). With 2, the CTAs of a cluster take adjacent row blocks over the same
        vocabulary tiles, and each classifier tile is read from L2 once per cluster, half by each CTA and
        multicast into both (kernel docstring, "Clusters"); ``ctas`` is then rounded down to a multiple of 2.
      approx_math: approximate exp/log/tanh (MUFU); exp2/log stay accurate to ~1e-6 relative, tanh to ~1e-3.
      target_gather: take the target logit from a gathered product in XLA (``e[i] . c[t[i]]``, N x D work and
        N x D of gathered classifier rows) instead of the epilogue's column compare, which costs three of the
        epilogue's per-logit instructions (kernel docstring, "Target logit").
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
        64 rows (kernel docstring, "Warpgroup split").
      overlap_epilogue: run each tile's epilogue during the next tile's matmul (kernel docstring, "Overlapped
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
        if self.compute_wgs == 3 and (self.block_v > 128 or self.overlap_epilogue):
            # ptxas compiles a kernel of 4 warpgroups for 128 registers per thread whatever setmaxnreg grants
            # later: one m64n256 wgmma's accumulator alone takes 128 (on an H200 ptxas asked for 154).
            raise ValueError(f"compute_wgs=3 needs block_v <= 128 and no overlap_epilogue (128 registers per "
                             f"thread at compile time), got block_v={self.block_v}, "
                             f"overlap_epilogue={self.overlap_epilogue}")
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


def register_split(compute_wgs: int) -> tuple[int, int]:
    """Registers per thread of the memory warpgroup and of each compute warpgroup (``setmaxnreg``; the SM's
    65536 shared by ``(compute_wgs + 1) * 128`` threads, multiples of 8): the producer only issues copies."""
    return {1: (40, 232), 2: (40, 232), 3: (24, 160)}[compute_wgs]


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
