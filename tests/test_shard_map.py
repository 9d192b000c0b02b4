"""Plain data parallelism: the loss inside ``shard_map`` with tokens split over a mesh axis and the classifier
replicated, under JAX's default ``check_vma=True`` (every implementation's custom VJP must type-check there)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import cce_jax
from cce_jax.xla import XlaConfig


@pytest.mark.parametrize("impl", ["dense", XlaConfig(block_n=8, block_v=16)], ids=["dense", "xla"])
def test_data_parallel_shard_map_matches_plain_call(impl):
    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.standard_normal((2, 9, 24)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((37, 24)) / 24**0.5, jnp.float32)
    t = jnp.asarray(rng.integers(0, 37, (2, 9)), jnp.int32)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))

    def plain(e, c):
        return cce_jax.linear_cross_entropy(e, c, t, impl=impl, shift=1, reduction="sum")

    @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
    def sharded(e, c, t):
        return jax.lax.psum(cce_jax.linear_cross_entropy(e, c, t, impl=impl, shift=1, reduction="sum"), "data")

    want = jax.value_and_grad(plain, argnums=(0, 1))(e, c)
    got = jax.jit(jax.value_and_grad(lambda e, c: sharded(e, c, t), argnums=(0, 1)))(e, c)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
