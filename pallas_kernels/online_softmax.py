"""The online log-sum-exp recurrence (flash-attention style) and its merges: pure JAX on (rows, cols) tiles and
(rows,) running statistics, traced inside the Mosaic GPU kernels and usable anywhere else."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)


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
