"""Bad arguments fail fast, at trace time, with a ValueError/TypeError naming the argument and what was expected.

Nothing here compiles a loss: every case must be rejected before any computation starts.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import XlaConfig, compute_z_loss, linear_cross_entropy

N, D, V = 6, 5, 11
E = jnp.ones((N, D), jnp.float32)
C = jnp.ones((V, D), jnp.float32)
T = jnp.zeros((N,), jnp.int32)


def _call(**overrides):
    args = dict(e=E, c=C, targets=T)
    args.update(overrides)
    return linear_cross_entropy(args.pop("e"), args.pop("c"), args.pop("targets"), **args)


# (id, overrides, exception, regex that must appear: the argument's name and the expected value or shape)
BAD = [
    ("D-mismatch", dict(c=jnp.ones((V, D + 1))), ValueError, r"c must be \(V, D\) with D = e.shape\[-1\] = 5"),
    ("D-mismatch-dv", dict(c=jnp.ones((V, D)), classifier_layout="dv"), ValueError,
     r"c must be \(D, V\) with D = e.shape\[-1\] = 5"),
    ("c-not-2d", dict(c=jnp.ones((V, D, 1))), ValueError, r"c must be 2-D"),
    ("empty-vocab", dict(c=jnp.ones((0, D))), ValueError, r"c must have at least one vocabulary entry"),
    ("scalar-e", dict(e=jnp.ones(()), targets=jnp.zeros((), jnp.int32)), ValueError,
     r"e must have shape \(\.\.\., D\)"),
    ("e-not-array", dict(e=[[1.0] * D] * N), TypeError, r"e must be an array"),
    ("targets-shape", dict(targets=jnp.zeros((N + 1,), jnp.int32)), ValueError,
     r"targets.shape must equal e.shape\[:-1\] = \(6,\)"),
    ("targets-float", dict(targets=jnp.zeros((N,), jnp.float32)), TypeError, r"targets must be an integer array"),
    ("e-int", dict(e=jnp.ones((N, D), jnp.int32)), TypeError, r"e must be a floating-point array"),
    ("c-int", dict(c=jnp.ones((V, D), jnp.int32)), TypeError, r"c must be a floating-point array"),
    ("dtype-mismatch", dict(c=jnp.ones((V, D), jnp.bfloat16)), TypeError, r"c must have the dtype of e \(float32\)"),
    ("bias-shape", dict(bias=jnp.ones((V + 1,))), ValueError, r"bias must have shape \(V,\) = \(11,\)"),
    ("bias-2d", dict(bias=jnp.ones((1, V))), ValueError, r"bias must have shape \(V,\) = \(11,\)"),
    ("bias-int", dict(bias=jnp.ones((V,), jnp.int32)), TypeError, r"bias must be a floating-point array"),
    ("reduction", dict(reduction="avg"), ValueError, r"reduction must be one of \"mean\", \"sum\", \"none\""),
    ("impl", dict(impl="triton"), ValueError, r"impl must be one of 'auto', 'dense', 'xla'"),
    ("impl-type", dict(impl=3), ValueError, r"impl must be one of"),
    ("layout", dict(classifier_layout="vdx"), ValueError, r"classifier_layout must be \"vd\".*or \"dv\""),
    ("shift-too-large", dict(shift=N), ValueError, r"shift must satisfy 0 <= shift < targets.shape\[-1\] = 6"),
    ("shift-negative", dict(shift=-1), ValueError, r"shift must satisfy 0 <= shift"),
    ("shift-float", dict(shift=1.0), TypeError, r"shift must be an int or bool"),
    ("shift-scalar-targets", dict(e=jnp.ones((D,)), targets=jnp.zeros((), jnp.int32), shift=1), ValueError,
     r"shift requires targets with a sequence dimension"),
    ("filter-eps-int", dict(filter_eps=1), TypeError, r"filter_eps must be \"auto\", a float or None, got the int"),
    ("filter-eps-negative", dict(filter_eps=-1e-3), ValueError, r"filter_eps must be \"auto\", a positive float"),
    ("filter-eps-zero", dict(filter_eps=0.0), ValueError, r"filter_eps must be \"auto\", a positive float"),
    ("filter-eps-str", dict(filter_eps="on"), ValueError, r"filter_eps must be \"auto\", a float or None"),
    ("label-smoothing-1", dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
    ("label-smoothing-neg", dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\)"),
    ("label-smoothing-str", dict(label_smoothing="0.1"), TypeError, r"label_smoothing must be a float in \[0, 1\)"),
    ("softcap-zero", dict(softcap=0.0), ValueError, r"softcap must be None or a positive number"),
    ("softcap-negative", dict(softcap=-30.0), ValueError, r"softcap must be None or a positive number"),
    ("softcap-bool", dict(softcap=True), ValueError, r"softcap must be None or a positive number"),
    ("weights-shape", dict(weights=jnp.ones((N, 1))), ValueError, r"weights.shape must equal targets.shape = \(6,\)"),
    ("weights-int", dict(weights=jnp.ones((N,), jnp.int32)), TypeError, r"weights must be a floating-point array"),
    ("vocab-parallel-type", dict(vocab_parallel="model"), TypeError,
     r"vocab_parallel must be a VocabParallelOptions or None"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int"),
    ("return-lse-int", dict(return_lse=1), TypeError, r"return_lse must be a bool"),
    ("check-targets-str", dict(check_targets="yes"), TypeError, r"check_targets must be a bool"),
    ("accum-e-none", dict(accum_e_fp32=None), TypeError, r"accum_e_fp32 must be a bool"),
    ("filter-c-int", dict(filter_c_grad=0), TypeError, r"filter_c_grad must be a bool"),
    ("interpret-str", dict(interpret="no"), TypeError, r"interpret must be a bool"),
]


@pytest.mark.parametrize("overrides,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_argument(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _call(**overrides)


def test_valid_call_passes():
    """The baseline arguments used above are accepted (so every failure above is due to its one change)."""
    loss = _call(impl="dense", shift=True, filter_eps=1e-3, label_smoothing=0.0, softcap=30.0,
                 weights=jnp.ones((N,)), bias=jnp.zeros((V,)))
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("field", ["block_n", "block_v"])
@pytest.mark.parametrize("value", [0, -8, 16.0])
def test_xla_config_rejects_bad_blocks(field, value):
    with pytest.raises(ValueError, match=rf"XlaConfig.{field} must be a positive int"):
        XlaConfig(**{field: value})


LSE = jnp.ones((2, 4), jnp.float32)
TARGETS = jnp.zeros((2, 5), jnp.int32)

Z_BAD = [
    ("reduction", dict(lse=LSE, reduction="max"), ValueError, r"reduction must be one of \"mean\", \"sum\", \"none\""),
    ("shape", dict(lse=LSE, targets=TARGETS), ValueError,
     r"lse.shape must equal targets.shape with the last axis shortened by shift \(\(2, 5\)\)"),
    ("shape-after-shift", dict(lse=LSE, targets=TARGETS, shift=2), ValueError,
     r"lse.shape must equal targets.shape .*\(\(2, 3\)\)"),
    ("targets-float", dict(lse=LSE, targets=jnp.zeros((2, 5))), TypeError, r"targets must be an integer array"),
    ("shift-out-of-range", dict(lse=LSE, targets=TARGETS, shift=5), ValueError,
     r"shift must satisfy 0 <= shift < targets.shape\[-1\] = 5"),
    ("shift-float", dict(lse=LSE, targets=TARGETS, shift=0.5), TypeError, r"shift must be an int or bool"),
]


@pytest.mark.parametrize("kwargs,exc,match", [b[1:] for b in Z_BAD], ids=[b[0] for b in Z_BAD])
def test_compute_z_loss_bad_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        compute_z_loss(**kwargs)


def test_compute_z_loss_valid_shift():
    assert float(compute_z_loss(LSE, TARGETS, shift=1)) == 1.0

