"""The logit function shared by the pure-JAX implementations: ``softcap(e @ c^T + bias)`` in float32.

Kernels recompute the same function inside their tiles; keeping the JAX version in one place means the dense
oracle and the blockwise implementation cannot drift apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def matmul_precision(dtype) -> lax.Precision:
    """float32 inputs get IEEE float32 products (not TF32 on GPUs); half inputs use the default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def dot_ec(e: jax.Array, c: jax.Array, layout: str) -> jax.Array:
    """``e @ c^T`` for ``c`` stored (V, D) (``layout="vd"``) or ``e @ c`` for (D, V) (``"dv"``), in float32."""
    contract = 1 if layout == "vd" else 0
    return lax.dot_general(
        e,
        c,
        (((1,), (contract,)), ((), ())),
        precision=matmul_precision(e.dtype),
        preferred_element_type=jnp.float32,
    )


def apply_softcap(z: jax.Array, softcap: float | None) -> jax.Array:
    if softcap is None:
        return z
    return softcap * jnp.tanh(z / softcap)


def softcap_grad(capped: jax.Array, softcap: float | None) -> jax.Array:
    """d capped / d raw written in terms of the capped value, so the raw logit need not be kept."""
    if softcap is None:
        return jnp.ones_like(capped)
    return 1.0 - jnp.square(capped / softcap)


def logits(
    e: jax.Array, c: jax.Array, bias: jax.Array | None, layout: str, softcap: float | None
) -> jax.Array:
    """float32 logits of a (tile of) tokens against a (tile of) classifier rows; bias goes before the cap."""
    z = dot_ec(e, c, layout)
    if bias is not None:
        z = z + bias.astype(jnp.float32)[None, :]
    return apply_softcap(z, softcap)
