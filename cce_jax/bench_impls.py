"""The implementations the benchmark (``python -m cce_jax.benchmark``) times, and how a row is judged: the
registry behind ``--impl``, the plain-XLA baselines, the independent float32 reference and the check of a row's
outputs against it with the tolerances that :mod:`cce_jax.benchmark`'s docstring explains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from cce_jax import api, options
from cce_jax import cce as cce_lib

KERNEL_IMPLS = ("cce", "cce_sorted", "cce_kahan", "cce_kahan_full_c", "cce_kahan_full_e", "cce_exact")
IMPLS = (*KERNEL_IMPLS, "xla", "dense", "baseline", "baseline_f32")

# (loss relative error, gradient relative error) allowed per input dtype; see :mod:`cce_jax.benchmark`'s docstring.
TOLERANCES: dict[str, tuple[float, float]] = {
    "bf16": (1e-4, 1e-2),
    "fp16": (1e-4, 5e-3),
    "fp32": (1e-3, 2e-3),
}
# (loss, gradient) relative errors allowed to an implementation that rounds its logits to a half dtype (the
# baseline): a bf16 logit carries a relative error of 2**-9, several times the library's own tolerances.
HALF_LOGIT_TOLERANCES = (4e-3, 3e-2)
# Multiplies the reference's "what an element-wise filter would drop" bound for implementations that filter.
FILTER_ALLOWANCE = 1.5


# --------------------------------------------------------------------------------------------------------------
# Implementations


@dataclasses.dataclass(frozen=True)
class Impl:
    """A timed implementation: ``loss(e, c, targets) -> float32 scalar`` and which gradients it may filter."""

    loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    filters_e: bool = False
    filters_c: bool = False
    half_logits: bool = False  # rounds logits to the input dtype: judged with HALF_LOGIT_TOLERANCES


def _library_impl(name: str) -> Impl:
    """``cce_jax.linear_cross_entropy(..., impl=name)`` with default options (mean reduction)."""

    def loss(e, c, targets):
        return api.linear_cross_entropy(e, c, targets, impl=name)

    if name == "dense":
        return Impl(loss)
    backward = options.backward_options(
        name, filter_eps=1.0, filter_e_grad=True, filter_c_grad=True, accum_e_fp32=False, accum_c_fp32=False
    )
    return Impl(loss, backward.filters_e, backward.filters_c)


def baseline_loss(e: jax.Array, c: jax.Array, targets: jax.Array) -> jax.Array:
    """The plain XLA baseline as JAX users write it: ``(e @ c^T).astype(float32)`` then optax's cross-entropy.

    The product is in the input dtype, so its backward runs input-dtype matmuls (what the anchors measured).
    """
    logits = lax.dot_general(e, c, (((1,), (1,)), ((), ()))).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def baseline_f32_loss(e: jax.Array, c: jax.Array, targets: jax.Array) -> jax.Array:
    """The baseline with float32-accumulated logits (``preferred_element_type``); its backward multiplies a
    float32 logit gradient with half-precision operands, which XLA runs as float32 matmuls."""
    logits = lax.dot_general(e, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _sorted_loss(e, c, targets):
    """impl="cce" walking the vocabulary in sampled-probability order (``KernelConfig.sort_vocab``)."""
    config = dataclasses.replace(cce_lib.default_config(e.shape[1], e.dtype), sort_vocab=True)
    return api.linear_cross_entropy(e, c, targets, impl=config)


# Name -> implementation; ``--impl`` accepts exactly these names.
IMPL_REGISTRY: dict[str, Impl] = {name: _library_impl(name) for name in IMPLS
                                  if name.startswith(("cce", "xla", "dense")) and name != "cce_sorted"}
IMPL_REGISTRY["cce_sorted"] = dataclasses.replace(IMPL_REGISTRY["cce"], loss=_sorted_loss)
IMPL_REGISTRY["baseline"] = Impl(baseline_loss, half_logits=True)
IMPL_REGISTRY["baseline_f32"] = Impl(baseline_f32_loss)


# --------------------------------------------------------------------------------------------------------------
# Reference and checks


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


@functools.partial(jax.jit, static_argnames=("grads", "eps"))
def reference(e, c, targets, *, grads: bool, eps: float):
    """float32 loss of the upcast inputs and, if ``grads``, the gradients of the mean loss written out by hand.

    Returns ``(loss, None)`` or ``(loss, (de, dc, (drop_e, drop_c)))`` where ``drop_*`` is the relative size of
    the part of each gradient that comes from softmax entries with ``|softmax - onehot| < eps``: the most an
    element-wise gradient filter at ``eps`` can change it.
    """
    hi = lax.Precision.HIGHEST
    e32, c32 = e.astype(jnp.float32), c.astype(jnp.float32)
    n = e.shape[0]
    z = lax.dot_general(e32, c32, (((1,), (1,)), ((), ())), precision=hi)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_t = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    loss = jnp.mean(lse - z_t)
    if not grads:
        return loss, None
    g = jnp.exp(z - lse[:, None]).at[jnp.arange(n), targets].add(-1.0)
    dropped = jnp.where(jnp.abs(g) < eps, g, 0.0)

    def products(x):
        return jnp.dot(x, c32, precision=hi) / n, jnp.dot(x.T, e32, precision=hi) / n

    de, dc = products(g)
    de_drop, dc_drop = products(dropped)
    return loss, (de, dc, (_norm(de_drop) / _norm(de), _norm(dc_drop) / _norm(dc)))


@jax.jit
def _rel_err(x, ref):
    return _norm(x.astype(jnp.float32) - ref) / _norm(ref)


def check(row: dict, out, ref_loss: float, ref_grads, drops: tuple[float, float] | None) -> dict:
    """Errors of one row's outputs against the reference, its tolerances and the verdict."""
    impl = IMPL_REGISTRY[row["impl"]]
    tol_loss, tol_grad = TOLERANCES[row["dtype"]]
    if impl.half_logits and row["dtype"] != "fp32":
        tol_loss, tol_grad = max(tol_loss, HALF_LOGIT_TOLERANCES[0]), max(tol_grad, HALF_LOGIT_TOLERANCES[1])
    loss = out if row["kind"] == "fw" else out[0]
    res = {"loss_err": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30), "tol_loss": tol_loss,
           "de_err": None, "dc_err": None, "tol_de": None, "tol_dc": None}
    verdicts = [res["loss_err"] <= tol_loss]
    if row["kind"] == "fw-bw":
        de, dc = out[1]
        res["de_err"] = float(_rel_err(de, ref_grads[0]))
        res["dc_err"] = float(_rel_err(dc, ref_grads[1]))
        res["tol_de"] = tol_grad + (FILTER_ALLOWANCE * drops[0] if impl.filters_e else 0.0)
        res["tol_dc"] = tol_grad + (FILTER_ALLOWANCE * drops[1] if impl.filters_c else 0.0)
        verdicts += [res["de_err"] <= res["tol_de"], res["dc_err"] <= res["tol_dc"]]
    errs = [x for x in (res["loss_err"], res["de_err"], res["dc_err"]) if x is not None]
    res["err"] = math.nan if any(math.isnan(x) for x in errs) else max(errs)
    res["ok"] = all(verdicts)  # a NaN error compares False and fails
    return res

