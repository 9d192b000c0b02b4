"""impl="xla" never materialises the (N, V) logits: its compiled temporary memory is O(block) on the one-pass
forward and the recompute path, and O(one chunk of logits) on the three-pass path, never O(N * V).

Only compilation happens here (``jit(...).lower(...).compile().memory_analysis()`` on abstract shapes), so the
large shape costs no execution time. The dense implementation is compiled at the same shape as a control: it
must exceed N * V * 4 bytes, which proves the measurement would catch a materialised logits matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from cce_jax import XlaConfig, linear_cross_entropy

N, D, V = 2048, 64, 32771  # V prime: the last vocabulary block is ragged
BLOCKS = XlaConfig(block_n=256, block_v=1024)
F32 = 4
LOGITS_BYTES = N * V * F32  # 268 MB
TILE_BYTES = BLOCKS.block_n * BLOCKS.block_v * F32  # 1 MB


BUDGET = 8 * 2**20  # three-pass: the chunk's logits buffer


def _temp_bytes(impl, grad: bool, **options) -> int:
    def loss(e, c, bias, targets):
        return linear_cross_entropy(e, c, targets, bias, impl=impl, softcap=30.0, filter_eps=None, **options)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2)) if grad else loss
    args = (
        jax.ShapeDtypeStruct((N, D), jnp.float32),
        jax.ShapeDtypeStruct((V, D), jnp.float32),
        jax.ShapeDtypeStruct((V,), jnp.float32),
        jax.ShapeDtypeStruct((N,), jnp.int32),
    )
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    assert analysis is not None, "this backend gives no memory analysis"
    return int(analysis.temp_size_in_bytes)


def _xla_bound(grad: bool) -> int:
    """A few live (block_n, block_v) float32 tiles (logits, probabilities, gradient, masks), per-token float32
    vectors (lse, target logit, cotangents), and in the backward the float32 (N, D) dE accumulator plus one
    vocabulary block's float32 dC/dbias accumulators and its merge buffer."""
    bound = 4 * TILE_BYTES + 16 * N * F32
    if grad:
        bound += N * D * F32 + 4 * BLOCKS.block_v * (D + 1) * F32
    return bound


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "value_and_grad"])
def test_xla_temp_memory_is_blockwise(grad):
    temp = _temp_bytes(BLOCKS, grad, grad_path="recompute")
    bound = _xla_bound(grad)
    assert bound < LOGITS_BYTES / 20  # the bound itself is far below the logits
    assert temp <= bound, f"xla temp {temp / 2**20:.1f} MiB exceeds the blockwise bound {bound / 2**20:.1f} MiB"


def test_three_pass_temp_memory_follows_the_budget():
    """The three-pass path holds one chunk: its float32 logits and their gradient (float32 here: f32 inputs),
    plus an elementwise temporary of the same size at most, the float32 dE rows and per-token vectors."""
    temp = _temp_bytes(BLOCKS, True, grad_path="three_pass", max_temp_bytes=BUDGET)
    bound = 2 * BUDGET + N * D * F32 + 16 * N * F32
    assert bound < LOGITS_BYTES / 10
    assert temp <= bound, f"three-pass temp {temp / 2**20:.1f} MiB exceeds {bound / 2**20:.1f} MiB"


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "value_and_grad"])
def test_dense_control_materialises_logits(grad):
    """The control: the same measurement sees the dense implementation's (N, V) float32 logits."""
    temp = _temp_bytes("dense", grad)
    assert temp >= LOGITS_BYTES, f"dense temp {temp / 2**20:.1f} MiB below the logits' {LOGITS_BYTES / 2**20:.1f} MiB"
