"""The three-pass training path (:mod:`cce_jax.three_pass`), z-loss, ``grad_path`` and ``max_temp_bytes`` against the
float64 reference.

Two implementations run the path: plain XLA (``XlaConfig(chunk_tokens=16)``) and the Pallas kernels in interpret
mode (``KERNELS``: 16 x 32 tiles, chunks of 32 tokens). Shapes are unaligned on purpose: N = 39 tokens give 3 XLA
chunks / 2 kernel chunks with a padded last one, V = 131 (prime) gives 5 kernel vocabulary tiles with a ragged last
one (3 columns), D = 37 is not a multiple of any block. Every scalar loss is differentiated with a non-unit
cotangent (the backward rule scales the gradients the forward rule stored). CPU compile time dominates, so the
number of distinct compiled programs is kept small.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from cce_jax import KernelConfig, XlaConfig, compute_z_loss, linear_cross_entropy
from cce_jax import three_pass as three_pass_lib
from cce_jax.stats import LogitSpec, LossCoefficients
from pallas_kernels.backward import BackwardConfig
from pallas_kernels.lse_forward import ForwardConfig
from pallas_kernels.mosaic_forward import MosaicForwardConfig
from reference import (
    Tolerance,
    assert_close,
    f64,
    make_inputs,
    reference_grads,
    reference_loss,
    reference_z_loss,
    reference_z_loss_lse_grad,
    run_loss_vjp,
)

XLA = XlaConfig(block_n=8, block_v=16, chunk_tokens=16)
KERNELS = KernelConfig(
    forward=ForwardConfig(block_n=16, block_v=32, block_d=32),
    backward=BackwardConfig(block_n=16, block_v=32, block_d=32, block_dout=32),
    chunk_tokens=32,
)
IMPLS = [pytest.param(XLA, id="xla"), pytest.param(KERNELS, id="kernels")]
BATCH = (3, 13)
D, V = 37, 131
G_LOSS = -0.37  # cotangent of every scalar loss: neither 1 nor positive

_SEMANTIC = ("softcap", "reduction", "shift", "label_smoothing")


def _is_kernel(impl) -> bool:
    return isinstance(impl, KernelConfig)


def _vjp(inputs, impl, g_loss, g_lse=None, **options):
    """jit(vjp) of the library; the kernels run in interpret mode (no warning)."""
    return run_loss_vjp(inputs, g_loss, g_lse, impl=impl, interpret=True, **options)


def _reduction_factor(inputs, reduction, shift):
    """float64 per-token coefficient of a token's loss in the reduced loss (flat, after shift): weight (1.0
    without weights) on valid tokens, divided by the weights' sum for "mean"."""
    t = np.asarray(inputs.targets)
    w = np.ones(t.shape) if inputs.weights is None else f64(inputs.weights)
    if shift:
        t, w = t[..., shift:], w[..., shift:]
    w = np.where(t != inputs.ignore_index, w, 0.0)
    if reduction == "mean":
        w = w / (w.sum() if w.sum() else 1.0)
    return w


def _expected(inputs, g_loss, g_lse=None, z_loss=0.0, **options):
    """float64 loss, lse and ``(de, dc, dbias)`` (with their rounding scales) of ``loss + z_loss * R(lse^2)``,
    ``R`` the loss's reduction with its weights (as api.py defines z_loss), for cotangents ``g_loss`` (loss) and
    ``g_lse`` (the returned lse)."""
    sem = {k: options[k] for k in _SEMANTIC if k in options}
    reduction, shift = sem.get("reduction", "mean"), sem.get("shift", 0)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    loss, loss_scale = ref.loss, ref.loss_scale
    h = np.zeros(ref.lse.shape) if g_lse is None else f64(g_lse)
    if z_loss:
        k = _reduction_factor(inputs, reduction, shift)
        z_tok = z_loss * k * np.square(ref.lse)
        loss = loss + (z_tok if reduction == "none" else z_tok.sum())
        loss_scale = loss_scale + float(np.abs(z_tok).max() if reduction == "none" else np.abs(z_tok).sum())
        h = h + z_loss * 2.0 * ref.lse * k * np.broadcast_to(f64(g_loss), ref.lse.shape)
    grads, scales = reference_grads(inputs.e, inputs.c, inputs.targets, g_loss=g_loss, g_lse=h, with_scales=True,
                                    **inputs.kwargs(), **sem)
    return dict(loss=loss, loss_scale=loss_scale, lse=ref.lse, lse_scale=ref.lse_scale, grads=grads, scales=scales)


def _assert_matches(got, want, inputs, what, loss_tol=None, grad_tol=None):
    loss, lse, grads = got
    dtype = inputs.e.dtype
    assert loss.dtype == jnp.float32, f"{what}: loss dtype {loss.dtype}"
    assert_close(loss, want["loss"], dtype, "loss", f"{what} loss", loss_tol, want["loss_scale"])
    if lse is not None:
        assert_close(lse, want["lse"], dtype, "loss", f"{what} lse", loss_tol, want["lse_scale"])
    for name, g, ref, scale in zip(("de", "dc", "dbias"), grads, want["grads"], want["scales"]):
        if ref is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g.dtype == dtype, f"{what}: {name} dtype {g.dtype}"
        assert_close(g, ref, dtype, "grad", f"{what} {name}", grad_tol, scale)


def _check(inputs, impl, *, g_loss=G_LOSS, g_lse=None, what="", loss_tol=None, grad_tol=None, **options):
    """Runs the library's jit(vjp) and asserts loss, lse and gradients against the reference; returns both."""
    got = _vjp(inputs, impl, g_loss, g_lse, **options)
    want = _expected(inputs, g_loss, g_lse, **options)
    _assert_matches(got, want, inputs, f"{what} impl={type(impl).__name__}", loss_tol, grad_tol)
    return got, want


@pytest.fixture
def three_pass_calls(monkeypatch):
    """Records each trace of the three-pass forward rule's gradient computation (``three_pass.gradients``, which
    the implementations bind when the loss is called), to tell which path ``grad_path`` picked."""
    calls = []
    original = three_pass_lib.gradients

    def spy(*args, **kwargs):
        calls.append(kwargs.get("plan"))
        return original(*args, **kwargs)

    monkeypatch.setattr(three_pass_lib, "gradients", spy)
    return calls


def _inputs(rng, dtype=jnp.float32, shape=BATCH, d=D, v=V, ignore_rows=None, **flags):
    inputs = make_inputs(rng, shape, d, v, dtype, **flags)
    if ignore_rows is not None:  # ignore these flat tokens (e.g. a whole chunk)
        flat = np.asarray(inputs.targets).reshape(-1).copy()
        flat[ignore_rows] = inputs.ignore_index
        inputs = dataclasses.replace(inputs, targets=jnp.asarray(flat.reshape(inputs.targets.shape)))
    return inputs


