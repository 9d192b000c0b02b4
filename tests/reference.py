"""Independent float64 NumPy reference for :func:`cce_jax.linear_cross_entropy` and :func:`cce_jax.compute_z_loss`.

Every test of a loss implementation (dense, xla, the kernels, vocabulary parallelism, the flax adapters) compares
against this module, so it is written from the semantics (``/work/shared/notes/semantics.md`` and the public
docstrings), not from the library's code: shift is a slice (the library pads), the loss is computed from the full
float64 softmax, and the gradients are derived analytically.

Public API:

- :func:`make_inputs`: fresh random inputs with O(1)-scale logits, ignored tokens, optional batch dims, bias
  and weights, in a given dtype and classifier layout.
- :func:`reference_loss`: loss (any reduction) and the per-token lse, in float64.
- :func:`reference_grads`: ``(de, dc, dbias)`` of ``<g_loss, loss> + <g_lse, lse>`` in float64, i.e. the
  vector-Jacobian product for cotangents ``g_loss`` (shaped like the loss) and ``g_lse`` (shaped like the lse).
- :func:`reference_z_loss` / :func:`reference_z_loss_lse_grad`: the z-loss and its cotangent on the lse, to
  chain into :func:`reference_grads` for ``loss + lam * z_loss(lse)``.
- :func:`tolerance` / :func:`assert_close`: per-dtype tolerances with their justification.
- :func:`run_loss_vjp` / :func:`check_against_reference`: run ``linear_cross_entropy`` (any ``impl``) under
  ``jit`` with random cotangents and assert loss, lse, de, dc and dbias against the reference in one call.

Gradient derivation. With ``a = e c^T + b`` (float64), ``z = s tanh(a / s)`` (or ``z = a``), ``p = softmax(z)``
and, per valid in-range token ``i`` with target ``t``,
``nll_i = (1 - alpha) (lse_i - z_it) + alpha (lse_i - mean_v z_iv)``, the loss is a linear combination
``sum_i k_i nll_i`` (``k_i`` = weight x reduction factor x ``g_loss``) and the returned lse enters as
``sum_i h_i lse_i`` (``h_i = g_lse_i`` on valid tokens). Since ``d lse_i / d z_iv = p_iv``:

``dz_iv = (k_i + h_i) p_iv - k_i ((1 - alpha) [v == t_i] + alpha / V)``,
``da = dz * (1 - (z / s)^2)`` under a softcap, then ``de = da c``, ``dc = da^T e``, ``dbias = sum_i da_i``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Inputs",
    "ReferenceResult",
    "Tolerance",
    "assert_close",
    "f64",
    "make_inputs",
    "reference_grads",
    "reference_loss",
    "reference_z_loss",
    "reference_z_loss_lse_grad",
    "run_loss_vjp",
    "check_against_reference",
    "tolerance",
]


def f64(x: Any) -> np.ndarray:
    """Any array (JAX, NumPy, bf16/fp16 included) as a float64 NumPy array, values unchanged."""
    return np.asarray(x).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One random problem. ``c`` is (V, D) for ``layout="vd"`` and (D, V) for ``"dv"``; ``bias``/``weights`` may
    be None. Arrays are JAX arrays in the requested dtype (targets int32, weights float32)."""

    e: jnp.ndarray
    c: jnp.ndarray
    targets: jnp.ndarray
    bias: jnp.ndarray | None
    weights: jnp.ndarray | None
    layout: str
    ignore_index: int

    @property
    def vocab_size(self) -> int:
        return self.c.shape[0] if self.layout == "vd" else self.c.shape[1]

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments describing these inputs, shared by the library call and the reference."""
        return dict(
            bias=self.bias, weights=self.weights, ignore_index=self.ignore_index, classifier_layout=self.layout
        )


def make_inputs(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    d: int,
    v: int,
    dtype: Any = jnp.float32,
    *,
    layout: str = "vd",
    bias: bool = False,
    weights: bool = False,
    ignore_frac: float = 0.2,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
) -> Inputs:
    """Draws a problem with ``targets.shape == shape`` (e.g. ``(N,)``, ``(B, T)`` or ``()``).

    ``e ~ N(0, 1)`` and ``c ~ N(0, logit_scale^2 / D)``, so logits are ~N(0, logit_scale^2) whatever D is:
    O(1)-scale logits make every vocabulary column matter (an unmasked padded column adding exp(0) shows up).
    ``bias ~ N(0, 0.5^2)``; ``weights ~ U[0.25, 2)``. A fraction ``ignore_frac`` of the targets (at least one
    when there are 3 or more tokens and ``ignore_frac > 0``) is set to ``ignore_index``. Values are drawn in
    float64 and rounded once to ``dtype``; the reference then sees exactly the rounded values.
    """
    e = rng.standard_normal((*shape, d))
    c = rng.standard_normal((v, d)) * (logit_scale / np.sqrt(d))
    if layout == "dv":
        c = np.ascontiguousarray(c.T)
    elif layout != "vd":
        raise ValueError(f"layout must be 'vd' or 'dv', got {layout!r}")
    targets = rng.integers(0, v, size=shape)
    n = int(np.prod(shape, dtype=np.int64))
    if ignore_frac > 0 and n:
        flat = targets.reshape(-1)
        drop = rng.random(n) < ignore_frac
        if n >= 3 and not drop.any():
            drop[rng.integers(0, n)] = True
        flat[drop] = ignore_index
        targets = flat.reshape(shape)
    b = rng.standard_normal(v) * 0.5 if bias else None
    w = rng.uniform(0.25, 2.0, size=shape) if weights else None
    return Inputs(
        e=jnp.asarray(e, dtype),
        c=jnp.asarray(c, dtype),
        targets=jnp.asarray(targets, jnp.int32),
        bias=None if b is None else jnp.asarray(b, dtype),
        weights=None if w is None else jnp.asarray(w, jnp.float32),
        layout=layout,
        ignore_index=ignore_index,
    )


# ----------------------------------------------------------------------------------------------------------
# Loss and lse
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceResult:
    """float64 results. ``loss`` is 0-d for "mean"/"sum" and shaped like ``lse`` for "none"; ``lse`` has the
    shape of ``targets`` with the last axis shortened by ``shift`` and is 0.0 at ignored positions.

    ``loss_scale`` / ``lse_scale`` are the magnitudes of the terms a floating-point computation of the loss / lse
    combines (``|lse|`` and ``|z|``, weighted like the loss): rounding error is proportional to them, not to the
    possibly much smaller (or exactly zero) result, so they are the ``scale`` to give :func:`assert_close`.
    """

    loss: np.ndarray
    lse: np.ndarray
    loss_scale: float = 0.0
    lse_scale: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The token-level view after shift: M used tokens, float64 operands, per-token masks."""

    e: np.ndarray  # (M, D) rows of e that meet a target
    c: np.ndarray  # (V, D)
    bias: np.ndarray | None  # (V,)
    targets: np.ndarray  # (M,) int64
    weights: np.ndarray  # (M,) float64, 1.0 when no weights were given
    valid: np.ndarray  # (M,) target != ignore_index
    out_of_range: np.ndarray  # (M,) valid and target outside [0, V)
    out_shape: tuple[int, ...]  # shape of a "none" loss / the lse
    e_shape: tuple[int, ...]  # shape of the original e
    shift: int


