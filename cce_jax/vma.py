"""Varying-manual-axes bookkeeping for code that may run inside ``shard_map`` (``check_vma=True``).

Inside ``shard_map`` every value carries the set of mesh axes it varies over. Loop carries must keep that set,
and the operands of a ``custom_vjp`` must agree with each other for its cotangents to type-check. Casting to
"varying" is also what makes AD insert the right ``psum`` in the backward (a replicated ``e`` whose use varies
over the vocabulary axis gets its dE summed over that axis). Outside ``shard_map`` nothing varies and these
functions return their inputs unchanged.
"""

from __future__ import annotations

import jax
from jax import lax


def _varying(x) -> frozenset:
    return jax.typeof(x).mat.varying


def _cast(x, axes: frozenset):
    missing = tuple(sorted(axes - _varying(x), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x


def varying_like(x: jax.Array, *refs) -> jax.Array:
    """``x`` made to vary over every manual axis that one of ``refs`` (None entries allowed) varies over."""
    return _cast(x, frozenset().union(*(_varying(r) for r in refs if r is not None)))


def align_varying(*xs, axes: tuple = ()):
    """Every non-None array of ``xs`` made to vary over the union of their axes and ``axes``."""
    union = frozenset(axes).union(*(_varying(x) for x in xs if x is not None))
    return tuple(None if x is None else _cast(x, union) for x in xs)
