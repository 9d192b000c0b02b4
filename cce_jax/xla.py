"""impl="xla": blockwise token statistics in plain JAX, for CPUs, TPUs and GPUs without the kernels.

Forward: a loop over token blocks of ``block_n`` rows, each running an online log-sum-exp over vocabulary
blocks of ``block_v`` columns. Only per-token ``lse`` is saved for the backward.

Backward (``jax.custom_vjp``): a loop over vocabulary blocks, each looping over token blocks. Every
(block_n, block_v) tile of logits is recomputed once and gives both products: its dC rows accumulate in a
float32 carry written once per vocabulary block, its dE rows are added into one float32 (N, D) buffer. The
only (N, V)-sized thing ever alive is one tile, so compiled temporary memory is O(block_n * block_v) plus the
float32 dE accumulator. No atomics or scatters: results are deterministic.

Ragged edges are handled without padding (padding ``c`` would copy the classifier): the last block's start is
clamped to ``size - block`` and the rows/columns it shares with the previous block are masked out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import logits as logits_lib
from cce_jax import three_pass
from cce_jax.options import BackwardOptions
from cce_jax.stats import LogitSpec, TokenStats, TokenStatsFn
from cce_jax.vma import varying_like


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Block sizes of the blockwise XLA implementation; pass as ``impl=XlaConfig(...)`` to pin them.

    ``block_n`` / ``block_v`` tile the one-pass forward and the recompute backward: larger blocks give XLA
    larger matmuls (faster) at the cost of one float32 (block_n, block_v) tile of temporary memory.
    ``chunk_tokens`` (tokens per chunk; default: sized from the memory budget) shapes the three-pass training
    path (:mod:`cce_jax.three_pass`).
    """

    block_n: int = 1024
    block_v: int = 4096
    chunk_tokens: int | None = None

    def __post_init__(self):
        for name in ("block_n", "block_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"XlaConfig.{name} must be a positive int, got {value!r}")
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1):
            raise ValueError(f"XlaConfig.chunk_tokens must be None or a positive int, got {self.chunk_tokens!r}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _slice_vocab(x: jax.Array, start, size: int, axis: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _vocab_axis(layout: str) -> int:
    return 0 if layout == "vd" else 1


def _blocks(e: jax.Array, c: jax.Array, spec: LogitSpec, config: XlaConfig):
    n, v = e.shape[0], spec.vocab_size(c)
    bn, bv = min(config.block_n, n), min(config.block_v, v)
    return n, v, bn, bv, _cdiv(n, bn), _cdiv(v, bv)


def _clamped(i, block: int, size: int):
    """(start of block i, mask of the block's positions that no earlier block covered)."""
    nominal = i * block
    start = jnp.minimum(nominal, size - block)
    return start, start + jnp.arange(block) >= nominal


def _forward(e, c, bias, targets, spec: LogitSpec, config: XlaConfig) -> TokenStats:
    n, v, bn, bv, num_n, num_v = _blocks(e, c, spec, config)
    vaxis = _vocab_axis(spec.layout)
    vary = lambda x: varying_like(x, e, c, bias, targets)  # noqa: E731

    def row_block(i, outs):
        n0, _ = _clamped(i, bn, n)
        e_blk = lax.dynamic_slice_in_dim(e, n0, bn)
        t_blk = lax.dynamic_slice_in_dim(targets, n0, bn)

        def vocab_step(j, carry):
            m, s, zt, zs = carry
            v0, live = _clamped(j, bv, v)
            b_blk = None if bias is None else _slice_vocab(bias, v0, bv, 0)
            z = logits_lib.logits(e_blk, _slice_vocab(c, v0, bv, vaxis), b_blk, spec.layout, spec.softcap)
            live = live[None, :]
            z_live = jnp.where(live, z, -jnp.inf)
            m_new = jnp.maximum(m, z_live.max(axis=1))
            s = s * jnp.exp(m - m_new) + jnp.exp(z_live - m_new[:, None]).sum(axis=1)
            is_target = live & ((v0 + jnp.arange(bv))[None, :] == t_blk[:, None])
            zt = zt + jnp.where(is_target, z, 0.0).sum(axis=1)
            if spec.need_sum:
                zs = zs + jnp.where(live, z, 0.0).sum(axis=1)
            return m_new, s, zt, zs

        zeros = vary(jnp.zeros((bn,), jnp.float32))
        init = (vary(jnp.full((bn,), -jnp.inf)), zeros, zeros, zeros)
        m, s, zt, zs = lax.fori_loop(0, num_v, vocab_step, init)
        block_stats = (m + jnp.log(s), zt, zs)
        return tuple(lax.dynamic_update_slice_in_dim(o, x, n0, 0) for o, x in zip(outs, block_stats))

    zeros = vary(jnp.zeros((n,), jnp.float32))
    return TokenStats(*lax.fori_loop(0, num_n, row_block, (zeros, zeros, zeros)))


def _dot(a, b, contract_a: int, contract_b: int, precision):
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _backward(spec: LogitSpec, bwd: BackwardOptions, config: XlaConfig, res, cotangents):
    e, c, bias, targets, lse = res
    g_lse, g_target, g_sum = cotangents
    n, v, bn, bv, num_n, num_v = _blocks(e, c, spec, config)
    d = e.shape[1]
    vaxis = _vocab_axis(spec.layout)
    precision = logits_lib.matmul_precision(e.dtype)
    vary = lambda x: varying_like(x, e, c, bias, targets, lse, g_lse, g_target, g_sum)  # noqa: E731

    def vocab_block(j, carry):
        de_acc, dc, db = carry
        v0, live_cols = _clamped(j, bv, v)
        c_blk = _slice_vocab(c, v0, bv, vaxis)
        b_blk = None if bias is None else _slice_vocab(bias, v0, bv, 0)
        cols = v0 + jnp.arange(bv)

        def token_block(i, inner):
            de_acc, dc_blk, db_blk = inner
            n0, live_rows = _clamped(i, bn, n)
            rows = lambda x: lax.dynamic_slice_in_dim(x, n0, bn)  # noqa: E731
            e_blk, t_blk = rows(e), rows(targets)
            z = logits_lib.logits(e_blk, c_blk, b_blk, spec.layout, spec.softcap)
            p = jnp.exp(z - rows(lse)[:, None])
            onehot = cols[None, :] == t_blk[:, None]
            g = rows(g_lse)[:, None] * p + jnp.where(onehot, rows(g_target)[:, None], 0.0)
            if spec.need_sum:
                g = g + rows(g_sum)[:, None]
            if spec.softcap is not None:
                g = g * logits_lib.softcap_grad(z, spec.softcap)
            live = live_rows[:, None] & live_cols[None, :]
            g = jnp.where(live, g, 0.0)
            g_op = g.astype(e.dtype)
            if bwd.filter_eps is not None:
                deviation = jnp.where(live, jnp.abs(p - onehot.astype(jnp.float32)), 0.0)
                skip = deviation.max() < bwd.filter_eps

            def add_de(de_acc):
                de_blk = _dot(g_op, c_blk, 1, vaxis, precision)
                cur = lax.dynamic_slice(de_acc, (n0, 0), (bn, d))
                return lax.dynamic_update_slice(de_acc, cur + de_blk, (n0, 0))

            def add_dc(state):
                dc_blk, db_blk = state
                if spec.layout == "vd":
                    dc_blk = dc_blk + _dot(g_op, e_blk, 0, 0, precision)
                else:
                    dc_blk = dc_blk + _dot(e_blk, g_op, 0, 0, precision)
                if db_blk is not None:
                    db_blk = db_blk + g.sum(axis=0)
                return dc_blk, db_blk

            if bwd.filters_e:
                de_acc = lax.cond(skip, lambda x: x, add_de, de_acc)
            else:
                de_acc = add_de(de_acc)
            if bwd.filters_c:
                dc_blk, db_blk = lax.cond(skip, lambda s: s, add_dc, (dc_blk, db_blk))
            else:
                dc_blk, db_blk = add_dc((dc_blk, db_blk))
            return de_acc, dc_blk, db_blk

        dc_shape = (bv, d) if spec.layout == "vd" else (d, bv)
        db_init = None if bias is None else vary(jnp.zeros((bv,), jnp.float32))
        de_acc, dc_blk, db_blk = lax.fori_loop(
            0, num_n, token_block, (de_acc, vary(jnp.zeros(dc_shape, jnp.float32)), db_init)
        )
        # Columns shared with the previous (clamped) block already hold their final values.
        live_c = live_cols[:, None] if spec.layout == "vd" else live_cols[None, :]
        merged = jnp.where(live_c, dc_blk.astype(dc.dtype), _slice_vocab(dc, v0, bv, vaxis))
        dc = lax.dynamic_update_slice_in_dim(dc, merged, v0, axis=vaxis)
        if db is not None:
            merged_b = jnp.where(live_cols, db_blk, _slice_vocab(db, v0, bv, 0))
            db = lax.dynamic_update_slice_in_dim(db, merged_b, v0, axis=0)
        return de_acc, dc, db

    db0 = None if bias is None else vary(jnp.zeros((v,), jnp.float32))
    de_acc, dc, db = lax.fori_loop(
        0, num_v, vocab_block,
        (vary(jnp.zeros((n, d), jnp.float32)), vary(jnp.zeros(c.shape, c.dtype)), db0),
    )
    dbias = None if bias is None else db.astype(bias.dtype)
    return de_acc.astype(e.dtype), dc, dbias, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _token_stats(e, c, bias, targets, spec, bwd, config):
    return _forward(e, c, bias, targets, spec, config)


def _token_stats_fwd(e, c, bias, targets, spec, bwd, config):
    stats = _forward(e, c, bias, targets, spec, config)
    return stats, (e, c, bias, targets, stats.lse)


_token_stats.defvjp(_token_stats_fwd, _backward)


def token_stats(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    spec: LogitSpec,
    backward: BackwardOptions,
    config: XlaConfig = XlaConfig(),
) -> TokenStats:
    return _token_stats(e, c, bias, targets, spec, backward, config)


def training_impl(
    n: int,
    d: int,
    v: int,
    dtype,
    *,
    spec: LogitSpec,
    backward: BackwardOptions,
    config: XlaConfig,
    budget_bytes: int,
    stats_fn: TokenStatsFn,
) -> three_pass.TrainingImpl:
    """The three-pass path in plain XLA: float32 logits per chunk and dense products (nothing is skipped).
    ``stats_fn`` is :func:`token_stats` with these options bound (the recompute path)."""
    logits = three_pass.XlaLogits(spec)
    plan = three_pass.make_plan(n, d, v, dtype, budget_bytes=budget_bytes, chunk=config.chunk_tokens,
                                extra_bytes_per_entry=logits.bytes_per_entry)
    return three_pass.TrainingImpl(
        forward=functools.partial(_forward, spec=spec, config=config),
        gradients=functools.partial(three_pass.gradients, spec=spec, plan=plan, logits=logits,
                                    accum_c_fp32=backward.accum_c_fp32),
        stats_fn=stats_fn,
    )