# --------------------------------------------------------------------------------------------------------------
# 1. Every option on the three-pass path
# --------------------------------------------------------------------------------------------------------------

# (id, dtype, input flags, options). Flat tokens 0..31 ignored = XLA chunks 0 and 1 and kernel chunk 0 hold no
# target at all; with ignore_index=5 an in-vocabulary id is the ignore marker.
CASES = [
    ("mean", jnp.float32, dict(), dict(reduction="mean")),
    ("dv-sum-bias", jnp.float32, dict(layout="dv", bias=True), dict(reduction="sum")),
    ("mean-weights-shift-ignored", jnp.float32, dict(weights=True, ignore_rows=slice(0, 20)),
     dict(reduction="mean", shift=2)),
    ("sum-weights-ignored-chunk", jnp.float32, dict(weights=True, ignore_index=5, ignore_rows=slice(0, 32)),
     dict(reduction="sum")),
    ("mean-smooth-softcap-bias", jnp.float32, dict(bias=True, logit_scale=3.0),
     dict(reduction="mean", label_smoothing=0.2, softcap=2.0)),
    ("dv-mean-everything", jnp.float32, dict(layout="dv", bias=True, weights=True, logit_scale=3.0),
     dict(reduction="mean", softcap=3.0, label_smoothing=0.1, shift=1)),
    ("bf16-mean-softcap-bias", jnp.bfloat16, dict(bias=True, logit_scale=3.0), dict(reduction="mean", softcap=2.0)),
    ("bf16-dv-sum-weights-shift-bias", jnp.bfloat16, dict(layout="dv", weights=True, bias=True),
     dict(reduction="sum", shift=1)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_three_pass_matches_reference(rng, case, impl, three_pass_calls):
    """grad_path="three_pass": loss, de, dc, dbias match the float64 reference for a cotangent of -0.37."""
    case_id, dtype, flags, options = case
    inputs = _inputs(rng, dtype, **flags)
    _check(inputs, impl, what=case_id, grad_path="three_pass", **options)
    plan = three_pass_calls[0]
    n = int(np.prod(BATCH))
    assert plan.num_chunks >= 2 and plan.chunk * plan.num_chunks > n, f"want several chunks, a padded last: {plan}"


# Token counts at which the last chunk overlaps the one before it instead of being padded (N a multiple of the
# plan's row alignment, not of the chunk): XLA 4 chunks of 16 from row 0, 16, 32, 40; kernels 2 of 32 from 0, 16.
OVERLAP_BATCH = {"xla": (4, 14), "kernels": (4, 12)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_overlapping_last_chunk(rng, impl, dtype, three_pass_calls):
    """The last chunk ends at row N and re-covers rows of the one before it with zero coefficients: every option
    and a random per-token lse cotangent still match the float64 reference, and no token is counted twice."""
    shape = OVERLAP_BATCH["kernels" if _is_kernel(impl) else "xla"]
    inputs = _inputs(rng, dtype, shape=shape, bias=True, weights=True, logit_scale=2.0, ignore_rows=slice(18, 30))
    out = (shape[0], shape[1] - 1)  # shift=1
    g_lse = rng.standard_normal(out) * rng.uniform(0.1, 3.0, out)
    options = dict(reduction="mean", shift=1, softcap=4.0, label_smoothing=0.1, z_loss=0.05)
    _check(inputs, impl, g_lse=g_lse, what="overlap", grad_path="three_pass", **options)
    plan = three_pass_calls[0]
    n = int(np.prod(shape))
    assert plan.overlaps(n) and plan.chunk * plan.num_chunks > n, f"want an overlapping last chunk: {plan}, N={n}"
    assert plan.starts(n)[-1] == n - plan.chunk


def test_plan_starts():
    plan = three_pass_lib.Plan(chunk=32, num_chunks=3, align=16)
    assert plan.starts(80) == [0, 32, 48] and plan.overlaps(80)
    assert plan.starts(72) == [0, 32, 64] and not plan.overlaps(72)  # 72 % 16: padded
    assert not three_pass_lib.Plan(chunk=32, num_chunks=1, align=16).overlaps(16)  # N below one chunk: padded


@pytest.mark.parametrize(
    "reduction,impl",
    [pytest.param("mean", XLA, id="mean-xla"), pytest.param("sum", KERNELS, id="sum-kernels")],
)
def test_weights_are_differentiable(rng, reduction, impl):
    """The backward rule's cotangents of the loss coefficients carry d loss / d weights: for "sum" it is
    ``g x_i`` and for "mean" ``g (x_i - loss) / sum(w)``, with ``x_i`` the token's smoothed nll plus its z-loss
    term (0 for ignored tokens and for the ``shift`` positions the weights' slice drops)."""
    shift, z_weight = 1, 0.2
    inputs = _inputs(rng, bias=True, weights=True, logit_scale=2.0)
    sem = dict(shift=shift, label_smoothing=0.1, softcap=3.0)

    def f(weights):
        return linear_cross_entropy(inputs.e, inputs.c, inputs.targets, inputs.bias, weights=weights, impl=impl,
                                    interpret=True, reduction=reduction, z_loss=z_weight, grad_path="three_pass",
                                    **sem)

    loss, dw = jax.jit(jax.value_and_grad(f))(inputs.weights)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, inputs.bias, ignore_index=inputs.ignore_index,
                         reduction="none", **sem)  # unweighted per-token losses
    valid = np.asarray(inputs.targets)[:, shift:] != inputs.ignore_index
    x = ref.loss + z_weight * np.where(valid, np.square(ref.lse), 0.0)
    w = f64(inputs.weights)[:, shift:]
    if reduction == "sum":
        want_loss, want = (w * x).sum(), x
    else:
        total = (w * valid).sum()
        want_loss = (w * x).sum() / total
        want = np.where(valid, (x - want_loss) / total, 0.0)
    assert_close(loss, want_loss, jnp.float32, what="loss")
    expected = np.zeros(inputs.weights.shape)
    expected[:, shift:] = want
    assert_close(dw, expected, jnp.float32, "grad", "d loss / d weights", scale=float(np.abs(x).max()))


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_logits_chunk_kernel_vocabulary_splits(rng, layout):
    """The chunk logits kernel for explicit vocabulary splits: 1 (all 5 tiles in one program), 2 (3 + 2 tiles)
    and 4 (2 + 2 + 1 tiles and an empty split): the split statistics combine into the exact lse, target logit and
    sum of logits, and ``z_rel + m`` rebuilds the logits (columns past V are -inf). The loss calls above use the
    default split count, one tile per split at these sizes."""
    from pallas_kernels.logits_chunk import logits_chunk
    from pallas_kernels.tiles import Problem

    n = 21  # 2 row blocks, the second ragged
    inputs = _inputs(rng, shape=(n,), bias=True, layout=layout, logit_scale=3.0)
    cfg = KERNELS.forward
    softcap = 4.0
    p = Problem(n=n, d=D, v=V, layout=layout, softcap=softcap, has_bias=True)
    targets = jnp.where(inputs.targets == inputs.ignore_index, -1, inputs.targets)
    c = f64(inputs.c) if layout == "vd" else f64(inputs.c).T
    z = softcap * np.tanh((f64(inputs.e) @ c.T + f64(inputs.bias)) / softcap)
    lse = np.log(np.exp(z).sum(axis=1))
    t = np.asarray(targets)
    target = np.where(t >= 0, z[np.arange(n), np.maximum(t, 0)], 0.0)
    num_tiles = -(-V // cfg.block_v)
    tol = Tolerance(1e-6, 1e-6)
    for splits in (1, 2, 4):
        z_rel, m, got_lse, got_target, got_sum = logits_chunk(
            inputs.e, inputs.c, inputs.bias, targets, p=p, cfg=cfg, need_sum=True, splits=splits, interpret=True)
        assert z_rel.shape == (n, num_tiles * cfg.block_v) and m.shape == (n, num_tiles)
        full = f64(z_rel) + np.repeat(f64(m), cfg.block_v, axis=1)
        assert np.all(full[:, V:] == -np.inf), "columns past V must be stored as -inf"
        assert_close(full[:, :V], z, jnp.float32, tol=tol, what=f"splits={splits} logits")
        assert_close(got_lse, lse, jnp.float32, tol=tol, what=f"splits={splits} lse")
        assert_close(got_target, target, jnp.float32, tol=tol, what=f"splits={splits} target logit")
        assert_close(got_sum, z.sum(axis=1), jnp.float32, tol=tol, what=f"splits={splits} sum of logits",
                     scale=float(np.abs(z).sum(axis=1).max()))


# --------------------------------------------------------------------------------------------------------------
# 2. z_loss
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reduction,impl",
    [
        pytest.param("mean", XLA, id="mean-xla"),
        pytest.param("sum", XLA, id="sum-xla"),
        pytest.param("none", XLA, id="none-xla"),
        pytest.param("mean", KERNELS, id="mean-kernels"),
        pytest.param("sum", KERNELS, id="sum-kernels"),
    ],
)
def test_z_loss_equals_loss_plus_compute_z_loss(rng, reduction, impl):
    """Without weights, ``z_loss=w`` is ``loss + w * compute_z_loss(lse)`` (same reduction, same valid tokens) in
    value, and its gradients (three-pass for mean/sum, recompute for "none") match the reference with the z-loss
    cotangent chained into the lse."""
    shift, weight = 1, 0.3
    inputs = _inputs(rng, bias=True, logit_scale=2.0)
    options = dict(reduction=reduction, shift=shift, softcap=4.0, ignore_index=inputs.ignore_index,
                   classifier_layout=inputs.layout, impl=impl, interpret=True)

    @jax.jit
    def both(e, c, bias, targets):
        plain, lse = linear_cross_entropy(e, c, targets, bias, return_lse=True, **options)
        with_z = linear_cross_entropy(e, c, targets, bias, z_loss=weight, **options)
        return with_z, plain + weight * compute_z_loss(lse, targets, shift=shift, reduction=reduction)

    with_z, composed = both(inputs.e, inputs.c, inputs.bias, inputs.targets)
    assert_close(with_z, f64(composed), jnp.float32, what="z_loss= vs loss + w * compute_z_loss")

    # The reference's unweighted z-loss pieces agree with _expected's weighted formula here (no weights).
    sem = dict(reduction=reduction, shift=shift, softcap=4.0)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    g_loss = rng.standard_normal(ref.lse.shape) if reduction == "none" else G_LOSS
    want = _expected(inputs, g_loss, z_loss=weight, **sem)
    ref_z = reference_z_loss(ref.lse, inputs.targets, shift, reduction=reduction)
    assert_close(want["loss"], ref.loss + weight * ref_z, jnp.float32, what="test's own z-loss reference")
    chained = reference_grads(inputs.e, inputs.c, inputs.targets, g_loss=g_loss, **inputs.kwargs(), **sem,
                              g_lse=weight * reference_z_loss_lse_grad(ref.lse, inputs.targets, shift,
                                                                       reduction=reduction, g=g_loss))
    for a, b in zip(want["grads"], chained):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    got = _vjp(inputs, impl, g_loss, z_loss=weight, **sem)
    _assert_matches(got, want, inputs, f"z_loss {reduction}")


@pytest.mark.parametrize(
    "reduction,impl",
    [
        pytest.param("mean", XLA, id="mean-xla"),
        pytest.param("sum", KERNELS, id="sum-kernels"),
        pytest.param("none", KERNELS, id="none-kernels"),
    ],
)
def test_z_loss_with_weights_and_smoothing(rng, reduction, impl):
    """With weights, the z-loss is reduced with the same weights as the loss (api.py: ``w * (nll + z lse^2)``,
    the mean divided by ``sum(w)``), not the unweighted ``compute_z_loss``; together with label smoothing."""
    weight = 0.25
    inputs = _inputs(rng, weights=True, bias=True, layout="dv", logit_scale=2.0)
    sem = dict(reduction=reduction, shift=2, label_smoothing=0.1)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    g_loss = rng.standard_normal(ref.lse.shape) if reduction == "none" else G_LOSS
    got, want = _check(inputs, impl, g_loss=g_loss, what=f"weighted z_loss {reduction}", z_loss=weight, **sem)
    if reduction != "none":
        unweighted = ref.loss + weight * reference_z_loss(ref.lse, inputs.targets, 2, reduction=reduction)
        assert abs(float(got[0]) - float(unweighted)) > 1e-3, "weights must enter the z-loss"


# --------------------------------------------------------------------------------------------------------------
# 3. A differentiated return_lse on the three-pass path, and one that is not differentiated
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_differentiated_lse_on_three_pass_path(rng, impl, three_pass_calls):
    """grad_path="auto" + mean is the three-pass path; random non-uniform lse cotangents add the exact recompute
    VJP to the stored gradients (weights, shift, softcap, bias, z_loss all on)."""
    inputs = _inputs(rng, weights=True, bias=True, logit_scale=2.0)
    options = dict(reduction="mean", shift=1, softcap=3.0, z_loss=0.1)
    g_lse = rng.standard_normal((BATCH[0], BATCH[1] - 1)) * rng.uniform(0.1, 3.0, (BATCH[0], BATCH[1] - 1))
    _check(inputs, impl, g_lse=g_lse, what="differentiated lse", grad_path="auto", **options)
    assert three_pass_calls, 'grad_path="auto" with a mean loss must take the three-pass path'


def _count_dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize("impl", IMPLS)
def test_undifferentiated_lse_changes_nothing(rng, impl):
    """return_lse=True whose lse only leaves as aux gives bit-identical gradients to return_lse=False, and the
    recompute add-on is not even traced (its cotangent is a symbolic zero: no extra dot_general)."""
    inputs = _inputs(rng, bias=True)

    def loss(return_lse):
        def f(e, c, bias):
            out = linear_cross_entropy(e, c, inputs.targets, bias, impl=impl, interpret=True, shift=1,
                                       return_lse=return_lse)
            return out if return_lse else (out, None)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    args = (inputs.e, inputs.c, inputs.bias)
    with_lse, lse = loss(True)(*args)
    without, _ = loss(False)(*args)
    for a, b in zip(with_lse, without):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert lse.shape == (BATCH[0], BATCH[1] - 1)
    assert _count_dots(loss(True), *args) == _count_dots(loss(False), *args)

    def differentiated(e, c, bias):
        out, lse = linear_cross_entropy(e, c, inputs.targets, bias, impl=impl, interpret=True, shift=1,
                                        return_lse=True)
        return out + 0.5 * lse.sum()

    assert _count_dots(jax.grad(differentiated, argnums=(0, 1, 2)), *args) > _count_dots(loss(False), *args)


# --------------------------------------------------------------------------------------------------------------
# 4. reduction="none" (recompute path) with per-token cotangents
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_reduction_none_per_token_cotangents(rng, impl, three_pass_calls):
    """grad_path="auto" with reduction "none" takes the recompute path; random per-token cotangents on the loss
    (and the lse) give exact classifier and hidden-state gradients (Liger's bug was dC for reduction none)."""
    inputs = _inputs(rng, weights=True, bias=True, layout="dv", logit_scale=2.0)
    options = dict(reduction="none", shift=1, softcap=3.0, label_smoothing=0.1)
    shape = (BATCH[0], BATCH[1] - 1)
    _check(inputs, impl, g_loss=rng.standard_normal(shape) * 2.0, g_lse=rng.standard_normal(shape),
           what="none", grad_path="auto", **options)
    assert not three_pass_calls, 'grad_path="auto" with reduction "none" must take the recompute path'


# The Mosaic GPU kernels (forced; in Mosaic GPU's interpreter) behind both paths: the three-pass logits chunk and
# the one-pass forward of the recompute path. One compute warpgroup and small tiles keep the interpreter quick; the
# two-warpgroup default is interpreted in tests/test_mosaic_forward.py. Two CTAs: the recompute path's forward
# (three row blocks) runs a round of whole row blocks and then splits, so a CTA has two segments.
_MOSAIC_1WG = MosaicForwardConfig(block_n=64, block_v=64, block_d=16, stages=2, compute_wgs=1, ctas=2)
MOSAIC_KERNELS = dataclasses.replace(KERNELS, forward_backend="mosaic", mosaic=_MOSAIC_1WG, mosaic_chunk=_MOSAIC_1WG)
MOSAIC_BATCH, MOSAIC_D, MOSAIC_V = (3, 50), 48, 136  # D % 16, V % 8, N >= block_n; 3 chunks of 64, padded


# The forward with the gathered target logit (the default's choice) on one cluster of two CTAs: three row blocks
# make two units, the second with a phantom row block.
_MOSAIC_CLUSTER = dataclasses.replace(_MOSAIC_1WG, cluster=2, target_gather=True)
# Row-split warpgroups with the overlapped epilogue: two row blocks of 128 (64 rows per warpgroup), 3 tiles of 64
# columns (the last ragged), 3 steps of 16 for the 3 epilogue pieces of each previous tile.
_MOSAIC_OVERLAP = MosaicForwardConfig(block_n=128, block_v=64, block_d=16, stages=3, compute_wgs=2, wg_split="n",
                                      overlap_epilogue=True, ctas=2)


@pytest.mark.parametrize("reduction,grad_path,forward", [("mean", "auto", _MOSAIC_1WG), ("none", "auto", _MOSAIC_1WG),
                                                         ("mean", "auto", _MOSAIC_CLUSTER),
                                                         ("none", "auto", _MOSAIC_CLUSTER),
                                                         ("mean", "auto", _MOSAIC_OVERLAP),
                                                         ("none", "auto", _MOSAIC_OVERLAP)],
                         ids=["mean-lse", "none", "mean-lse-cluster-gather", "none-cluster-gather",
                              "mean-lse-overlap", "none-overlap"])
def test_mosaic_kernels_per_token_cotangents(rng, reduction, grad_path, forward, three_pass_calls):
    """Random non-uniform per-token cotangents (on the lse, and on the loss for reduction "none") through the
    Mosaic GPU kernels: the three-pass path (mean, with z_loss) adds the exact recompute VJP to gradients formed
    from the Mosaic logits chunk; reduction "none" runs the recompute path on the Mosaic forward (also on a
    cluster of two CTAs with the target logit gathered in XLA, and with row-split warpgroups overlapping each
    tile's epilogue with the next tile's matmul)."""
    inputs = _inputs(rng, jnp.bfloat16, shape=MOSAIC_BATCH, d=MOSAIC_D, v=MOSAIC_V, weights=True, bias=True,
                     logit_scale=2.0)
    options = dict(reduction=reduction, shift=1, softcap=3.0, z_loss=0.1 if reduction == "mean" else 0.0)
    shape = (MOSAIC_BATCH[0], MOSAIC_BATCH[1] - 1)
    g_lse = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape)
    g_loss = rng.standard_normal(shape) * 2.0 if reduction == "none" else G_LOSS
    kernels = dataclasses.replace(MOSAIC_KERNELS, mosaic=forward)
    _check(inputs, kernels, g_loss=g_loss, g_lse=g_lse, what=f"mosaic {reduction}", grad_path=grad_path, **options)
    assert bool(three_pass_calls) == (reduction == "mean")


# --------------------------------------------------------------------------------------------------------------
# 5. three_pass vs recompute, determinism
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_three_pass_agrees_with_recompute_and_is_deterministic(rng, impl, dtype, three_pass_calls):
    inputs = _inputs(rng, dtype, bias=True, weights=True, logit_scale=2.0)
    options = dict(reduction="mean", softcap=5.0, shift=1)

    def run(grad_path):
        del three_pass_calls[:]
        out = _vjp(inputs, impl, G_LOSS, grad_path=grad_path, **options)
        assert bool(three_pass_calls) == (grad_path == "three_pass"), f"grad_path={grad_path!r} not taken"
        return out

    three, again, recompute = run("three_pass"), run("three_pass"), run("recompute")
    want = _expected(inputs, G_LOSS, **options)
    _assert_matches(three, want, inputs, "three_pass")
    _assert_matches(recompute, want, inputs, "recompute")
    assert_close(three[0], f64(recompute[0]), dtype, "loss", "three_pass vs recompute loss", scale=want["loss_scale"])
    for name, a, b, scale in zip(("de", "dc", "dbias"), three[2], recompute[2], want["scales"]):
        assert_close(a, f64(b), dtype, "grad", f"three_pass vs recompute {name}", scale=scale)
    for a, b in zip(jax.tree.leaves(three), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="three_pass is not deterministic")


# --------------------------------------------------------------------------------------------------------------
# 6. Filtering on the three-pass kernel path
# --------------------------------------------------------------------------------------------------------------


def _peaked_inputs(rng):
    """LM-like peaked softmax: targets among 8 "frequent" columns carrying a +10 bias, so every other column has
    probability < 1e-3 and all vocabulary tiles but the first (columns 0..31) may be skipped at filter_eps=1e-2."""
    inputs = _inputs(rng, bias=True, weights=True)
    frequent = jnp.asarray(rng.integers(0, 8, BATCH), jnp.int32)
    targets = jnp.where(inputs.targets == inputs.ignore_index, inputs.targets, frequent)
    bias = jnp.asarray(rng.standard_normal(V) * 0.5, jnp.float32).at[:8].add(10.0)
    return dataclasses.replace(inputs, targets=targets, bias=bias)


def _filter_bound(inputs, reduction, shift, g_loss, eps):
    """Largest change of (de, dc, dbias) that skipping entries with ``|p - onehot| < eps`` can make: each skipped
    logit-gradient entry is ``k_i g (p - onehot)`` with magnitude below ``eps |k_i g|``."""
    k = np.abs(_reduction_factor(inputs, reduction, shift).reshape(-1) * g_loss)
    e = f64(inputs.e)
    e_used = (e[..., : e.shape[-2] - shift, :] if shift else e).reshape(-1, e.shape[-1])
    c = f64(inputs.c) if inputs.layout == "vd" else f64(inputs.c).T
    de = np.zeros(e.shape)
    de_used = eps * k[:, None] * np.abs(c).sum(axis=0)[None, :]
    if shift:
        de[..., : e.shape[-2] - shift, :] = de_used.reshape(*e.shape[:-2], e.shape[-2] - shift, e.shape[-1])
    else:
        de = de_used.reshape(e.shape)
    dc = np.broadcast_to(eps * (k[:, None] * np.abs(e_used)).sum(axis=0)[None, :], c.shape)
    dc = dc if inputs.layout == "vd" else dc.T
    db = np.full((V,), eps * k.sum())
    return de, dc, db


@pytest.mark.parametrize(
    "chunk_dense_fraction,chunk_dc,skips",
    [
        pytest.param(1.0, "sparse", True, id="block-sparse"),
        pytest.param(1.0, "per_chunk", True, id="block-sparse-via-cond"),
        pytest.param(1.0, "sampled", True, id="block-sparse-via-sample"),
        pytest.param(-1.0, "per_chunk", False, id="dense-via-cond"),
        pytest.param(-1.0, "sampled", False, id="dense-via-sample"),
        pytest.param(-1.0, "dense", False, id="dense"),
    ],
)
def test_three_pass_filtering(rng, chunk_dense_fraction, chunk_dc, skips):
    """filter_eps=1e-2 on peaked data: the block-sparse products really skip tiles (dC rows of rare columns are
    exactly zero), the dense products skip nothing; both stay within the filtering bound of the reference."""
    eps, shift = 1e-2, 1
    options = dict(reduction="mean", shift=shift, grad_path="three_pass")
    impl = dataclasses.replace(KERNELS, chunk_dense_fraction=chunk_dense_fraction, chunk_dc=chunk_dc)
    inputs = _peaked_inputs(rng)
    want = _expected(inputs, G_LOSS, **options)
    loss, _, grads = _vjp(inputs, impl, G_LOSS, filter_eps=eps, **options)
    assert_close(loss, want["loss"], jnp.float32, what="loss (the forward never filters)", scale=want["loss_scale"])
    tol = Tolerance(1e-5, 1e-5)
    bounds = _filter_bound(inputs, "mean", shift, G_LOSS, eps)
    for name, got, ref, bound, scale in zip(("de", "dc", "dbias"), grads, want["grads"], bounds, want["scales"]):
        err = np.abs(f64(got) - ref)
        allowed = bound + tol.atol * max(scale, np.abs(ref).max()) + tol.rtol * np.abs(ref)
        assert (err <= allowed).all(), f"{name}: error {err.max():.3e} beyond the filtering bound"
        if not skips:
            assert_close(got, ref, jnp.float32, "grad", f"dense {name}", scale=scale)
    rare = np.asarray(grads[1])[32:] if inputs.layout == "vd" else np.asarray(grads[1])[:, 32:]
    if skips:
        assert np.all(rare == 0.0) and np.all(np.asarray(grads[2])[32:] == 0.0), "no tile was skipped"
        err = np.abs(f64(grads[0]) - want["grads"][0]).max() / np.abs(want["grads"][0]).max()
        assert err > 1e-4, f"de: filtering changed nothing (relative error {err:.1e})"
    else:
        assert np.all(np.abs(rare).max(axis=1) > 0), "the dense products must not skip"
    # Without filtering the same config is exact.
    loss, _, grads = _vjp(inputs, impl, G_LOSS, filter_eps=None, **options)
    _assert_matches((loss, None, grads), want, inputs, "filter_eps=None")


# Frequent columns spread over every 32-column tile of V = 131 (so in natural order every tile is live).
SCATTERED = np.array([3, 40, 77, 101, 130, 19, 64, 90])


def _scattered_peaked_inputs(rng, layout="vd"):
    """As :func:`_peaked_inputs`, with the 8 frequent columns scattered over all five vocabulary tiles."""
    inputs = _inputs(rng, bias=True, weights=True, layout=layout)
    frequent = jnp.asarray(SCATTERED[rng.integers(0, 8, BATCH)], jnp.int32)
    targets = jnp.where(inputs.targets == inputs.ignore_index, inputs.targets, frequent)
    bias = jnp.asarray(rng.standard_normal(V) * 0.5, jnp.float32).at[SCATTERED].add(10.0)
    return dataclasses.replace(inputs, targets=targets, bias=bias)


def _zero_dc_columns(dc, layout) -> int:
    dc = np.asarray(dc)
    return int(np.sum(np.all((dc if layout == "vd" else dc.T) == 0.0, axis=1)))


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_sorted_vocabulary_clusters_live_tiles(rng, layout):
    """sort_vocab=True on peaked data whose frequent columns sit in every tile: in natural order no tile can be
    skipped, sorted the frequent columns share one tile and every other column's dC row (and dbias entry) is
    exactly zero; both stay within the filtering bound of the float64 reference, and dC rows land in their own
    places (the frequent columns' rows are the nonzero ones)."""
    eps, shift = 1e-2, 1
    options = dict(reduction="mean", shift=shift, grad_path="three_pass", filter_eps=eps)
    inputs = _scattered_peaked_inputs(rng, layout)
    want = _expected(inputs, G_LOSS, reduction="mean", shift=shift)
    bounds = _filter_bound(inputs, "mean", shift, G_LOSS, eps)
    zero = {}
    for sort in (False, True):
        impl = dataclasses.replace(KERNELS, chunk_dense_fraction=1.0, chunk_dc="sparse", sort_vocab=sort)
        loss, _, grads = _vjp(inputs, impl, G_LOSS, **options)
        assert_close(loss, want["loss"], jnp.float32, what=f"loss sort={sort}", scale=want["loss_scale"])
        tol = Tolerance(1e-5, 1e-5)
        for name, got, ref, bound, scale in zip(("de", "dc", "dbias"), grads, want["grads"], bounds,
                                                want["scales"]):
            err = np.abs(f64(got) - ref)
            allowed = bound + tol.atol * max(scale, np.abs(ref).max()) + tol.rtol * np.abs(ref)
            assert (err <= allowed).all(), f"sort={sort} {name}: error {err.max():.3e} beyond the filtering bound"
        zero[sort] = _zero_dc_columns(grads[1], layout)
        if sort:
            dc_rows = np.asarray(grads[1]) if layout == "vd" else np.asarray(grads[1]).T
            assert np.all(np.abs(dc_rows[SCATTERED]).max(axis=1) > 0), "a frequent column's dC row was lost"
            assert np.array_equal(dc_rows.any(axis=1), np.asarray(grads[2]) != 0), "dC and dbias rows disagree"
    # Sorted, one 32-column tile (the 8 frequent columns and 24 others) stays live.
    assert zero[False] == 0, f"natural order should keep every tile live, {zero[False]} dC rows were zero"
    assert zero[True] == V - KERNELS.backward.block_v, f"sorted: {zero[True]} zero dC rows"


@pytest.mark.parametrize(
    "chunk_dc,dtype",
    [pytest.param("sparse", jnp.float32, id="sparse-fp32"), pytest.param("dense", jnp.float32, id="dense-fp32"),
     pytest.param("sampled", jnp.bfloat16, id="sampled-bf16")],
)
def test_sorted_vocabulary_is_exact(rng, chunk_dc, dtype):
    """With a filter eps no entry falls below, walking the sorted vocabulary changes nothing but summation order:
    every option that keeps filtering on (bias, softcap, z-loss, weights, shift, ignored tokens, "dv" layout,
    ragged V; label smoothing turns filtering, and so sorting, off) with a random per-token lse cotangent matches
    the float64 reference and the unsorted run."""
    inputs = _inputs(rng, dtype, layout="dv", bias=True, weights=True, logit_scale=2.0, ignore_rows=slice(5, 9))
    out = (BATCH[0], BATCH[1] - 1)
    g_lse = rng.standard_normal(out) * rng.uniform(0.1, 3.0, out)
    options = dict(reduction="mean", shift=1, softcap=4.0, z_loss=0.05, grad_path="three_pass", filter_eps=1e-30)
    runs = {}
    for sort in (False, True):
        impl = dataclasses.replace(KERNELS, chunk_dense_fraction=1.0, chunk_dc=chunk_dc, sort_vocab=sort)
        runs[sort] = _check(inputs, impl, g_lse=g_lse, what=f"sort={sort}", **options)[0]
    (loss_u, lse_u, grads_u), (loss_s, lse_s, grads_s) = runs[False], runs[True]
    assert_close(loss_s, f64(loss_u), jnp.float32, "loss", "sorted vs natural order")
    assert_close(lse_s, f64(lse_u), jnp.float32, "loss", "lse sorted vs natural order")
    for name, a, b in zip(("de", "dc", "dbias"), grads_s, grads_u):
        assert_close(a, f64(b), dtype, "grad", f"{name} sorted vs natural order")


def test_vocab_order():
    """The order puts the entries the sampled rows make most probable first; entries none of them makes
    probable keep their natural order; rows without a gradient (ignored) do not vote."""
    n, d, v = 16, 8, 40
    e = jnp.zeros((n, d), jnp.float32).at[:, 0].set(1.0).at[3, 1].set(1.0)
    c = jnp.zeros((v, d), jnp.float32).at[[33, 7, 21], 0].set(jnp.array([9.0, 6.0, 3.0])).at[12, 1].set(30.0)
    coeffs = LossCoefficients(*(jnp.ones((n,), jnp.float32).at[3].set(0.0) for _ in range(4)))
    sparse = three_pass_lib.SparseProducts(filter_eps=1e-3, filter_e=True, filter_c=True, dense_fraction=1.0,
                                           config=BackwardConfig(block_n=16), interpret=True, sort_vocab=True)
    logits = three_pass_lib.XlaLogits(LogitSpec())
    order = np.asarray(three_pass_lib.vocab_order(e, c, None, jnp.zeros((n,), jnp.int32), coeffs, logits=logits,
                                                  sparse=sparse))
    rest = [i for i in range(v) if i not in (33, 7, 21)]
    assert order.tolist() == [33, 7, 21] + rest, order  # row 3 (which would rank 12 first) is ignored


def test_three_pass_filtering_drops_exactly_the_predicted_tiles(rng):
    """On O(1) logits (a mix of live and skippable tiles) the block-sparse three-pass products equal the float64
    gradient with exactly the tiles the filtering rule skips dropped: a (16-row block of the padded chunk, 32-column
    tile) is skipped when no row in it with a nonzero gradient (padding rows and ignored tokens have none) has a
    probability >= filter_eps there and no such row's target lies in it. filter_eps sits in a wide gap between
    tile maxima, so float32 cannot flip a tile."""
    impl = dataclasses.replace(KERNELS, chunk_dense_fraction=1.0)
    bn, bv, chunk = impl.backward.block_n, impl.forward.block_v, impl.chunk_tokens
    inputs = _inputs(rng, shape=(39,), bias=True, weights=True, logit_scale=1.5)
    # Targets in the first tile only (a tile holding a target is always live), ignored ones stay ignored.
    inputs = dataclasses.replace(inputs, targets=jnp.where(
        inputs.targets == inputs.ignore_index, inputs.targets, jnp.asarray(rng.integers(0, bv, 39), jnp.int32)))
    n = 39
    rows = -(-n // chunk) * chunk
    e = np.zeros((rows, D))
    e[:n] = f64(inputs.e)
    c, bias = f64(inputs.c), f64(inputs.bias)
    z = e @ c.T + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    num_tiles = -(-V // bv)
    t = np.asarray(inputs.targets)
    valid = t != inputs.ignore_index
    active = np.zeros(rows, bool)
    active[:n] = valid & (np.asarray(inputs.weights) != 0)
    p_pad = np.pad(np.where(active[:, None], p, 0.0), ((0, 0), (0, num_tiles * bv - V)))
    block_max = p_pad.reshape(rows // bn, bn, num_tiles, bv).max(axis=(1, 3))  # (row blocks, tiles)
    target_tile = np.zeros_like(block_max, bool)
    for i in np.flatnonzero(active[:n]):
        target_tile[i // bn, t[i] // bv] = True
    block_active = active.reshape(rows // bn, bn).any(axis=1)[:, None] & np.ones_like(target_tile)
    candidates = np.sort(block_max[~target_tile & block_active])
    middle = range(len(candidates) // 4, 3 * len(candidates) // 4)
    ratio, i = max((candidates[i + 1] / candidates[i], i) for i in middle)
    assert ratio > 1.05, f"no robust threshold between tile maxima (best gap ratio {ratio})"
    eps = float(np.sqrt(candidates[i] * candidates[i + 1]))
    live = target_tile | (block_active & (block_max >= eps))
    # One valid token targets a tile that is dead by its probabilities: the target rule alone keeps it live (its
    # 1 - p entry must never be skipped).
    r, j = next((r, j) for r, j in zip(*np.nonzero(~live)) if active[r * bn:(r + 1) * bn].any())
    t = t.copy()
    t[r * bn + np.flatnonzero(active[r * bn:(r + 1) * bn])[0]] = j * bv
    inputs = dataclasses.replace(inputs, targets=jnp.asarray(t))
    live[r, j] = True
    assert 0.1 < live.mean() < 0.9, f"want a mix of live and skipped tiles, got live fraction {live.mean():.2f}"

    # float64 gradient of G_LOSS * mean with the skipped tiles' entries dropped.
    k = np.zeros(rows)
    k[:n] = _reduction_factor(inputs, "mean", 0) * G_LOSS
    onehot = np.zeros_like(p)
    onehot[np.flatnonzero(valid), t[valid]] = 1.0
    keep = np.repeat(np.repeat(live, bn, axis=0), bv, axis=1)[:, :V]
    dz = np.where(keep, k[:, None] * (p - onehot), 0.0)
    ref = ((dz @ c)[:n], dz.T @ e, dz.sum(axis=0))
    scales = ((np.abs(dz) @ np.abs(c)).max(), (np.abs(dz).T @ np.abs(e)).max(), np.abs(dz).sum(axis=0).max())

    loss, _, grads = _vjp(inputs, impl, G_LOSS, filter_eps=eps, reduction="mean", grad_path="three_pass")
    want = _expected(inputs, G_LOSS, reduction="mean")
    assert_close(loss, want["loss"], jnp.float32, what="loss", scale=want["loss_scale"])
    for name, got, r, s, exact in zip(("de", "dc", "dbias"), grads, ref, scales, want["grads"]):
        assert_close(got, r, jnp.float32, "grad", f"{name} with the predicted tiles skipped", scale=s)
        assert np.abs(r - exact).max() > 1e-3 * np.abs(exact).max(), f"{name}: skipping must matter here"


# --------------------------------------------------------------------------------------------------------------
# 7. Edge cases on the three-pass path
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_ignored(rng, impl):
    """Mean (0/0 guarded) and sum with every option on: loss 0, gradients exactly zero and finite."""
    inputs = _inputs(rng, bias=True, weights=True, ignore_frac=1.0)
    assert np.all(np.asarray(inputs.targets) == inputs.ignore_index)
    options = dict(weights=inputs.weights, impl=impl, interpret=True, shift=1, label_smoothing=0.1, softcap=5.0,
                   z_loss=0.2, grad_path="three_pass")

    def objective(e, c, bias):
        mean = linear_cross_entropy(e, c, inputs.targets, bias, reduction="mean", **options)
        total, lse = linear_cross_entropy(e, c, inputs.targets, bias, reduction="sum", return_lse=True, **options)
        return G_LOSS * mean + 2.0 * total + jnp.sum(lse), (mean, total, lse)

    (_, outs), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        inputs.e, inputs.c, inputs.bias)
    for x in outs:
        assert np.all(np.asarray(x) == 0.0), x
    for g in grads:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and not np.any(g), g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape,v,options",
    [
        pytest.param((1,), V, dict(reduction="mean", softcap=2.0), id="N1"),
        pytest.param((11,), 7, dict(reduction="sum", label_smoothing=0.2), id="V7-below-tile"),
    ],
)
def test_edge_shapes(rng, impl, shape, v, options):
    inputs = _inputs(rng, shape=shape, v=v, bias=True, ignore_frac=0.0 if shape == (1,) else 0.2)
    _check(inputs, impl, g_lse=rng.standard_normal(shape), what=f"{shape} V{v}", grad_path="three_pass", **options)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_target_is_nan(rng, impl):
    """A non-ignored target outside [0, V) gets a NaN coefficient: the loss and the gradients are NaN (the
    token's dE row and dC), never plausible numbers; other tokens' dE rows stay exact."""
    inputs = _inputs(rng, shape=(17,), bias=True)
    bad = [4, 9]
    targets = inputs.targets.at[4].set(V).at[9].set(-1)

    def f(e, c, bias):
        return linear_cross_entropy(e, c, targets, bias, impl=impl, interpret=True, grad_path="three_pass")

    loss, (de, dc, db) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(inputs.e, inputs.c, inputs.bias)
    assert np.isnan(float(loss))
    de, dc, db = np.asarray(de), np.asarray(dc), np.asarray(db)
    assert np.isnan(de[bad]).all(), "the bad tokens' dE rows must be NaN"
    assert np.isnan(dc).any() and np.isnan(db).any(), "dC / dbias must be NaN"
    good = np.setdiff1d(np.arange(17), bad)
    assert np.isfinite(de[good]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_huge_logits(rng, impl, dtype):
    """Logits ~1e3: finite loss and gradients matching the reference (float32 logits carry ~1e-3 absolute
    rounding at that scale, hence the looser float32 gradient tolerance, as in test_semantics)."""
    inputs = _inputs(rng, dtype, bias=True, weights=True, logit_scale=1e3)
    grad_tol = Tolerance(2e-3, 2e-3) if dtype == jnp.float32 else None
    _check(inputs, impl, what="logit scale 1e3", grad_path="three_pass", reduction="mean", shift=1,
           grad_tol=grad_tol)


# --------------------------------------------------------------------------------------------------------------
# 8. Validation
# --------------------------------------------------------------------------------------------------------------


def test_validation_of_training_options(rng):
    inputs = _inputs(rng, shape=(5,), v=11, d=4)
    e, c, t = inputs.e, inputs.c, inputs.targets
    with pytest.raises(ValueError, match="z_loss must be a float >= 0"):
        linear_cross_entropy(e, c, t, z_loss=-0.1)
    with pytest.raises(TypeError, match="z_loss"):
        linear_cross_entropy(e, c, t, z_loss="0.1")
    with pytest.raises(TypeError, match="z_loss must be a static"):
        jax.jit(lambda z: linear_cross_entropy(e, c, t, impl=XLA, z_loss=z))(0.1)
    with pytest.raises(ValueError, match="grad_path must be one of"):
        linear_cross_entropy(e, c, t, grad_path="two_pass")
    with pytest.raises(ValueError, match="max_temp_bytes"):
        linear_cross_entropy(e, c, t, max_temp_bytes=0)
    with pytest.raises(TypeError, match="max_temp_bytes"):
        linear_cross_entropy(e, c, t, max_temp_bytes=1e6)
    with pytest.raises(TypeError, match="max_temp_bytes"):
        linear_cross_entropy(e, c, t, max_temp_bytes=True)
    for kwargs in (dict(reduction="none", impl=XLA), dict(reduction="mean", impl="dense")):
        with pytest.raises(ValueError, match='grad_path="three_pass" needs a scalar loss'):
            linear_cross_entropy(e, c, t, grad_path="three_pass", **kwargs)
    with pytest.raises(ValueError, match="chunk_tokens"):
        XlaConfig(chunk_tokens=0)


# --------------------------------------------------------------------------------------------------------------
# 9. max_temp_bytes and the plan
# --------------------------------------------------------------------------------------------------------------


def _scan_lengths(jaxpr) -> set[int]:
    """Lengths of the outermost lax.scans in a (closed) jaxpr (not descending into a scan's body or a kernel;
    the sampled dC choice puts one scan in each branch of a cond, with the same length)."""
    out = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "scan":
                out.append(eqn.params["length"])
                continue
            if eqn.primitive.name == "pallas_call":
                continue
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return set(out)


@pytest.mark.parametrize(
    "impl,row_align",
    [pytest.param(XlaConfig(block_n=8, block_v=16), 8, id="xla"),
     pytest.param(dataclasses.replace(KERNELS, chunk_tokens=None), 16, id="kernels")],
)
def test_tiny_budget_uses_smallest_chunks(rng, impl, row_align):
    """max_temp_bytes=1 still works: chunks of one row block (cdiv(N, row_align) chunks: the first runs before
    the scan where dC's product is dense, and the kernels' sampled choice also traces a block-sparse scan over
    all of them), with the same result as the default budget (one chunk here: no scan where dC is dense)."""
    inputs = _inputs(rng, bias=True, weights=True)
    options = dict(reduction="mean", shift=1, softcap=4.0, grad_path="three_pass")
    n = int(np.prod(BATCH))

    def lengths(**extra):
        def f(e, c, bias):
            return linear_cross_entropy(e, c, inputs.targets, bias, weights=inputs.weights, impl=impl,
                                        interpret=True, **options, **extra)
        return _scan_lengths(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(inputs.e, inputs.c, inputs.bias))

    chunks = -(-n // row_align)
    sparse_scan = isinstance(impl, KernelConfig)
    assert lengths(max_temp_bytes=1) == ({chunks - 1, chunks} if sparse_scan else {chunks - 1})
    assert lengths() == ({1} if sparse_scan else set())
    tiny = _check(inputs, impl, what="max_temp_bytes=1", max_temp_bytes=1, **options)[0]
    default = _check(inputs, impl, what="default budget", **options)[0]
    for name, a, b in zip(("de", "dc", "dbias"), tiny[2], default[2]):
        assert_close(a, f64(b), jnp.float32, "grad", f"tiny vs default budget {name}")


def test_plan_fits_budget_at_gemma2_shape():
    n, d, v, dtype = 8192, 2304, 256000, jnp.bfloat16
    grad_bytes = 2 * (n * d + v * d)
    budget = three_pass_lib.default_budget((n, d), (v, d), dtype)
    assert budget == int(0.45 * grad_bytes)
    assert three_pass_lib.default_budget((8, 4), (16, 4), jnp.float32) == three_pass_lib.MIN_BUDGET_BYTES
    # The kernels: bf16 logits only (row_align 64, col_align 256 as the tuned Hopper config).
    plan = three_pass_lib.make_plan(n, d, v, dtype, budget_bytes=budget, row_align=64, col_align=256)
    assert plan.chunk * v * 2 <= budget
    assert plan.chunk * (2 * v + 8 * d) <= budget
    assert plan.chunk % 64 == 0 and plan.chunk * plan.num_chunks >= n > plan.chunk * (plan.num_chunks - 1)
    # XLA: float32 logits too.
    plan = three_pass_lib.make_plan(n, d, v, dtype, budget_bytes=budget, extra_bytes_per_entry=4)
    assert plan.chunk * v * 6 <= budget and plan.chunk * plan.num_chunks >= n
    # A budget below one row block still gives one row block.
    assert three_pass_lib.make_plan(n, d, v, dtype, budget_bytes=1, row_align=64).chunk == 64


# --------------------------------------------------------------------------------------------------------------
# 10. jax.checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_gives_same_gradients(rng):
    """jax.grad(jax.checkpoint(loss)) on the three-pass path gives the gradients of jax.grad(loss).

    (Recorded, not asserted: in the optimized CPU HLO of the XLA path, grad and grad(checkpoint) both hold the 3
    matmuls of one three-pass forward rule; value_and_grad(checkpoint) holds 4: the forward pass keeps the rule's
    logits matmul for the value and the backward recomputes the whole rule.)
    """
    inputs = _inputs(rng, bias=True)

    def f(e, c, bias):
        return linear_cross_entropy(e, c, inputs.targets, bias, impl=XLA, grad_path="three_pass", softcap=4.0)

    args = (inputs.e, inputs.c, inputs.bias)
    plain = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
    ckpt = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1, 2)))(*args)
    ckpt_loss, ckpt_vg = jax.jit(jax.value_and_grad(jax.checkpoint(f), argnums=(0, 1, 2)))(*args)
    want = _expected(inputs, 1.0, reduction="mean", softcap=4.0)
    assert_close(ckpt_loss, want["loss"], jnp.float32, what="checkpointed loss", scale=want["loss_scale"])
    for name, a, b, b2, ref, scale in zip(("de", "dc", "dbias"), plain, ckpt, ckpt_vg, want["grads"],
                                          want["scales"]):
        assert_close(a, ref, jnp.float32, "grad", f"plain {name}", scale=scale)
        for got in (b, b2):
            assert_close(got, ref, jnp.float32, "grad", f"checkpoint {name}", scale=scale)
            np.testing.assert_allclose(np.asarray(got), np.asarray(a), rtol=1e-6, atol=1e-7)
