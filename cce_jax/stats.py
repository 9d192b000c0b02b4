"""The contract between the semantics layer and every implementation.

An implementation computes, for each of N tokens, three float32 scalars of the logits row
``z = softcap(e @ c^T + bias)``:

- ``lse``: ``logsumexp_v z_v``;
- ``target_logit``: ``z_t`` for the token's target ``t`` (0.0 where ``t == -1``, which marks ignored,
  out-of-range and, under vocabulary parallelism, other shards' targets);
- ``sum_logits``: ``sum_v z_v`` (only when ``spec.need_sum``; zeros otherwise).

Everything else (shift, ignore_index, weights, label smoothing, reductions, z-loss) is arithmetic on these
scalars in :mod:`cce_jax.api`, so every implementation gets every option. The implementation makes the three
outputs differentiable with respect to ``e``, ``c`` and ``bias``: given per-token cotangents
``(g_lse, g_target, g_sum)`` the logit gradient is
``dz_v = (g_lse * softmax_v + g_sum) * cap'_v + g_target * [v == t] * cap'_t``,
which a blockwise backward forms tile by tile.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax


class LossCoefficients(NamedTuple):
    """Per-token float32 coefficients of a scalar loss ``sum_n [a lse + b z_t + s sum_v z_v + q lse^2]``.

    The semantics layer derives them from the valid mask, weights, the mean's denominator, label smoothing
    and the z-loss weight before any logit exists; an implementation of the three-pass path
    (:mod:`cce_jax.three_pass`) forms the logit gradient ``((a + 2 q lse) p + s) cap' + b onehot cap'`` from
    them without knowing any option by name.
    """

    a: jax.Array
    b: jax.Array
    s: jax.Array
    q: jax.Array


class TokenStats(NamedTuple):
    lse: jax.Array
    target_logit: jax.Array
    sum_logits: jax.Array


@dataclasses.dataclass(frozen=True)
class LogitSpec:
    """Static description of the logit function.

    Attributes:
      layout: ``"vd"`` when ``c`` is (V, D), ``"dv"`` when it is (D, V).
      softcap: ``z = softcap * tanh(z / softcap)`` after the bias, or None.
      need_sum: whether ``sum_logits`` is wanted (label smoothing).
    """

    layout: str = "vd"
    softcap: float | None = None
    need_sum: bool = False

    def vocab_size(self, c: jax.Array) -> int:
        return c.shape[0] if self.layout == "vd" else c.shape[1]


class TokenStatsFn(Protocol):
    def __call__(
        self, e: jax.Array, c: jax.Array, bias: jax.Array | None, targets: jax.Array
    ) -> TokenStats: ...