def _problem(e, c, targets, bias, weights, ignore_index, shift, classifier_layout) -> _Problem:
    if classifier_layout not in ("vd", "dv"):
        raise ValueError(f"classifier_layout must be 'vd' or 'dv', got {classifier_layout!r}")
    e = f64(e)
    c = f64(c)
    c = c if classifier_layout == "vd" else c.T
    t = np.asarray(targets).astype(np.int64)
    w = np.ones(t.shape) if weights is None else f64(weights)
    shift = int(shift)
    if shift:
        seq = t.shape[-1]
        if not 0 <= shift < seq:
            raise ValueError(f"shift={shift} out of range for sequence length {seq}")
        e_used = e[..., : seq - shift, :]
        t, w = t[..., shift:], w[..., shift:]
    else:
        e_used = e
    out_shape = t.shape
    t = t.reshape(-1)
    valid = t != ignore_index
    return _Problem(
        e=e_used.reshape(-1, e.shape[-1]),
        c=c,
        bias=None if bias is None else f64(bias),
        targets=t,
        weights=w.reshape(-1),
        valid=valid,
        out_of_range=valid & ((t < 0) | (t >= c.shape[0])),
        out_shape=out_shape,
        e_shape=e.shape,
        shift=shift,
    )


def _logits(p: _Problem, softcap: float | None) -> np.ndarray:
    a = p.e @ p.c.T
    if p.bias is not None:
        a = a + p.bias[None, :]
    return a if softcap is None else softcap * np.tanh(a / softcap)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    if z.shape[0] == 0:
        return np.zeros((0,))
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def _target_logit(z: np.ndarray, p: _Problem) -> np.ndarray:
    ok = p.valid & ~p.out_of_range
    safe = np.where(ok, p.targets, 0)
    return np.where(ok, z[np.arange(z.shape[0]), safe], 0.0)


