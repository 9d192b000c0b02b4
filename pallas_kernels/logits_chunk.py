"""Logits of a chunk of tokens, stored once for the three-pass training path, with their exact statistics.

Grid: ``(cdiv(N, block_n), splits)``; program ``(i, k)`` owns tokens ``[i * block_n, (i + 1) * block_n)`` and
the k-th of ``splits`` equal runs of vocabulary tiles, which it streams in ``block_v`` columns like
:mod:`pallas_kernels.lse_forward`. A chunk has few row blocks, so the vocabulary splits are what fill the GPU.
For every (block_n, block_v) tile of ``z = softcap(e @ c^T + bias)`` it

1. writes ``z - m`` in the buffer's (half) precision, where ``m`` is the tile's row maximum, and writes ``m``
   (float32) to a (N, cdiv(V, block_v)) array; storing each tile relative to its own maxima keeps nearly full
   relative precision for every entry that carries probability, whatever the logits' magnitude;
2. folds the tile into the online max / sum of exponentials, the target logit and (if asked) the sum of logits.

It ends by writing its float32 partial statistics (running max, sum of exponentials, target logit, sum of
logits) per token; :func:`logits_chunk` combines the splits into lse, target logit and sum of logits. Columns past V are stored as
``-inf`` (so their probability, and gradient, is exactly 0) and the buffer has ``cdiv(V, block_v) * block_v``
columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tiles
from pallas_kernels.lse_forward import ForwardConfig
from pallas_kernels.tiles import Problem


def _kernel(e_ref, c_ref, b_ref, t_ref, z_ref, m_ref, mx_ref, se_ref, zt_ref, zs_ref, *, p: Problem,
            cfg: ForwardConfig, need_sum: bool, splits: int):
    bn, bv = cfg.block_n, cfg.block_v
    n0 = pl.program_id(0) * bn
    split = pl.program_id(1)
    num_tiles = tiles.cdiv(p.v, bv)
    per_split = tiles.cdiv(num_tiles, splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, num_tiles)
    nmask = tiles.in_bounds(n0, bn, p.n, p.n % bn == 0)
    targets = tiles.load_1d(t_ref, n0, bn, nmask, other=-1)

    # Phase 1: each vocabulary tile is stored relative to its row maxima and folded into the statistics.
    def vocab_step(j, carry):
        v0 = j * bv
        vmask = tiles.in_bounds(v0, bv, p.v, p.v % bv == 0)
        z = tiles.logits_tile(e_ref, c_ref, b_ref, n0, v0, p=p, bn=bn, bv=bv, bd=cfg.block_d,
                              nmask=nmask, vmask=vmask)
        m_tile = z.max(axis=1)
        tiles.store_2d(z_ref, n0, bn, nmask, v0, bv, None, (z - m_tile[:, None]).astype(z_ref.dtype))
        tiles.store_2d(m_ref, n0, bn, nmask, j, 1, None, m_tile[:, None])
        return tiles.fold_tile(carry, z, v0 + jnp.arange(bv), targets, vmask, need_sum)

    stats = lax.fori_loop(first, last, vocab_step, tiles.empty_stats(bn))

    # Phase 2: this split's partial statistics, one float32 scalar each per token.
    for ref, value in zip((mx_ref, se_ref, zt_ref, zs_ref), stats):
        tiles.store_2d(ref, split, 1, None, n0, bn, nmask, value[None, :])


def default_splits(n: int, v: int, cfg: ForwardConfig, programs: int = 264) -> int:
    """Vocabulary splits that give about ``programs`` programs (two per SM of an H100/H200)."""
    return max(1, min(tiles.cdiv(v, cfg.block_v), tiles.cdiv(programs, tiles.cdiv(n, cfg.block_n))))


@functools.partial(jax.jit, static_argnames=("p", "cfg", "need_sum", "splits", "dtype", "interpret"))
def logits_chunk(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    p: Problem,
    cfg: ForwardConfig,
    need_sum: bool,
    splits: int | None = None,
    dtype=None,
    interpret: bool = False,
):
    """``(z_rel, m, lse, target_logit, sum_logits)`` of ``softcap(e @ c^T + bias)`` for the N rows of ``e``.

    ``z_rel`` is (N, T * block_v) in ``dtype`` (default: e's), T = cdiv(V, block_v); ``m`` is (N, T) float32,
    so ``z[:, v] = z_rel[:, v] + m[:, v // block_v]``. The rest are float32 (N,) as in
    :func:`pallas_kernels.lse_forward.lse_forward`. ``splits``: vocabulary splits (default
    :func:`default_splits`).
    """
    num_tiles = tiles.cdiv(p.v, cfg.block_v)
    splits = splits or default_splits(p.n, p.v, cfg)
    kernel = functools.partial(_kernel, p=p, cfg=cfg, need_sum=need_sum, splits=splits)
    if bias is None:
        kernel = functools.partial(_without_bias, kernel)
    args = (e, c, targets) if bias is None else (e, c, bias, targets)
    part = tiles.out_struct((splits, p.n), jnp.float32, *args)
    z_rel, m, mx, se, zt, zs = pl.pallas_call(
        kernel,
        out_shape=(tiles.out_struct((p.n, num_tiles * cfg.block_v), dtype or e.dtype, *args),
                   tiles.out_struct((p.n, num_tiles), jnp.float32, *args), part, part, part, part),
        grid=(tiles.cdiv(p.n, cfg.block_n), splits),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="cce_logits_chunk",
    )(*args)
    top = mx.max(axis=0)
    lse = top + jnp.log(jnp.sum(se * jnp.exp(mx - top[None, :]), axis=0))
    return z_rel, m, lse, zt.sum(axis=0), zs.sum(axis=0)


def _without_bias(kernel, e_ref, c_ref, *refs):
    return kernel(e_ref, c_ref, None, *refs)
