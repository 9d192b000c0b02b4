"""impl="dense": materialise the float32 (N, V) logits and let JAX differentiate. The readable oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cce_jax import logits as logits_lib
from cce_jax.stats import LogitSpec, TokenStats


def token_stats(
    e: jax.Array, c: jax.Array, bias: jax.Array | None, targets: jax.Array, *, spec: LogitSpec
) -> TokenStats:
    z = logits_lib.logits(e, c, bias, spec.layout, spec.softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    target_logit = jnp.where(targets >= 0, picked, 0.0)
    sum_logits = z.sum(axis=-1) if spec.need_sum else jnp.zeros_like(lse)
    return TokenStats(lse, target_logit, sum_logits)
