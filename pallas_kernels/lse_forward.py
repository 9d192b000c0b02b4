"""Blockwise log-sum-exp forward: per-token lse, target logit and sum of logits, never storing a logit.

Grid: ``(cdiv(N, block_n),)``; program ``i`` owns tokens ``[i * block_n, (i + 1) * block_n)``.
Each program streams the vocabulary in ``block_v`` columns; every (block_n, block_v) logits tile is built from
``block_d`` slices of ``e`` and ``c`` (:func:`pallas_kernels.tiles.logits_tile`) and folded into an online
max / sum (the flash-attention recurrence), the target logit (the one column equal to the token's target,
so the indexed dot costs no extra pass) and, if asked, the plain sum of logits.
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
class ForwardConfig:
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 4
    num_stages: int = 3


def _kernel(e_ref, c_ref, b_ref, t_ref, lse_ref, zt_ref, zs_ref, *, p: Problem, cfg: ForwardConfig,
            need_sum: bool):
    bn, bv = cfg.block_n, cfg.block_v
    n0 = pl.program_id(0) * bn
    nmask = tiles.in_bounds(n0, bn, p.n, p.n % bn == 0)
    targets = tiles.load_1d(t_ref, n0, bn, nmask, other=-1)

    # Phase 1: stream the vocabulary, folding each tile into running statistics.
    def vocab_step(j, carry):
        v0 = j * bv
        vmask = tiles.in_bounds(v0, bv, p.v, p.v % bv == 0)
        z = tiles.logits_tile(e_ref, c_ref, b_ref, n0, v0, p=p, bn=bn, bv=bv, bd=cfg.block_d,
                              nmask=nmask, vmask=vmask)
        return tiles.fold_tile(carry, z, v0 + jnp.arange(bv), targets, vmask, need_sum)

    m, s, zt, zs = lax.fori_loop(0, tiles.cdiv(p.v, bv), vocab_step, tiles.empty_stats(bn))

    # Phase 2: write one float32 scalar per token.
    tiles.store_1d(lse_ref, n0, bn, nmask, m + jnp.log(s))
    tiles.store_1d(zt_ref, n0, bn, nmask, zt)
    tiles.store_1d(zs_ref, n0, bn, nmask, zs)


@functools.partial(jax.jit, static_argnames=("p", "cfg", "need_sum", "interpret"))
def lse_forward(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    p: Problem,
    cfg: ForwardConfig,
    need_sum: bool,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``(lse, target_logit, sum_logits)`` of ``softcap(e @ c^T + bias)``, all float32 (N,).

    ``targets`` holds local column ids; ``-1`` (or any id outside [0, V)) gives a target logit of 0.
    ``sum_logits`` is zeros unless ``need_sum``.
    """
    kernel = functools.partial(_kernel, p=p, cfg=cfg, need_sum=need_sum)
    if bias is None:
        kernel = functools.partial(_without_bias, kernel)
    args = (e, c, targets) if bias is None else (e, c, bias, targets)
    out = tiles.out_struct((p.n,), jnp.float32, *args)
    return pl.pallas_call(
        kernel,
        out_shape=(out, out, out),
        grid=(tiles.cdiv(p.n, cfg.block_n),),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="cce_lse_forward",
    )(*args)


def _without_bias(kernel, e_ref, c_ref, *refs):
    return kernel(e_ref, c_ref, None, *refs)