def _reduction_factor(p: _Problem, reduction: str) -> np.ndarray:
    """Per-token coefficient of nll_i in the reduced loss (before the outer cotangent)."""
    w = np.where(p.valid, p.weights, 0.0)
    if reduction == "mean":
        total = w.sum()
        return w / (total if total != 0 else 1.0)
    if reduction in ("sum", "none"):
        return w
    raise ValueError(f"unknown reduction {reduction!r}")


def reference_loss(
    e: Any,
    c: Any,
    targets: Any,
    bias: Any = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    weights: Any = None,
    label_smoothing: float = 0.0,
    classifier_layout: str = "vd",
) -> ReferenceResult:
    """float64 loss and lse with the semantics of ``linear_cross_entropy`` (same argument names and meaning).

    Out-of-range targets (valid, outside ``[0, V)``) give a NaN token loss, hence a NaN "mean"/"sum".
    """
    p = _problem(e, c, targets, bias, weights, ignore_index, shift, classifier_layout)
    z = _logits(p, softcap)
    lse = _logsumexp(z)
    nll = lse - _target_logit(z, p)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z.mean(axis=1))
    nll = np.where(p.valid, nll, 0.0)
    nll = np.where(p.out_of_range, np.nan, nll)
    k = _reduction_factor(p, reduction)
    with np.errstate(invalid="ignore"):
        per_token = np.where(p.valid, k * nll, 0.0)
        per_token = np.where(p.out_of_range, np.nan, per_token)
    loss = per_token.reshape(p.out_shape) if reduction == "none" else np.asarray(per_token.sum())
    lse_out = np.where(p.valid, lse, 0.0).reshape(p.out_shape)
    magnitude = np.where(p.valid, np.maximum(np.abs(lse), np.abs(z).max(axis=1, initial=0.0)), 0.0)
    coef = np.abs(np.where(p.valid, k, 0.0)) * magnitude
    loss_scale = coef.max(initial=0.0) if reduction == "none" else coef.sum()
    return ReferenceResult(loss=loss, lse=lse_out, loss_scale=float(loss_scale),
                           lse_scale=float(magnitude.max(initial=0.0)))


