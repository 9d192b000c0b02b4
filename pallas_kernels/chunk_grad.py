"""The logit gradient of a token chunk, formed in place over the buffer :mod:`pallas_kernels.logits_chunk` wrote.

The three-pass training path (``cce_jax.three_pass``) keeps a chunk's logits as ``x`` (R, W) in half precision,
each (row, ``tile``-column) block stored relative to its row maximum ``m`` (R, W / tile). With the chunk's lse
and the loss coefficients ``(a, b, s, q)`` of every row, the gradient of the loss with respect to the logits is

    G = ((a + 2 q lse) p + s) cap' + b [v == t] cap',     p = exp(x + m - lse),

and this kernel overwrites ``x`` with ``G`` (same dtype; ``input_output_aliases``), so the chunk never holds a
second (R, W) buffer. Columns ``>= V`` get exactly 0.

Grid ``(cdiv(R, block_n), W / tile)``: program ``(i, j)`` owns rows ``[i * block_n, (i + 1) * block_n)`` and
the j-th ``tile`` columns, whose maxima are the column ``m[:, j]``. With ``col_sums`` it also writes the float32
column sums of its block of G into row ``i`` of a (cdiv(R, block_n), W) array (XLA sums them in a fixed order:
the bias gradient, deterministic).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tiles


@dataclasses.dataclass(frozen=True)
class ChunkGradConfig:
    """``block_n`` rows per program (a power of two); the columns per program are the buffer's ``tile``."""

    block_n: int = 32
    num_warps: int = 4


def _kernel(x_ref, m_ref, lse_ref, t_ref, a_ref, b_ref, s_ref, q_ref, g_ref, *col_ref, v: int, tile: int,
            block_n: int, softcap: float | None, need_sum: bool):
    del x_ref  # aliased with g_ref
    rows = g_ref.shape[0]
    i, j = pl.program_id(0), pl.program_id(1)
    r0, v0 = i * block_n, j * tile
    rmask = tiles.in_bounds(r0, block_n, rows, rows % block_n == 0)
    vmask = tiles.in_bounds(v0, tile, v, False)
    row = lambda ref, other=0: tiles.load_1d(ref, r0, block_n, rmask, other)  # noqa: E731

    lse = row(lse_ref)
    m = tiles.load_2d(m_ref, r0, block_n, rmask, j, 1, None)[:, 0]
    x = tiles.load_2d(g_ref, r0, block_n, rmask, v0, tile, None).astype(jnp.float32)
    rel = x + (m - lse)[:, None]
    p = jnp.exp(rel)
    a, b, q = row(a_ref), row(b_ref), row(q_ref)
    cols = v0 + jnp.arange(tile)
    g = (a + 2.0 * q * lse)[:, None] * p + jnp.where(cols[None, :] == row(t_ref, -1)[:, None], b[:, None], 0.0)
    if need_sum:
        g = g + row(s_ref)[:, None]
    if softcap is not None:
        g = g * tiles.softcap_grad(rel + lse[:, None], softcap)
    g = jnp.where(vmask[None, :], g, 0.0)
    if rmask is not None:
        g = jnp.where(rmask[:, None], g, 0.0)
    tiles.store_2d(g_ref, r0, block_n, rmask, v0, tile, None, g.astype(g_ref.dtype))
    if col_ref:
        tiles.store_2d(col_ref[0], i, 1, None, v0, tile, None, g.sum(axis=0)[None, :])


@functools.partial(jax.jit, static_argnames=("v", "tile", "softcap", "need_sum", "col_sums", "cfg", "interpret"),
                   donate_argnums=(0,))
def chunk_grad(x, m, lse, targets, a, b, s, q, *, v: int, tile: int, softcap: float | None, need_sum: bool,
               col_sums: bool, cfg: ChunkGradConfig = ChunkGradConfig(), interpret: bool = False):
    """``(G, column sums of G or None)`` from the chunk buffer ``x`` (donated: G is written over it).

    ``x`` (R, W) half precision with W a multiple of ``tile``; ``m`` (R, W / tile) float32; ``lse``, ``a``,
    ``b``, ``s``, ``q`` (R,) float32; ``targets`` (R,) int32 (-1: none); ``v`` the true vocabulary size (columns
    past it are padding). The column sums are float32 (W,).
    """
    rows, width = x.shape
    if width % tile or m.shape != (rows, width // tile):
        raise ValueError(f"chunk_grad: buffer {x.shape} and maxima {m.shape} do not match tile {tile}")
    grid = (tiles.cdiv(rows, cfg.block_n), width // tile)
    out = [tiles.out_struct(x.shape, x.dtype, x, m)]
    if col_sums:
        out.append(tiles.out_struct((grid[0], width), jnp.float32, x, m))
    kernel = functools.partial(_kernel, v=v, tile=tile, block_n=cfg.block_n, softcap=softcap, need_sum=need_sum)
    res = pl.pallas_call(
        kernel,
        out_shape=tuple(out),
        grid=grid,
        input_output_aliases={0: 0},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="cce_chunk_grad",
    )(x, m, lse, targets.astype(jnp.int32), a, b, s, q)
    g = res[0]
    return g, (res[1].sum(axis=0) if col_sums else None)
