"""Tile-level math shared by the kernels: masked operand loads, the logits tile, and the logit gradient.

Everything here runs inside a Pallas (Triton) kernel body. Shapes handed to Triton must be powers of two, so
every tile is a power-of-two block and ragged edges (N, V, D of any size) are handled with masked loads that
read 0 outside the array and with explicit masks on the results.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one loss problem, shared by all kernels.

    Attributes:
      n, d, v: tokens, hidden size and vocabulary size (of this device's shard).
      layout: ``"vd"`` when c is (V, D), ``"dv"`` when c is (D, V).
      softcap: logit cap applied after the bias, or None.
      has_bias: whether a bias vector is passed.
    """

    n: int
    d: int
    v: int
    layout: str = "vd"
    softcap: float | None = None
    has_bias: bool = False


def out_struct(shape, dtype, *like: jax.Array | None) -> jax.ShapeDtypeStruct:
    """An output shape that varies over the manual mesh axes of the arrays ``like`` (inside ``shard_map``),
    so a kernel called on per-device shards type-checks under ``check_vma``; outside it nothing varies."""
    mats = [jax.typeof(x).mat for x in like if x is not None]
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """float32-accumulating tile product; float32 operands use IEEE products, not TF32."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def in_bounds(start, size: int, limit: int, static_full: bool) -> jax.Array | None:
    """Mask of positions ``start + arange(size) < limit``; None when the caller knows every block is full."""
    if static_full:
        return None
    return start + jnp.arange(size) < limit


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def load_2d(ref, r0, rows: int, rmask, c0, cols: int, cmask) -> jax.Array:
    """Loads ``ref[r0:r0+rows, c0:c0+cols]`` reading 0 outside the masks."""
    mask = _and(None if rmask is None else rmask[:, None], None if cmask is None else cmask[None, :])
    block = ref.at[pl.ds(r0, rows), pl.ds(c0, cols)]
    if mask is None:
        return plgpu.load(block)
    return plgpu.load(block, mask=mask, other=0)


def store_2d(ref, r0, rows: int, rmask, c0, cols: int, cmask, value) -> None:
    mask = _and(None if rmask is None else rmask[:, None], None if cmask is None else cmask[None, :])
    block = ref.at[pl.ds(r0, rows), pl.ds(c0, cols)]
    if mask is None:
        plgpu.store(block, value)
    else:
        plgpu.store(block, value, mask=mask)


def load_1d(ref, start, size: int, mask, other=0) -> jax.Array:
    block = ref.at[pl.ds(start, size)]
    if mask is None:
        return plgpu.load(block)
    return plgpu.load(block, mask=mask, other=other)


def store_1d(ref, start, size: int, mask, value) -> None:
    block = ref.at[pl.ds(start, size)]
    if mask is None:
        plgpu.store(block, value)
    else:
        plgpu.store(block, value, mask=mask)


def load_c_tile(c_ref, v0, bv: int, vmask, k0, bk: int, kmask, layout: str) -> jax.Array:
    """A (bv, bk) tile of the classifier for "vd", a (bk, bv) tile for "dv" (loaded as stored, never copied)."""
    if layout == "vd":
        return load_2d(c_ref, v0, bv, vmask, k0, bk, kmask)
    return load_2d(c_ref, k0, bk, kmask, v0, bv, vmask)


def logits_tile(
    e_ref, c_ref, b_ref, n0, v0, *, p: Problem, bn: int, bv: int, bd: int, nmask, vmask
) -> jax.Array:
    """float32 (bn, bv) tile of ``softcap(e @ c^T + bias)``; columns outside V hold -inf.

    Loops over D in chunks of ``bd``; the bias is added once, after the loop.
    """
    d_full = p.d % bd == 0

    def step(k, acc):
        k0 = k * bd
        kmask = in_bounds(k0, bd, p.d, d_full)
        e_t = load_2d(e_ref, n0, bn, nmask, k0, bd, kmask)
        c_t = load_c_tile(c_ref, v0, bv, vmask, k0, bd, kmask, p.layout)
        return acc + dot(e_t, c_t, trans_b=p.layout == "vd")

    z = lax.fori_loop(0, cdiv(p.d, bd), step, jnp.zeros((bn, bv), jnp.float32))
    if p.has_bias:
        z = z + load_1d(b_ref, v0, bv, vmask).astype(jnp.float32)[None, :]
    if p.softcap is not None:
        z = p.softcap * jnp.tanh(z / p.softcap)
    if vmask is not None:
        z = jnp.where(vmask[None, :], z, -jnp.inf)
    return z


def softcap_grad(z: jax.Array, softcap: float | None) -> jax.Array | float:
    if softcap is None:
        return 1.0
    return 1.0 - jnp.square(z / softcap)


def fold_tile(carry, z: jax.Array, cols: jax.Array, targets: jax.Array, vmask, need_sum: bool):
    """Folds one logits tile into the running per-row statistics ``(max, sum of exp, target logit, sum)``.

    The online log-sum-exp recurrence (flash attention's): ``z`` holds -inf outside V; ``cols`` are the tile's
    global column ids, matched against the rows' ``targets`` (the indexed dot costs no extra pass)."""
    m, s, zt, zs = carry
    m_new = jnp.maximum(m, z.max(axis=1))
    s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)
    zt = zt + jnp.where(cols[None, :] == targets[:, None], z, 0.0).sum(axis=1)
    if need_sum:
        zs = zs + (z if vmask is None else jnp.where(vmask[None, :], z, 0.0)).sum(axis=1)
    return m_new, s, zt, zs


def empty_stats(rows: int):
    """The statistics of no columns: max -inf, sums 0."""
    zeros = jnp.zeros((rows,), jnp.float32)
    return jnp.full((rows,), -jnp.inf, jnp.float32), zeros, zeros, zeros
