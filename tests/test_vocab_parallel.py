"""Vocabulary parallelism: host-side helpers here, the 8-device cases in a subprocess.

The multi-device cases live in ``tests/vocab_parallel_cases.py``; they need
``--xla_force_host_platform_device_count=8``, which only takes effect before jax is imported, while this pytest
process has imported jax already (other test files). :func:`test_eight_device_cases` runs that file in a fresh
interpreter and, when anything fails, reports the failing cases with their assertion messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import vocab_parallel as vp

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("vocab, shards", [(61, 8), (64, 8), (257, 4), (7, 3), (5, 8), (1, 1)])
def test_vocab_partition_is_balanced_and_contiguous(vocab, shards):
    parts = vp.vocab_partition(vocab, shards)
    assert len(parts) == shards
    assert parts[0][0] == 0 and parts[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes
    assert vp.shard_length(parts) == -(-vocab // shards)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_vocab_partition_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive int"):
        vp.vocab_partition(bad, 4)
    with pytest.raises(ValueError, match="positive int"):
        vp.vocab_partition(10, bad)


@pytest.mark.parametrize("layout_axis", [0, 1])
def test_pad_and_unpad_vocab_shards(rng, layout_axis):
    vocab, d = 11, 3
    parts = ((4, 8), (0, 4), (8, 11))  # device order need not be vocabulary order
    x = rng.standard_normal((vocab, d) if layout_axis == 0 else (d, vocab)).astype(np.float32)
    padded = np.asarray(vp.pad_vocab_shards(jnp.asarray(x), parts, axis=layout_axis))
    rows = np.moveaxis(padded, layout_axis, 0)
    src = np.moveaxis(x, layout_axis, 0)
    assert rows.shape[0] == 3 * 4
    np.testing.assert_array_equal(rows[0:4], src[4:8])
    np.testing.assert_array_equal(rows[4:8], src[0:4])
    np.testing.assert_array_equal(rows[8:11], src[8:11])
    np.testing.assert_array_equal(rows[11], 0.0)  # padding
    back = vp.unpad_vocab_shards(jnp.asarray(padded), parts, axis=layout_axis)
    np.testing.assert_array_equal(np.asarray(back), x)
    bias = rng.standard_normal(vocab).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vp.unpad_vocab_shards(vp.pad_vocab_shards(bias, parts), parts)), bias)


@pytest.mark.parametrize(
    "parts, match",
    [(((0, 3), (4, 6)), "contiguous"), (((0, 3), (2, 6)), "contiguous"), (((1, 3), (3, 6)), "contiguous"),
     ((), "at least one"), (((0, 0),), "at least one vocabulary row"), ((3, 4), "pairs")],
)
def test_bad_partitions_are_rejected(parts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vp.vocab_parallel_options("v", parts)


def test_pad_vocab_shards_checks_the_vocabulary_size():
    with pytest.raises(ValueError, match="partition's vocabulary size 8"):
        vp.pad_vocab_shards(jnp.zeros((9, 2)), vp.vocab_partition(8, 2))
    with pytest.raises(ValueError, match="2 shards x 4"):
        vp.unpad_vocab_shards(jnp.zeros((9, 2)), vp.vocab_partition(8, 2))


def test_vocab_parallel_outside_shard_map_names_the_axis():
    e, c, t = jnp.zeros((3, 4)), jnp.zeros((5, 4)), jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="'vocab' is not a bound mesh axis"):
        cce_jax.linear_cross_entropy(e, c, t, vocab_parallel=cce_jax.VocabParallelOptions("vocab"), impl="xla")


def test_eight_device_cases():
    """Runs tests/vocab_parallel_cases.py on 8 virtual CPU devices (see the module docstring)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", str(TESTS / "vocab_parallel_cases.py"), "-q", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-rf", "--tb=short", "--durations=5"]
    proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        summary = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        pytest.fail(
            f"{len(summary)} of the 8-device cases failed (exit {proc.returncode}):\n" + "\n".join(summary)
            + "\n\n--- subprocess output (tail) ---\n" + out[-12000:],
            pytrace=False,
        )
    assert " passed" in out, out[-2000:]