def reference_grads(
    e: Any,
    c: Any,
    targets: Any,
    bias: Any = None,
    *,
    g_loss: Any = 1.0,
    g_lse: Any = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    weights: Any = None,
    label_smoothing: float = 0.0,
    classifier_layout: str = "vd",
    with_scales: bool = False,
):
    """float64 ``(de, dc, dbias)`` of ``sum(g_loss * loss) + sum(g_lse * lse)``.

    ``g_loss`` is shaped like the loss (a scalar for "mean"/"sum"), ``g_lse`` like the lse (None = no lse
    term). ``de`` has the shape of ``e`` (zero rows for the last ``shift`` positions of each sequence), ``dc``
    the shape and layout of ``c``, ``dbias`` is None without a bias. Raises if a target is out of range (the
    loss is NaN there; no gradient is defined).

    With ``with_scales=True`` returns ``((de, dc, dbias), (de_scale, dc_scale, dbias_scale))``: the largest
    entry of the same products taken in absolute value (``|dz| |c|`` with every term of ``dz`` made
    positive). That is the textbook bound on what float rounding of those sums can reach, and it stays
    meaningful where the gradient cancels to (nearly) zero, e.g. V = 1; pass it as ``scale`` to
    :func:`assert_close`.
    """
    p = _problem(e, c, targets, bias, weights, ignore_index, shift, classifier_layout)
    if p.out_of_range.any():
        raise ValueError("reference_grads: out-of-range targets make the loss NaN; no gradient to compare")
    z = _logits(p, softcap)
    m_tokens, vocab = z.shape
    lse = _logsumexp(z)
    prob = np.exp(z - lse[:, None])

    g_loss = f64(g_loss)
    if reduction == "none":
        g_loss = np.broadcast_to(g_loss, p.out_shape).reshape(-1)
    elif g_loss.ndim != 0:
        raise ValueError(f"g_loss must be a scalar for reduction={reduction!r}, got shape {g_loss.shape}")
    k = np.where(p.valid, _reduction_factor(p, reduction) * g_loss, 0.0)  # coefficient of nll_i
    h = np.zeros(m_tokens)  # coefficient of lse_i
    if g_lse is not None:
        h = np.where(p.valid, np.broadcast_to(f64(g_lse), p.out_shape).reshape(-1), 0.0)

    onehot = np.zeros_like(z)
    rows = np.flatnonzero(p.valid)
    onehot[rows, p.targets[rows]] = 1.0
    dz = (k + h)[:, None] * prob - k[:, None] * ((1.0 - label_smoothing) * onehot + label_smoothing / vocab)
    dz_mag = (np.abs(k) + np.abs(h))[:, None] * prob + np.abs(k)[:, None] * (
        (1.0 - label_smoothing) * onehot + label_smoothing / vocab)
    if softcap is not None:
        cap_grad = 1.0 - np.square(z / softcap)
        dz, dz_mag = dz * cap_grad, dz_mag * cap_grad

    de_used = dz @ p.c  # (M, D)
    dc_vd = dz.T @ p.e  # (V, D)
    dbias = None if p.bias is None else dz.sum(axis=0)

    de = np.zeros(p.e_shape)
    d = p.e_shape[-1]
    if p.shift:
        seq = p.e_shape[-2]
        de[..., : seq - p.shift, :] = de_used.reshape(*p.out_shape, d)
    else:
        de[...] = de_used.reshape(p.e_shape)
    dc = dc_vd if classifier_layout == "vd" else dc_vd.T
    if not with_scales:
        return de, dc, dbias
    scales = (
        float((dz_mag @ np.abs(p.c)).max(initial=0.0)),
        float((dz_mag.T @ np.abs(p.e)).max(initial=0.0)),
        float(dz_mag.sum(axis=0).max(initial=0.0)),
    )
    return (de, dc, dbias), scales


# ----------------------------------------------------------------------------------------------------------
# z-loss
# ----------------------------------------------------------------------------------------------------------


def _z_valid(lse: np.ndarray, targets, shift: int, ignore_index: int) -> np.ndarray:
    if targets is None:
        return np.ones(lse.shape, bool)
    t = np.asarray(targets)
    if shift:
        t = t[..., int(shift):]
    if t.shape != lse.shape:
        raise ValueError(f"targets (after shift) {t.shape} do not match lse {lse.shape}")
    return t != ignore_index


def reference_z_loss(
    lse: Any, targets: Any = None, shift: int = 0, ignore_index: int = -100, reduction: str = "mean"
) -> np.ndarray:
    """float64 z-loss ``lse**2`` over valid tokens, reduced like :func:`cce_jax.compute_z_loss`."""
    lse = f64(lse)
    valid = _z_valid(lse, targets, shift, ignore_index)
    z = np.where(valid, np.square(lse), 0.0)
    if reduction == "none":
        return z
    if reduction == "sum":
        return np.asarray(z.sum())
    if reduction == "mean":
        count = valid.sum()
        return np.asarray(z.sum() / (count if count else 1))
    raise ValueError(f"unknown reduction {reduction!r}")


