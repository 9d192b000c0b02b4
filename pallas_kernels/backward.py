"""Backward kernels: the logit gradient of one vocabulary chunk, then block-sparse dE and dC products.

The backward walks the vocabulary in chunks of ``chunk_v`` columns (a loop in the caller). For each chunk:

1. :func:`logit_grad` recomputes the logits of every (block_n, block_v) tile of the chunk and writes
   ``G = ((g_lse * softmax + g_sum) * cap' + g_target * onehot * cap')`` into a (N, chunk_v) buffer, plus one
   flag per tile saying whether the tile survives gradient filtering (some ``|softmax - onehot| >= eps``).
2. :func:`accumulate_de` adds ``G @ c_chunk`` into dE. Grid ``(cdiv(N, block_n), cdiv(D, block_dout))``;
   program (i, k) owns rows i and hidden columns k of dE, so its read-modify-write needs no atomics.
3. :func:`write_dc` writes ``G^T @ e`` for the chunk's rows of dC (and their dbias). Grid
   ``(chunk_v / block_vout, cdiv(D, block_dout))``; program (j, k) owns classifier rows j, hidden columns k.

The products visit only live tiles: :func:`live_lists` turns the flags into, per tile row (dE) and per tile
column (dC), the ascending list of live tiles and its length, so a program's loop runs over live tiles only
and never waits on a flag. Every output element has exactly one owner and tiles are summed in a fixed order,
so gradients are bit-identical from run to run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tiles
from pallas_kernels.tiles import Problem


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the backward kernels. ``block_n`` x ``block_v`` is also the filtering granularity.

    Attributes:
      block_n, block_v, block_d: logits tile and its reduction slice in :func:`logit_grad`.
      block_dout: width of the dE / dC output tiles owned by one program of the products.
      block_vout: classifier rows owned by one program of :func:`write_dc` (divides block_v; None means
        block_v), so the dC accumulator stays small when the gradient tiles are wide.
      chunk_v: vocabulary columns per chunk (a multiple of block_v); the (N, chunk_v) gradient buffer is the
        backward's main temporary.
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    block_dout: int = 128
    block_vout: int | None = None
    chunk_v: int = 8192
    grad_warps: int = 4
    grad_stages: int = 3
    product_warps: int = 4
    product_stages: int = 3

    @property
    def vout(self) -> int:
        return self.block_vout or self.block_v


def _params(warps, stages):
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------------------------------
# 1. Logit gradient of one chunk.


def _logit_grad_kernel(vs_ref, e_ref, c_ref, b_ref, t_ref, lse_ref, gl_ref, gt_ref, gs_ref, g_ref, live_ref,
                       *, p: Problem, cfg: BackwardConfig, need_sum: bool, filter_eps: float | None,
                       store_all: bool):
    bn, bv = cfg.block_n, cfg.block_v
    i, j = pl.program_id(0), pl.program_id(1)
    n0, v0 = i * bn, vs_ref[0] + j * bv
    nmask = tiles.in_bounds(n0, bn, p.n, p.n % bn == 0)
    vmask = tiles.in_bounds(v0, bv, p.v, False)

    # Phase 1: recompute the tile's logits and its softmax.
    z = tiles.logits_tile(e_ref, c_ref, b_ref, n0, v0, p=p, bn=bn, bv=bv, bd=cfg.block_d,
                          nmask=nmask, vmask=vmask)
    row = lambda ref, other=0.0: tiles.load_1d(ref, n0, bn, nmask, other)[:, None]  # noqa: E731
    prob = jnp.exp(z - row(lse_ref))
    onehot = (v0 + jnp.arange(bv))[None, :] == row(t_ref, -1)

    # Phase 2: the gradient of the per-token statistics with respect to the tile's logits.
    g = row(gl_ref) * prob + jnp.where(onehot, row(gt_ref), 0.0)
    if need_sum:
        g = g + row(gs_ref)
    if p.softcap is not None:
        g = g * tiles.softcap_grad(z, p.softcap)
    g = jnp.where(vmask[None, :], g, 0.0).astype(g_ref.dtype)

    # Phase 3: the filtering flag, from the unscaled |softmax - onehot| of the tile.
    if filter_eps is None:
        live = jnp.int32(1)
    else:
        mask = vmask[None, :] if nmask is None else nmask[:, None] & vmask[None, :]
        deviation = jnp.where(mask, jnp.abs(prob - onehot.astype(jnp.float32)), 0.0)
        live = (deviation.max(axis=1).max(axis=0) >= filter_eps).astype(jnp.int32)
    tiles.store_2d(live_ref, i, 1, None, j, 1, None, jnp.broadcast_to(live, (1, 1)))

    # Phase 4: the tile of G, unless only block-sparse products read it and they will skip it.
    if store_all or filter_eps is None:
        tiles.store_2d(g_ref, n0, bn, nmask, j * bv, bv, None, g)
    else:
        @pl.when(live != 0)
        def _():
            tiles.store_2d(g_ref, n0, bn, nmask, j * bv, bv, None, g)


@functools.partial(jax.jit, static_argnames=("p", "cfg", "need_sum", "filter_eps", "store_all", "interpret"))
def logit_grad(e, c, bias, targets, lse, g_lse, g_target, g_sum, v_start, *, p: Problem,
               cfg: BackwardConfig, need_sum: bool, filter_eps: float | None, store_all: bool = True,
               interpret: bool = False):
    """Gradient of the chunk ``[v_start, v_start + chunk_v)`` of logits and its per-tile filter flags.

    Returns ``(g, live)``: g is (N, chunk_v) in e's dtype (zero in columns past V), live is
    (cdiv(N, block_n), chunk_v / block_v) int32. With ``store_all=False`` the tiles of g whose flag is 0 are
    left unwritten (only :func:`accumulate_de` / :func:`write_dc`, which skip them, may read such a g).
    """
    kernel = functools.partial(_logit_grad_kernel, p=p, cfg=cfg, need_sum=need_sum, filter_eps=filter_eps,
                               store_all=store_all)
    if bias is None:
        kernel = functools.partial(_insert_none, kernel, 3)
    grid = (tiles.cdiv(p.n, cfg.block_n), cfg.chunk_v // cfg.block_v)
    args = [v_start, e, c] + ([] if bias is None else [bias]) + [targets, lse, g_lse, g_target, g_sum]
    return pl.pallas_call(
        kernel,
        out_shape=(tiles.out_struct((p.n, cfg.chunk_v), e.dtype, *args),
                   tiles.out_struct(grid, jnp.int32, *args)),
        grid=grid,
        compiler_params=_params(cfg.grad_warps, cfg.grad_stages),
        interpret=interpret,
        name="cce_logit_grad",
    )(*args)


def expand_live(live: jax.Array, cfg: BackwardConfig, n: int) -> jax.Array:
    """The (N, chunk_v) element mask of live tiles (to read a gradient buffer written with store_all=False)."""
    return jnp.repeat(jnp.repeat(live != 0, cfg.block_n, axis=0)[:n], cfg.block_v, axis=1)


def live_lists(live: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per tile row: live tile columns in ascending order (then the rest) and their count; same per column.

    Returns ``(cols_of_row, count_of_row, rows_of_col, count_of_col)``; a stable sort keeps the order fixed.
    """
    dead = live == 0
    cols = jnp.argsort(dead, axis=1, stable=True).astype(jnp.int32)
    rows = jnp.argsort(dead, axis=0, stable=True).astype(jnp.int32)
    return cols, live.sum(axis=1, dtype=jnp.int32), rows, live.sum(axis=0, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------------------
# 2. dE += G @ c_chunk.


def _accumulate_de_kernel(vs_ref, g_ref, cols_ref, count_ref, c_ref, de_in_ref, de_ref, *, p: Problem,
                          cfg: BackwardConfig):
    del de_in_ref  # aliased with de_ref
    bn, bv, bo = cfg.block_n, cfg.block_v, cfg.block_dout
    i, k = pl.program_id(0), pl.program_id(1)
    n0, d0 = i * bn, k * bo
    nmask = tiles.in_bounds(n0, bn, p.n, p.n % bn == 0)
    dmask = tiles.in_bounds(d0, bo, p.d, p.d % bo == 0)

    def add_tile(t, acc):
        j = cols_ref[i, t]
        v0 = vs_ref[0] + j * bv
        g = tiles.load_2d(g_ref, n0, bn, nmask, j * bv, bv, None)
        c_t = tiles.load_c_tile(c_ref, v0, bv, tiles.in_bounds(v0, bv, p.v, False), d0, bo, dmask, p.layout)
        return acc + tiles.dot(g, c_t, trans_b=p.layout == "dv")

    acc = lax.fori_loop(0, count_ref[i], add_tile, jnp.zeros((bn, bo), jnp.float32))
    prev = tiles.load_2d(de_ref, n0, bn, nmask, d0, bo, dmask).astype(jnp.float32)
    tiles.store_2d(de_ref, n0, bn, nmask, d0, bo, dmask, (prev + acc).astype(de_ref.dtype))


@functools.partial(jax.jit, static_argnames=("p", "cfg", "interpret"), donate_argnums=(5,))
def accumulate_de(g, cols_of_row, count_of_row, c, v_start, de, *, p: Problem, cfg: BackwardConfig,
                  interpret: bool = False):
    """Returns ``de + g @ c[v_start : v_start + chunk_v]`` over live tiles (dE accumulates in de's dtype)."""
    kernel = functools.partial(_accumulate_de_kernel, p=p, cfg=cfg)
    return pl.pallas_call(
        kernel,
        out_shape=tiles.out_struct(de.shape, de.dtype, g, c, de),
        grid=(tiles.cdiv(p.n, cfg.block_n), tiles.cdiv(p.d, cfg.block_dout)),
        input_output_aliases={5: 0},
        compiler_params=_params(cfg.product_warps, cfg.product_stages),
        interpret=interpret,
        name="cce_accumulate_de",
    )(v_start, g, cols_of_row, count_of_row, c, de)


# --------------------------------------------------------------------------------------------------------
# 3. dC[chunk] = G^T @ e (and dbias[chunk] = column sums of G).


def _write_dc_kernel(vs_ref, g_ref, rows_ref, count_ref, e_ref, dc_in_ref, db_in_ref, dc_ref, db_ref, *,
                     p: Problem, cfg: BackwardConfig, accumulate: bool):
    del dc_in_ref, db_in_ref  # aliased with the outputs
    bn, bv, bo = cfg.block_n, cfg.vout, cfg.block_dout
    j, k = pl.program_id(0), pl.program_id(1)
    tile = j // (cfg.block_v // bv)  # the gradient tile column (and filter flag column) holding rows j
    v0, d0 = vs_ref[0] + j * bv, k * bo
    vmask = tiles.in_bounds(v0, bv, p.v, False)
    dmask = tiles.in_bounds(d0, bo, p.d, p.d % bo == 0)
    n_full = p.n % bn == 0

    def add_tile(t, carry):
        acc, colsum = carry
        n0 = rows_ref[t, tile] * bn
        nmask = tiles.in_bounds(n0, bn, p.n, n_full)
        g = tiles.load_2d(g_ref, n0, bn, nmask, j * bv, bv, None)
        e_t = tiles.load_2d(e_ref, n0, bn, nmask, d0, bo, dmask)
        acc = acc + tiles.dot(g, e_t, trans_a=True)
        if colsum is not None:
            colsum = colsum + g.astype(jnp.float32).sum(axis=0)
        return acc, colsum

    colsum0 = jnp.zeros((bv,), jnp.float32) if p.has_bias else None
    count = count_ref[tile]
    acc, colsum = lax.fori_loop(0, count, add_tile, (jnp.zeros((bv, bo), jnp.float32), colsum0))

    def store():
        # The (rows, cols) window of dC this program owns: (classifier rows, hidden) for "vd", transposed for "dv".
        window = (v0, bv, vmask, d0, bo, dmask) if p.layout == "vd" else (d0, bo, dmask, v0, bv, vmask)
        out = acc if p.layout == "vd" else acc.T
        if accumulate:
            out = tiles.load_2d(dc_ref, *window).astype(jnp.float32) + out
        tiles.store_2d(dc_ref, *window, out.astype(dc_ref.dtype))
        if p.has_bias:
            @pl.when(k == 0)
            def _():
                total = colsum + tiles.load_1d(db_ref, v0, bv, vmask) if accumulate else colsum
                tiles.store_1d(db_ref, v0, bv, vmask, total)

    if accumulate:
        # Rows that no live tile touches keep their values and cost no memory traffic.
        pl.when(count > 0)(store)
    else:
        store()


@functools.partial(jax.jit, static_argnames=("p", "cfg", "accumulate", "interpret"), donate_argnums=(5, 6))
def write_dc(g, rows_of_col, count_of_col, e, v_start, dc, db, *, p: Problem, cfg: BackwardConfig,
             accumulate: bool = False, interpret: bool = False):
    """Writes rows ``[v_start, v_start + chunk_v)`` of dC (and of the float32 dbias ``db``) from the live
    tiles of ``g``; with ``accumulate`` adds into them instead, leaving rows without live tiles untouched."""
    kernel = functools.partial(_write_dc_kernel, p=p, cfg=cfg, accumulate=accumulate)
    return pl.pallas_call(
        kernel,
        out_shape=(tiles.out_struct(dc.shape, dc.dtype, g, e, dc, db), tiles.out_struct(db.shape, db.dtype, g, e, dc, db)),
        grid=(cfg.chunk_v // cfg.vout, tiles.cdiv(p.d, cfg.block_dout)),
        input_output_aliases={5: 0, 6: 1},
        compiler_params=_params(cfg.product_warps, cfg.product_stages),
        interpret=interpret,
        name="cce_write_dc",
    )(v_start, g, rows_of_col, count_of_col, e, dc, db)


def _insert_none(kernel, position, *refs):
    refs = list(refs)
    refs.insert(position, None)
    return kernel(*refs)
