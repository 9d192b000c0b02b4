"""Choices and checks that depend on the backend or on concrete argument values, for :mod:`cce_jax.api`.

- ``impl="auto"`` away from a GPU: dense logits while they are small, the blockwise XLA path above
  :data:`AUTO_DENSE_MAX_LOGIT_BYTES`.
- The Pallas kernels off a GPU: a one-time warning that they run in interpret mode, and a clear error for
  ``interpret=False``.
- Static options given as traced values, and negative concrete ``weights``: errors naming the argument.
- ``check_targets=True``: :class:`TargetsOutOfRangeError`, raised directly when the targets are concrete and
  through a host callback when they are traced (then JAX wraps it, see :func:`check_targets`).
"""

from __future__ import annotations

import logging
import warnings

import jax
import numpy as np

#: ``impl="auto"`` on a backend that is not a GPU computes the dense logits (``impl="dense"``) when their float32
#: size, N x V x 4 bytes (V: this device's vocabulary rows), is at most this, and ``impl="xla"`` above it.
#: Measured on a 2-core CPU (fw-bw, jax 0.11.2, float32): dense was faster at every size tried (2.8 vs 3.0 ms at
#: 256 x 64 x 1009, 29 vs 69 ms at 512 x 128 x 5003, 189 vs 236 ms at 1024 x 256 x 8009, 388 vs 555 ms at
#: 1024 x 256 x 16411), but its temporary memory is twice the logits (logits and their gradient) while "xla"
#: stays near 40 MiB at any size: at 32 MiB of logits dense needs ~63 MiB, past that the gap grows linearly
#: (128 MiB against 40 MiB at 64 MiB of logits, 1.5 GiB against 50 MiB at 785 MiB).
AUTO_DENSE_MAX_LOGIT_BYTES = 32 * 2**20

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def targets_gpu() -> bool:
    """True when the computation being traced is meant for a GPU: the default backend is one, or the current
    abstract mesh names a GPU device (as when lowering for CUDA on a CPU host, see
    :func:`pallas_kernels.lowering.lower_for_cuda`)."""
    if jax.default_backend() in _GPU_PLATFORMS:
        return True
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) in _GPU_PLATFORMS


def auto_impl_off_gpu(num_logits: int | None) -> str:
    """``impl="auto"`` where the kernels are not preferred and the backend is not a GPU."""
    if num_logits is not None and num_logits * 4 <= AUTO_DENSE_MAX_LOGIT_BYTES:
        return "dense"
    return "xla"


_interpret_warned = False


def check_kernel_backend(impl, interpret: bool | None) -> None:
    """For a kernel implementation: reject ``interpret=False`` away from a GPU and warn (once per process) that
    ``interpret=None`` means Pallas interpret mode there."""
    global _interpret_warned
    backend = jax.default_backend()
    if interpret is False and not targets_gpu():
        raise ValueError(
            f"interpret=False needs a GPU: the default backend is {backend!r} (impl={impl!r} runs the Pallas "
            "GPU kernels). Leave interpret=None (interpret mode away from a GPU) or use impl=\"xla\" or \"auto\"."
        )
    if interpret is None and backend not in _GPU_PLATFORMS and not _interpret_warned:
        _interpret_warned = True
        warnings.warn(
            f"impl={impl!r} on the {backend!r} backend runs the Pallas kernels in interpret mode, which is slow "
            "(seconds per step); use impl=\"xla\" or \"auto\" away from a GPU. This warning is shown once.",
            UserWarning,
            stacklevel=4,
        )


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def require_static(name: str, value, expected: str) -> None:
    """A static option given a traced value: say it must be static rather than that its value is wrong."""
    if is_traced(value):
        raise TypeError(
            f"{name} must be a static Python {expected}, not a traced value (got a {type(value).__name__}): "
            f"pass a constant, or mark it static (jax.jit(..., static_argnames=...) or functools.partial)"
        )


def check_weights(weights) -> None:
    """Concrete ``weights`` (a NumPy array or a fully addressable jax.Array) must be >= 0; traced ones are
    used as given."""
    if weights is None or is_traced(weights):
        return
    if isinstance(weights, jax.Array) and not weights.is_fully_addressable:
        return
    w = np.asarray(weights)  # a host copy of N floats: also right for a constant captured inside a jit trace
    count = int((w < 0).sum())
    smallest = float(w.min()) if count else 0.0
    if count:
        raise ValueError(
            f"weights must be >= 0, got {count} negative value(s) (smallest {smallest!r}); a weight scales its "
            "token's loss and gradient, and the mean divides by their sum"
        )


class TargetsOutOfRangeError(ValueError):
    """``check_targets=True`` found target ids outside ``[0, V)`` that are not ``ignore_index``."""


def targets_message(count, first, vocab_size) -> str:
    return (
        f"targets: {int(count)} target id(s) outside [0, {int(vocab_size)}) that are not ignore_index; "
        f"first offending value {int(first)}"
    )


def raise_on_bad_targets(count, first, vocab_size) -> None:
    if int(count) > 0:
        raise TargetsOutOfRangeError(targets_message(count, first, vocab_size))


def check_targets(callback, count, first, vocab_size) -> None:
    """Runs ``callback(count, first, vocab_size)`` now if all three are concrete (eager calls: the
    :class:`TargetsOutOfRangeError` propagates as is), else at run time through ``jax.debug.callback``.

    In the traced case the exception crosses the XLA runtime, which re-raises it as
    ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``) whose message ends with the original
    ``TargetsOutOfRangeError: targets: ...`` line; jax 0.11.2 offers no way to let the original exception
    through (only ``checkify``, which the caller would have to apply). The "jax.debug.callback failed" log
    record JAX writes for it is dropped (only for this exception; see :class:`_DropTargetErrorRecords`).
    """
    if not any(is_traced(x) for x in (count, first, vocab_size)):
        callback(count, first, vocab_size)
        return
    jax.debug.callback(callback, count, first, vocab_size)


class _DropTargetErrorRecords(logging.Filter):
    """Drops the traceback JAX logs when a debug callback raises, for :class:`TargetsOutOfRangeError` only
    (the error itself still propagates); every other callback failure is logged as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, TargetsOutOfRangeError)


_DEBUG_CALLBACK_LOGGER = "jax._src.debugging"  # jax/_src/debugging.py: logger.exception("jax.debug.callback failed")
if not any(isinstance(f, _DropTargetErrorRecords) for f in logging.getLogger(_DEBUG_CALLBACK_LOGGER).filters):
    logging.getLogger(_DEBUG_CALLBACK_LOGGER).addFilter(_DropTargetErrorRecords())