def reference_z_loss_lse_grad(
    lse: Any, targets: Any = None, shift: int = 0, ignore_index: int = -100, reduction: str = "mean",
    g: Any = 1.0,
) -> np.ndarray:
    """Cotangent on ``lse`` of ``sum(g * z_loss)``; pass it as ``g_lse`` to :func:`reference_grads`."""
    lse = f64(lse)
    valid = _z_valid(lse, targets, shift, ignore_index)
    g = np.broadcast_to(f64(g), lse.shape) if reduction == "none" else f64(g)
    scale = 1.0
    if reduction == "mean":
        count = valid.sum()
        scale = 1.0 / (count if count else 1)
    elif reduction not in ("sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    return np.where(valid, 2.0 * lse * g * scale, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``|actual - ref| <= atol * scale + rtol * |ref|`` elementwise, ``scale = max(max|ref|, given scale)``."""

    rtol: float
    atol: float


# Why these numbers. Inputs reach the reference already rounded to their dtype, so only the computation's error
# is measured. Loss and lse are float32 arithmetic on float32-accumulated logits in every dtype (half products
# are exact in float32), so their error is ~1e-7 relative times sqrt(D)-ish accumulation: 1e-5 for float32,
# with 10x more room for half inputs whose kernels may accumulate in another order or in mixed precision.
# Gradients in half precision carry two roundings of unit roundoff u = eps/2 each: the logit gradient is cast to
# the input dtype before the dE/dC matmuls (as any half backward does) and the results are returned in that
# dtype. That is ~2u relative per element plus cancellation in sums: we allow 4u (= 2 eps; bf16 eps 2**-7, fp16
# 2**-10) of the scale (the larger of max|ref| and the |dz||c|-type magnitude from reference_grads) and 4u
# relative. float32 gradients are float32 all the way: 1e-5. Measured on CPU (dense and xla, the semantics and
# hypothesis suites): the worst error reaches ~20% of the half-precision gradient bound, ~7% of the float32 one.
_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
_LOSS_TOL = {"float32": Tolerance(1e-5, 1e-6), "bfloat16": Tolerance(1e-4, 1e-5), "float16": Tolerance(1e-4, 1e-5)}
_GRAD_TOL = {
    "float32": Tolerance(1e-5, 1e-5),
    "bfloat16": Tolerance(2 * _EPS["bfloat16"], 2 * _EPS["bfloat16"]),
    "float16": Tolerance(2 * _EPS["float16"], 2 * _EPS["float16"]),
}


def tolerance(dtype: Any, kind: str = "loss") -> Tolerance:
    """Tolerance for results computed from inputs of ``dtype``; ``kind`` is "loss" (loss, lse) or "grad"."""
    name = jnp.dtype(dtype).name
    table = {"loss": _LOSS_TOL, "grad": _GRAD_TOL}[kind]
    if name not in table:
        raise ValueError(f"no tolerance for dtype {name}")
    return table[name]


def assert_close(
    actual: Any,
    expected: Any,
    dtype: Any,
    kind: str = "loss",
    what: str = "",
    tol: Tolerance | None = None,
    scale: float | None = None,
) -> None:
    """Asserts ``actual`` (any array) matches the float64 ``expected`` to :func:`tolerance` ``(dtype, kind)``
    (or to ``tol`` when given). The absolute part of the tolerance is relative to ``max|expected|``, or to
    ``scale`` when that is larger (the magnitude of the terms that were summed, see
    :class:`ReferenceResult` and :func:`reference_grads`).

    Shapes must agree exactly; NaNs must sit at the same positions; every value must be finite otherwise.
    """
    actual = f64(actual)
    expected = f64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN at {np.argwhere(nan_a != nan_e)[:5].tolist()} differs"
    actual, expected = actual[~nan_e], expected[~nan_e]
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    if expected.size == 0:
        return
    tol = tol or tolerance(dtype, kind)
    scale = max(float(np.abs(expected).max()), scale or 0.0)
    bound = tol.atol * scale + tol.rtol * np.abs(expected)
    err = np.abs(actual - expected)
    worst = int(np.argmax(err - bound))
    assert (err <= bound).all(), (
        f"{what} ({jnp.dtype(dtype).name}, {kind}): max excess at flat index {worst}: got {actual[worst]!r}, "
        f"reference {expected[worst]!r}, |err| {err[worst]:.3e} > bound {bound[worst]:.3e} "
        f"(rtol {tol.rtol}, atol {tol.atol} x scale {scale:.3e}); max |err| {err.max():.3e}"
    )


# ----------------------------------------------------------------------------------------------------------
# Harness: run the library under jit with random cotangents and compare everything with the reference
# ----------------------------------------------------------------------------------------------------------

# Options with a meaning in the loss semantics; everything else (filter_eps, accum_*, impl, ...) only reaches
# the library.
_SEMANTIC = ("softcap", "reduction", "shift", "label_smoothing")


def run_loss_vjp(inputs: Inputs, g_loss: Any, g_lse: Any = None, *, impl: Any, **options: Any):
    """``linear_cross_entropy`` on ``inputs`` under one ``jax.jit``, with its VJP for the given cotangents.

    Returns ``(loss, lse, (de, dc, dbias))`` as JAX arrays; ``lse`` is None unless ``g_lse`` is given
    (which turns on ``return_lse``); ``dbias`` is None without a bias.
    """
    from cce_jax import linear_cross_entropy  # noqa: PLC0415  (keeps this module importable without cce_jax)

    return_lse = g_lse is not None

    @jax.jit
    def go(e, c, bias, targets, weights, g):
        def f(e, c, bias):
            return linear_cross_entropy(
                e, c, targets, bias, weights=weights, ignore_index=inputs.ignore_index,
                classifier_layout=inputs.layout, impl=impl, return_lse=return_lse, **options,
            )

        out, vjp = jax.vjp(f, e, c, bias)
        return out, vjp(g)

    g = (jnp.asarray(g_loss, jnp.float32), jnp.asarray(g_lse, jnp.float32)) if return_lse else (
        jnp.asarray(g_loss, jnp.float32))
    out, grads = go(inputs.e, inputs.c, inputs.bias, inputs.targets, inputs.weights, g)
    loss, lse = out if return_lse else (out, None)
    return loss, lse, grads


def check_against_reference(
    inputs: Inputs,
    rng: np.random.Generator,
    *,
    impl: Any,
    return_lse: bool = False,
    what: str = "",
    loss_tol: Tolerance | None = None,
    grad_tol: Tolerance | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Runs :func:`run_loss_vjp` with random cotangents and asserts loss, lse, de, dc, dbias match the reference.

    ``options`` go to ``linear_cross_entropy``; the semantic ones (softcap, reduction, shift, label_smoothing)
    also go to the reference. Cotangents are random (a scalar of random sign and size for "mean"/"sum", N(0, 1)
    per token for "none" and for the lse), so every per-token coefficient of the backward is exercised.
    Tolerances default to :func:`tolerance` of ``inputs.e.dtype``. Returns the actual and reference results
    (keys ``loss, lse, de, dc, dbias`` and ``ref_*``) for further assertions.
    """
    sem = {k: options[k] for k in _SEMANTIC if k in options}
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    if ref.loss.ndim == 0:
        g_loss = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0)
    else:
        g_loss = rng.standard_normal(ref.loss.shape)
    g_lse = rng.standard_normal(ref.lse.shape) if return_lse else None
    loss, lse, (de, dc, dbias) = run_loss_vjp(inputs, g_loss, g_lse, impl=impl, **options)
    (ref_de, ref_dc, ref_db), (s_de, s_dc, s_db) = reference_grads(
        inputs.e, inputs.c, inputs.targets, g_loss=g_loss, g_lse=g_lse, with_scales=True, **inputs.kwargs(), **sem
    )
    dtype = inputs.e.dtype
    label = f"{what} impl={impl!r}"
    assert loss.dtype == jnp.float32, f"{label}: loss dtype {loss.dtype}"
    assert_close(loss, ref.loss, dtype, "loss", f"{label} loss", loss_tol, ref.loss_scale)
    if return_lse:
        assert lse.dtype == jnp.float32, f"{label}: lse dtype {lse.dtype}"
        assert_close(lse, ref.lse, dtype, "loss", f"{label} lse", loss_tol, ref.lse_scale)
    assert de.dtype == inputs.e.dtype and dc.dtype == inputs.c.dtype, f"{label}: gradient dtypes {de.dtype} {dc.dtype}"
    assert_close(de, ref_de, dtype, "grad", f"{label} de", grad_tol, s_de)
    assert_close(dc, ref_dc, dtype, "grad", f"{label} dc", grad_tol, s_dc)
    if inputs.bias is not None:
        assert dbias.dtype == inputs.bias.dtype, f"{label}: dbias dtype {dbias.dtype}"
        assert_close(dbias, ref_db, dtype, "grad", f"{label} dbias", grad_tol, s_db)
    return dict(loss=loss, lse=lse, de=de, dc=dc, dbias=dbias, ref_loss=ref.loss, ref_lse=ref.lse,
                ref_de=ref_de, ref_dc=ref_dc, ref_dbias=ref_db)
