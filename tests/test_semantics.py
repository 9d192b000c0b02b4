"""Every option of ``linear_cross_entropy`` / ``compute_z_loss`` against the float64 reference, for the pure-JAX
implementations: ``"dense"`` (materialised logits) and ``"xla"`` with small blocks so that several token and
vocabulary blocks, ragged last blocks and the clamped-block masking are all exercised.

Shapes are unaligned on purpose (V prime, D = 37 is not a multiple of any block, N not a multiple of block_n).
Each parametrisation is one jitted forward+VJP; the number of distinct compiled programs is kept modest because
CPU compile time dominates the suite.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax import XlaConfig, compute_z_loss, linear_cross_entropy
from reference import (
    Tolerance,
    assert_close,
    check_against_reference,
    f64,
    make_inputs,
    reference_grads,
    reference_loss,
    reference_z_loss,
    reference_z_loss_lse_grad,
    run_loss_vjp,
)

# 39 tokens over blocks of 8 (last block clamped), V = 131 over blocks of 16 (9 blocks, last one ragged).
SMALL = XlaConfig(block_n=8, block_v=16)
IMPLS = [pytest.param("dense", id="dense"), pytest.param(SMALL, id="xla-small")]
BATCH = (3, 13)
D, V = 37, 131

# (id, input flags, options). Combinations chosen so that every pair of interacting options meets at least once:
# shift x ignore (ignored tokens everywhere) x each reduction, softcap x bias (cap after bias), weights x
# shift (weights slice with targets) x mean (weighted denominator), label smoothing x softcap x "none", lse x
# everything, both classifier layouts, and an ignore_index that is also a valid vocabulary id.
CASES = [
    ("mean", dict(), dict(reduction="mean")),
    ("sum-bias", dict(bias=True), dict(reduction="sum")),
    ("none-shift-lse", dict(), dict(reduction="none", shift=1, return_lse=True)),
    ("mean-softcap-bias-lse", dict(bias=True, logit_scale=3.0), dict(reduction="mean", softcap=2.0, return_lse=True)),
    ("mean-weights-shift", dict(weights=True), dict(reduction="mean", shift=2)),
    ("sum-weights-smooth-bias", dict(weights=True, bias=True), dict(reduction="sum", label_smoothing=0.1)),
    ("none-smooth-softcap-shift", dict(logit_scale=3.0), dict(reduction="none", label_smoothing=0.3, softcap=2.5,
                                                               shift=1, return_lse=True)),
    ("dv-mean-softcap-bias", dict(layout="dv", bias=True, logit_scale=3.0), dict(reduction="mean", softcap=2.0,
                                                                                 return_lse=True)),
    ("dv-everything", dict(layout="dv", bias=True, weights=True, logit_scale=3.0),
     dict(reduction="none", softcap=3.0, label_smoothing=0.2, shift=3, return_lse=True)),
    ("ignore-index-in-vocab", dict(weights=True, ignore_index=5, ignore_frac=0.3), dict(reduction="mean")),
]
CASE_IDS = [c[0] for c in CASES]


def _case(case_id):
    return next(c for c in CASES if c[0] == case_id)


def _check_case(rng, case_id, impl, dtype, shape=BATCH, **extra):
    _, flags, options = _case(case_id)
    flags = dict(flags)
    logit_scale = flags.pop("logit_scale", 1.0)
    inputs = make_inputs(rng, shape, D, V, dtype, logit_scale=logit_scale, **flags)
    return check_against_reference(inputs, rng, impl=impl, what=case_id, **options, **extra)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_options_float32(rng, case_id, impl):
    """float32 inputs: dense and xla agree with the float64 reference to float32 precision (1e-5)."""
    _check_case(rng, case_id, impl, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case_id", ["mean-softcap-bias-lse", "dv-everything"])
def test_options_half(rng, case_id, dtype, impl):
    """Half inputs with the default (active) gradient filter match the reference to half-precision tolerance."""
    _check_case(rng, case_id, impl, dtype)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_default_blocks_and_auto(rng, impl):
    """The default block config (one block covers these shapes) and impl="auto" (dense logits on a CPU at this size)."""
    _check_case(rng, "dv-everything", impl, jnp.float32, shape=(45,))


def test_accumulation_and_filter_flags_accepted(rng):
    """accum_*_fp32 and filter_*_grad with filtering on leave float32 results at reference precision."""
    _check_case(rng, "sum-weights-smooth-bias", SMALL, jnp.float32, accum_e_fp32=True, accum_c_fp32=True,
                filter_e_grad=False, filter_c_grad=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape,d,v,options",
    [
        pytest.param((1,), 37, 131, dict(reduction="mean"), id="N1"),
        pytest.param((), 37, 131, dict(reduction="none", softcap=2.0), id="scalar-token"),
        pytest.param((2, 5), 37, 131, dict(reduction="none", shift=4), id="shift-T-1"),
        pytest.param((11,), 37, 3, dict(reduction="sum", label_smoothing=0.2), id="V3-below-block"),
        pytest.param((11,), 1, 17, dict(reduction="mean"), id="D1-V17"),
        pytest.param((7,), 5, 1, dict(reduction="none", label_smoothing=0.1), id="V1"),
    ],
)
def test_edge_shapes(rng, shape, d, v, options, impl):
    inputs = make_inputs(rng, shape, d, v, jnp.float32, bias=True, ignore_frac=0.0 if len(shape) == 0 else 0.2)
    check_against_reference(inputs, rng, impl=impl, return_lse=True, what=f"shape {shape} D{d} V{v}", **options)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_tokens(impl):
    """An empty batch: mean is 0.0, "none" is empty, gradients are zero."""
    e = jnp.zeros((0, 9), jnp.float32)
    c = jnp.ones((13, 9), jnp.float32)
    targets = jnp.zeros((0,), jnp.int32)
    f = lambda e, c: linear_cross_entropy(e, c, targets, impl=impl)  # noqa: E731
    loss, (de, dc) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(e, c)
    assert float(loss) == 0.0 and de.shape == (0, 9) and not np.any(dc)
    none = linear_cross_entropy(e, c, targets, impl=impl, reduction="none")
    assert none.shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_huge_logits(rng, dtype, impl):
    """Logits of size ~1e3 must not overflow the lse or the softmax.

    A float32 logit of magnitude L carries absolute rounding error ~L * 2**-24 * sqrt(D) ~ 1e-3 at L = 1e3, which
    becomes the same relative error in softmax probabilities (hence in gradients) and an absolute error of that
    size in the loss: tolerances scale with L instead of the O(1)-logit defaults.
    """
    inputs = make_inputs(rng, BATCH, D, V, dtype, bias=True, weights=True, logit_scale=1e3)
    loose = Tolerance(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else None
    check_against_reference(inputs, rng, impl=impl, return_lse=True, what="logit scale 1e3", reduction="none",
                            softcap=None, shift=1, loss_tol=loose,
                            grad_tol=Tolerance(2e-3, 2e-3) if dtype == jnp.float32 else None)


# --------------------------------------------------------------------------------------------------------------
# z-loss
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("z_reduction", ["mean", "none"])
def test_z_loss_backpropagates(rng, z_reduction, impl):
    """``loss + lam * z_loss(lse)``: the lse cotangent reaches de, dc and dbias exactly as in the reference."""
    shift, lam = 1, 0.3
    inputs = make_inputs(rng, BATCH, D, V, jnp.float32, bias=True, logit_scale=2.0)
    g_z = rng.standard_normal((BATCH[0], BATCH[1] - shift)) if z_reduction == "none" else 1.0

    def objective(e, c, bias, targets):
        loss, lse = linear_cross_entropy(e, c, targets, bias, impl=impl, shift=shift, softcap=4.0,
                                         return_lse=True)
        z = compute_z_loss(lse, targets, shift=shift, reduction=z_reduction)
        return loss + lam * jnp.sum(jnp.asarray(g_z, jnp.float32) * z), (loss, lse, z)

    (_, (loss, lse, z)), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        inputs.e, inputs.c, inputs.bias, inputs.targets)
    sem = dict(shift=shift, softcap=4.0)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    ref_z = reference_z_loss(ref.lse, inputs.targets, shift=shift, reduction=z_reduction)
    assert_close(loss, ref.loss, jnp.float32, what="loss")
    assert_close(lse, ref.lse, jnp.float32, what="lse")
    assert_close(z, ref_z, jnp.float32, what="z-loss")
    g_lse = lam * reference_z_loss_lse_grad(ref.lse, inputs.targets, shift=shift, reduction=z_reduction, g=g_z)
    ref_grads = reference_grads(inputs.e, inputs.c, inputs.targets, g_loss=1.0, g_lse=g_lse, **inputs.kwargs(),
                                **sem)
    for name, got, want in zip(("de", "dc", "dbias"), grads, ref_grads):
        assert_close(got, want, jnp.float32, "grad", name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compute_z_loss_values(rng, reduction):
    lse = jnp.asarray(rng.standard_normal((2, 6)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 5, (2, 7)), jnp.int32).at[0, 3].set(-100).at[1, 6].set(-100)
    got = compute_z_loss(lse, targets, shift=1, reduction=reduction)
    assert_close(got, reference_z_loss(lse, targets, shift=1, reduction=reduction), jnp.float32, what="z-loss")
    # targets=None counts every position; an ignored position really is excluded (values differ).
    all_tokens = compute_z_loss(lse, reduction=reduction)
    assert_close(all_tokens, reference_z_loss(lse, reduction=reduction), jnp.float32, what="z-loss all")
    assert not np.allclose(f64(all_tokens), f64(got))


# --------------------------------------------------------------------------------------------------------------
# Ignored and out-of-range targets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_ignored(rng, impl):
    """Every reduction gives 0.0, the lse and z-loss are 0.0, and all gradients are exactly zero and finite."""
    inputs = make_inputs(rng, BATCH, D, V, jnp.float32, bias=True, weights=True, ignore_frac=1.0)
    assert np.all(np.asarray(inputs.targets) == -100)

    def objective(e, c, bias):
        outs = []
        for reduction in ("mean", "sum", "none"):
            loss, lse = linear_cross_entropy(e, c, inputs.targets, bias, weights=inputs.weights, impl=impl,
                                             reduction=reduction, shift=1, label_smoothing=0.1, softcap=5.0,
                                             return_lse=True)
            outs += [loss, lse, compute_z_loss(lse, inputs.targets, shift=1, reduction=reduction)]
        total = sum(jnp.sum(x) for x in outs)
        return total, outs

    (_, outs), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        inputs.e, inputs.c, inputs.bias)
    for x in outs:
        assert np.all(np.asarray(x) == 0.0), x
    assert outs[6].shape == (BATCH[0], BATCH[1] - 1)
    for g in grads:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and not np.any(g), g


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_target_is_nan(rng, impl):
    """A non-ignored target outside [0, V) poisons its own token (NaN) and so the mean; other tokens are exact."""
    inputs = make_inputs(rng, (17,), D, V, jnp.float32)
    targets = inputs.targets.at[4].set(V).at[9].set(-1)

    @jax.jit
    def both(e, c, targets):
        mean = linear_cross_entropy(e, c, targets, impl=impl)
        none, lse = linear_cross_entropy(e, c, targets, impl=impl, reduction="none", return_lse=True)
        return mean, none, lse

    mean, none, lse = both(inputs.e, inputs.c, targets)
    assert np.isnan(float(mean))
    none = np.asarray(none)
    assert np.isnan(none[4]) and np.isnan(none[9]) and np.isnan(none).sum() == 2
    ref = reference_loss(inputs.e, inputs.c, targets, reduction="none")
    assert_close(none, ref.loss, jnp.float32, what="per-token loss with bad targets")


BAD_TARGET_MESSAGE = (
    r"targets: 2 target id\(s\) outside \[0, 131\) that are not ignore_index; first offending value 131"
)


def test_check_targets_raises(rng):
    inputs = make_inputs(rng, (17,), D, V, jnp.float32)
    bad = inputs.targets.at[4].set(V).at[9].set(-1)
    f = lambda e, c, t: linear_cross_entropy(e, c, t, impl=SMALL, check_targets=True)  # noqa: E731
    # Eagerly the callback's ValueError propagates; under jit the runtime wraps it (a RuntimeError subclass),
    # so assert on the message, which names the argument and the valid range.
    with pytest.raises((ValueError, RuntimeError), match=BAD_TARGET_MESSAGE):
        jax.block_until_ready(f(inputs.e, inputs.c, bad))
    jitted = jax.jit(f)
    with pytest.raises((ValueError, RuntimeError), match=BAD_TARGET_MESSAGE):
        jax.block_until_ready(jitted(inputs.e, inputs.c, bad))
    # In-range and ignored targets pass, and the loss is unchanged by the check.
    good = jitted(inputs.e, inputs.c, inputs.targets)
    assert_close(good, reference_loss(inputs.e, inputs.c, inputs.targets).loss, jnp.float32, what="checked loss")


# --------------------------------------------------------------------------------------------------------------
# jit / eager / grad
# --------------------------------------------------------------------------------------------------------------


def test_eager_grad_matches_reference(rng):
    """Without jit (op-by-op), jax.grad of the xla impl still matches the reference."""
    inputs = make_inputs(rng, BATCH, D, V, jnp.float32, bias=True)
    f = lambda e, c, b: linear_cross_entropy(e, c, inputs.targets, b, impl=SMALL, shift=1)  # noqa: E731
    loss = f(inputs.e, inputs.c, inputs.bias)
    grads = jax.grad(f, argnums=(0, 1, 2))(inputs.e, inputs.c, inputs.bias)
    assert_close(loss, reference_loss(inputs.e, inputs.c, inputs.targets, inputs.bias, shift=1).loss, jnp.float32)
    ref = reference_grads(inputs.e, inputs.c, inputs.targets, inputs.bias, g_loss=1.0, shift=1)
    for name, got, want in zip(("de", "dc", "dbias"), grads, ref):
        assert_close(got, want, jnp.float32, "grad", name)


# --------------------------------------------------------------------------------------------------------------
# Gradient filtering (xla impl)
# --------------------------------------------------------------------------------------------------------------


def _peaked_inputs(rng, dtype):
    """LM-like peaked softmax: targets among 8 "frequent" columns carrying a +10 bias, so every other column has
    probability ~e^-12 < 2**-12 and whole (8 x 16) tiles beyond the first vocabulary block are filterable."""
    inputs = make_inputs(rng, BATCH, D, V, dtype, bias=True)
    frequent = jnp.asarray(rng.integers(0, 8, BATCH), jnp.int32)
    targets = jnp.where(inputs.targets == inputs.ignore_index, inputs.targets, frequent)
    bias = jnp.zeros((V,), dtype).at[:8].set(10.0)
    return dataclasses.replace(inputs, targets=targets, bias=bias)


def test_default_filter_bf16_acts_and_stays_within_tolerance(rng):
    """bf16 with filter_eps="auto" (2**-12): tiles really are skipped (their dC columns are exactly zero, which
    filter_eps=None does not give), yet loss and gradients still match the float64 reference to bf16 tolerance."""
    inputs = _peaked_inputs(rng, jnp.bfloat16)
    # The recompute path: impl="xla"'s three-pass path computes every chunk densely and skips nothing.
    filtered = check_against_reference(inputs, rng, impl=SMALL, what="bf16 auto filter", reduction="mean",
                                       grad_path="recompute")
    exact = check_against_reference(inputs, rng, impl=SMALL, what="bf16 no filter", reduction="mean",
                                     filter_eps=None, grad_path="recompute")
    rare = slice(16, None)  # vocabulary blocks with no frequent column
    assert not np.any(np.asarray(filtered["dc"][rare], np.float32)), "no tile was skipped: the filter did not act"
    assert np.any(np.asarray(exact["dc"][rare], np.float32)), "filter_eps=None must not skip tiles"


@pytest.mark.parametrize(
    "flags,filtered",
    [
        pytest.param(dict(filter_eps=None), (), id="off"),
        pytest.param(dict(filter_eps=0.5), ("de", "dc", "dbias"), id="both"),
        pytest.param(dict(filter_eps=0.5, filter_e_grad=False), ("dc", "dbias"), id="c-only"),
        pytest.param(dict(filter_eps=0.5, filter_c_grad=False), ("de",), id="e-only"),
        pytest.param(dict(filter_eps=0.5, label_smoothing=0.1), (), id="off-under-smoothing"),
    ],
)
def test_large_filter_eps_really_filters(rng, flags, filtered):
    """With filter_eps = 0.5 on O(1) logits every tile without a target is skipped: the filtered gradients must be
    far from the reference, while unfiltered ones (filter_eps=None, the other gradient when one side is exempt,
    label smoothing, which disables filtering) match it tightly."""
    inputs = make_inputs(rng, BATCH, D, V, jnp.float32, bias=True)
    flags = dict(flags)
    smoothing = flags.pop("label_smoothing", 0.0)
    sem = dict(reduction="sum", label_smoothing=smoothing)
    ref = reference_grads(inputs.e, inputs.c, inputs.targets, g_loss=1.0, **inputs.kwargs(), **sem)
    loss, _, grads = run_loss_vjp(inputs, 1.0, impl=SMALL, grad_path="recompute", **sem, **flags)
    assert_close(loss, reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem).loss,
                 jnp.float32, what="loss (the forward never filters)")
    for name, got, want in zip(("de", "dc", "dbias"), grads, ref):
        if name in filtered:
            err = np.abs(f64(got) - want).max() / np.abs(want).max()
            assert err > 1e-2, f"{name}: filter_eps=0.5 changed nothing (relative error {err:.1e})"
        else:
            assert_close(got, want, jnp.float32, "grad", name)


# --------------------------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_grads_match_finite_differences(rng, reduction):
    """The analytic float64 gradients of the reference agree with central differences of its own loss and lse
    (every option on), so the reference's backward cannot drift from its forward."""
    inputs = make_inputs(rng, (2, 6), 5, 7, jnp.float32, layout="dv", bias=True, weights=True, logit_scale=2.0)
    e, c, bias = f64(inputs.e), f64(inputs.c), f64(inputs.bias)
    kw = dict(inputs.kwargs(), softcap=1.5, reduction=reduction, shift=2, label_smoothing=0.2)
    kw.pop("bias")
    ref = reference_loss(e, c, inputs.targets, bias, **kw)
    g_loss = 0.7 if reduction == "mean" else rng.standard_normal(ref.loss.shape)
    g_lse = rng.standard_normal(ref.lse.shape)

    def objective(e, c, bias):
        r = reference_loss(e, c, inputs.targets, bias, **kw)
        return float(np.sum(g_loss * r.loss) + np.sum(g_lse * r.lse))

    analytic = reference_grads(e, c, inputs.targets, bias, g_loss=g_loss, g_lse=g_lse, **kw)
    step = 1e-6
    for which, grad in enumerate(analytic):
        numeric = np.zeros_like(grad)
        for idx in np.ndindex(grad.shape):
            args_p, args_m = [e.copy(), c.copy(), bias.copy()], [e.copy(), c.copy(), bias.copy()]
            args_p[which][idx] += step
            args_m[which][idx] -= step
            numeric[idx] = (objective(*args_p) - objective(*args_m)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(grad).max()))
