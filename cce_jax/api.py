"""The public loss: argument checking, the loss semantics, and dispatch to an implementation.

Semantics live here once. Implementations only compute per-token ``(lse, target_logit, sum_logits)``
(:mod:`cce_jax.stats`); shift, ignore_index, out-of-range targets, weights, label smoothing, reductions and the
returned lse are arithmetic on those scalars, and JAX's AD carries their cotangents into the implementation's
custom VJP.
"""

from __future__ import annotations

import functools
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax import checks
from cce_jax import dense as dense_lib
from cce_jax import options as options_lib
from cce_jax import three_pass as three_pass_lib
from cce_jax import xla as xla_lib
from cce_jax.options import VocabParallelOptions
from cce_jax.stats import LogitSpec, LossCoefficients, TokenStats
from cce_jax.vma import align_varying

Reduction = Literal["mean", "sum", "none"]
GradPath = Literal["auto", "three_pass", "recompute"]
_REDUCTIONS = ("mean", "sum", "none")
_GRAD_PATHS = ("auto", "three_pass", "recompute")
_LAYOUTS = ("vd", "dv")


def _is_float_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _check_shift(shift, targets_shape) -> int:
    checks.require_static("shift", shift, "int or bool")
    if isinstance(shift, (bool, np.bool_)):
        shift = int(shift)
    elif not isinstance(shift, (numbers.Integral, np.integer)):
        raise TypeError(f"shift must be an int or bool, got {type(shift).__name__} {shift!r}")
    shift = int(shift)
    if shift == 0:
        return 0
    if len(targets_shape) == 0:
        raise ValueError("shift requires targets with a sequence dimension, got scalar targets")
    seq_len = targets_shape[-1]
    if not 0 <= shift < seq_len:
        raise ValueError(
            f"shift must satisfy 0 <= shift < targets.shape[-1] = {seq_len}, got shift={shift}"
        )
    return shift


def _check_filter_eps(filter_eps):
    checks.require_static("filter_eps", filter_eps, 'float, "auto" or None')
    if filter_eps is None or (isinstance(filter_eps, str) and filter_eps == "auto"):
        return filter_eps
    if isinstance(filter_eps, str):
        raise ValueError(f'filter_eps must be "auto", a float or None, got {filter_eps!r}')
    if isinstance(filter_eps, (bool, np.bool_, numbers.Integral, np.integer)):
        raise TypeError(
            f'filter_eps must be "auto", a float or None, got the int {filter_eps!r} (write {float(filter_eps)!r} '
            "if you mean it)"
        )
    if not isinstance(filter_eps, (numbers.Real, np.floating)) or not filter_eps > 0:
        raise ValueError(f'filter_eps must be "auto", a positive float or None, got {filter_eps!r}')
    return float(filter_eps)


def _check_flag(name: str, value) -> bool:
    checks.require_static(name, value, "bool")
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _validate(e, c, targets, bias, weights, *, classifier_layout, reduction, softcap, label_smoothing,
              ignore_index):
    for name, x in (("e", e), ("c", c), ("targets", targets)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    checks.require_static("classifier_layout", classifier_layout, 'str ("vd" or "dv")')
    if classifier_layout not in _LAYOUTS:
        raise ValueError(f'classifier_layout must be "vd" (c is (V, D)) or "dv" (c is (D, V)), got {classifier_layout!r}')
    if e.ndim < 1:
        raise ValueError("e must have shape (..., D), got a scalar")
    if not _is_float_dtype(e.dtype):
        raise TypeError(f"e must be a floating-point array, got dtype {e.dtype}")
    if c.ndim != 2:
        raise ValueError(f"c must be 2-D ({'(V, D)' if classifier_layout == 'vd' else '(D, V)'}), got shape {c.shape}")
    if not _is_float_dtype(c.dtype):
        raise TypeError(f"c must be a floating-point array, got dtype {c.dtype}")
    if c.dtype != e.dtype:
        raise TypeError(f"c must have the dtype of e ({e.dtype}), got {c.dtype}; cast one of them explicitly")
    d = e.shape[-1]
    d_axis = 1 if classifier_layout == "vd" else 0
    if c.shape[d_axis] != d:
        layout = "(V, D)" if classifier_layout == "vd" else "(D, V)"
        raise ValueError(
            f"c must be {layout} with D = e.shape[-1] = {d} (classifier_layout={classifier_layout!r}), "
            f"got c.shape {c.shape}"
        )
    vocab = c.shape[1 - d_axis]
    if vocab < 1:
        raise ValueError(f"c must have at least one vocabulary entry, got shape {c.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets.shape must equal e.shape[:-1] = {e.shape[:-1]}, got {targets.shape}")
    if bias is not None:
        if not hasattr(bias, "shape") or bias.ndim != 1 or bias.shape[0] != vocab:
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {getattr(bias, 'shape', bias)}")
        if not _is_float_dtype(bias.dtype):
            raise TypeError(f"bias must be a floating-point array, got dtype {bias.dtype}")
    if weights is not None:
        if not hasattr(weights, "shape") or tuple(weights.shape) != tuple(targets.shape):
            raise ValueError(f"weights.shape must equal targets.shape = {targets.shape}, got {getattr(weights, 'shape', weights)}")
        if not _is_float_dtype(weights.dtype):
            raise TypeError(f"weights must be a floating-point array, got dtype {weights.dtype}")
        checks.check_weights(weights)
    checks.require_static("reduction", reduction, 'str ("mean", "sum" or "none")')
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of "mean", "sum", "none", got {reduction!r}')
    if softcap is not None:
        checks.require_static("softcap", softcap, "float or None")
        if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (numbers.Real, np.floating)) or not softcap > 0:
            raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    checks.require_static("label_smoothing", label_smoothing, "float")
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(label_smoothing, (numbers.Real, np.floating)):
        raise TypeError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    checks.require_static("ignore_index", ignore_index, "int")
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (numbers.Integral, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return vocab


def _check_training_options(z_loss, grad_path, max_temp_bytes) -> tuple[float, str, int | None]:
    checks.require_static("z_loss", z_loss, "float")
    if isinstance(z_loss, (bool, np.bool_)) or not isinstance(z_loss, (numbers.Real, np.floating)):
        raise TypeError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if not isinstance(grad_path, str) or grad_path not in _GRAD_PATHS:
        raise ValueError(f'grad_path must be one of "auto", "three_pass", "recompute", got {grad_path!r}')
    if max_temp_bytes is not None:
        if isinstance(max_temp_bytes, (bool, np.bool_)) or not isinstance(max_temp_bytes, (numbers.Integral, np.integer)):
            raise TypeError(f"max_temp_bytes must be None or a positive int (bytes), got {max_temp_bytes!r}")
        if max_temp_bytes < 1:
            raise ValueError(f"max_temp_bytes must be None or a positive int (bytes), got {max_temp_bytes!r}")
        max_temp_bytes = int(max_temp_bytes)
    return float(z_loss), grad_path, max_temp_bytes


def _resolve_impl(impl, e_dtype, interpret, num_logits: int | None = None):
    """Returns ``(name, config)``: the implementation to run and its block config (or None for defaults).

    ``impl="auto"``: the kernels where :func:`cce_jax.cce.kernels_preferred` says so (a GPU and a supported
    dtype); otherwise, on a GPU, ``"xla"``; on any other backend ``"dense"`` while the float32 logits
    (``num_logits`` = N x local V entries, 4 bytes each) fit in :data:`cce_jax.checks.AUTO_DENSE_MAX_LOGIT_BYTES`
    and ``"xla"`` above it (or when ``num_logits`` is not given). A kernel implementation off a GPU warns once
    that it runs in interpret mode, and rejects ``interpret=False``.
    """
    if isinstance(impl, xla_lib.XlaConfig):
        return "xla", impl
    from cce_jax import cce as cce_lib  # noqa: PLC0415  (the kernel module imports Pallas lazily)

    if isinstance(impl, cce_lib.KernelConfig):
        checks.check_kernel_backend(impl, interpret)
        return "cce", impl
    if not isinstance(impl, str) or impl not in options_lib.IMPL_NAMES:
        raise ValueError(
            f"impl must be one of {', '.join(repr(n) for n in options_lib.IMPL_NAMES)}, an XlaConfig or a "
            f"KernelConfig, got {impl!r}"
        )
    if impl == "auto":
        if cce_lib.kernels_preferred(e_dtype, interpret):
            return "cce", None
        return ("xla" if jax.default_backend() == "gpu" else checks.auto_impl_off_gpu(num_logits)), None
    if impl not in ("dense", "xla"):
        checks.check_kernel_backend(impl, interpret)
    return impl, None


def _shift_along_sequence(x: jax.Array, shift: int, fill) -> jax.Array:
    """``x[..., shift:]`` padded back to length T with ``fill``, so row t of e meets target t + shift."""
    if shift == 0:
        return x
    pad = jnp.full(x.shape[:-1] + (shift,), fill, x.dtype)
    return jnp.concatenate([x[..., shift:], pad], axis=-1)


def _unshift(x: jax.Array, shape: tuple[int, ...], shift: int) -> jax.Array:
    x = x.reshape(shape)
    return x[..., : shape[-1] - shift] if shift else x


def _raise_on_bad_targets(count, first, vocab_size):
    """Raises :class:`cce_jax.TargetsOutOfRangeError` (a ``ValueError``) naming the count, the range and the
    first offending id."""
    checks.raise_on_bad_targets(count, first, vocab_size)


def linear_cross_entropy(
    e: jax.Array,
    c: jax.Array,
    targets: jax.Array,
    bias: jax.Array | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: Reduction = "mean",
    shift: int | bool = 0,
    return_lse: bool = False,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    filter_eps: float | Literal["auto"] | None = "auto",
    accum_e_fp32: bool = False,
    accum_c_fp32: bool = False,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str | xla_lib.XlaConfig = "auto",
    classifier_layout: Literal["vd", "dv"] = "vd",
    vocab_parallel: VocabParallelOptions | None = None,
    interpret: bool | None = None,
    check_targets: bool = False,
    z_loss: float = 0.0,
    grad_path: GradPath = "auto",
    max_temp_bytes: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Cross-entropy of ``softcap(e @ c^T + bias)`` against ``targets`` without materialising the logits.

    Args:
      e: hidden states, shape ``(..., D)``; bf16, fp16 or fp32.
      c: classifier, ``(V, D)`` for ``classifier_layout="vd"`` (tied ``Embed`` tables) or ``(D, V)`` for
        ``"dv"`` (a ``Linear`` kernel); same dtype as ``e``. Never transposed in memory.
      targets: integer ids, shape ``e.shape[:-1]``. Ids equal to ``ignore_index`` contribute nothing. Any
        other id outside ``[0, V)`` makes that token's loss NaN (so a mean or sum is NaN); pass
        ``check_targets=True`` to raise instead.
      bias: optional ``(V,)`` added to every logit before the softcap; differentiable.
      ignore_index: target value that marks tokens to skip.
      softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2 uses 30.0).
      reduction: ``"mean"`` (weighted mean over non-ignored tokens; 0.0 if there are none), ``"sum"`` or
        ``"none"`` (per-token losses shaped like ``targets``, last axis ``T - shift``, 0.0 where ignored).
        Like ``ignore_index``, ``softcap``, ``shift``, ``label_smoothing``, ``filter_eps`` and the flags, it is
        static: a traced value raises a ``TypeError`` saying so.
      shift: pair ``e[..., t, :]`` with ``targets[..., t + shift]`` within each sequence (``True`` means 1),
        without copying ``e``. ``0 <= shift < targets.shape[-1]``.
      return_lse: also return the per-token float32 log-sum-exp, shaped like a ``"none"`` loss and zero where
        ignored; it is differentiable (use it for a z-loss, see :func:`compute_z_loss`).
      weights: optional float per-token weights shaped like ``targets`` and aligned with them (sliced like
        ``targets`` under ``shift``). ``mean = sum(w * nll) / sum(w)`` over non-ignored tokens,
        ``sum = sum(w * nll)``, ``none = w * nll``. Weights must be >= 0: concrete weights (a NumPy array or
        a jax.Array outside a trace) with a negative entry raise a ``ValueError``; traced weights are used as
        given (a negative weight scales its token's loss and gradient by that factor, and ``"mean"`` divides by
        ``sum(w)``, so keep that positive).
      label_smoothing: ``alpha`` in ``(1 - alpha) * nll + alpha * mean_v(-log p_v)``, in ``[0, 1)``.
      filter_eps: gradient filtering threshold (blockwise implementations): a backward tile is skipped when
        every ``|softmax - onehot|`` in it is below it. ``"auto"`` = eps(e.dtype) / 32; ``None`` disables.
        Ignored when ``label_smoothing > 0`` (its gradient is dense) and by ``impl="dense"``.
      accum_e_fp32, accum_c_fp32: accumulate dE / dC in float32. The implementations here always
        accumulate tiles in float32 registers or buffers, so these can only add precision, never remove it.
      filter_e_grad, filter_c_grad: whether dE / dC may skip filtered tiles.
      impl: ``"auto"`` (the kernels on a GPU for bf16 / fp16 / fp32; elsewhere ``"dense"`` while the float32
        logits, N x V x 4 bytes, are at most ``cce_jax.AUTO_DENSE_MAX_LOGIT_BYTES`` (32 MiB), ``"xla"`` above),
        ``"dense"``, ``"xla"``, a kernel preset
        (``"cce"``, ``"cce_kahan"``, ``"cce_kahan_full_c"``, ``"cce_kahan_full_e"``, ``"cce_exact"`` alias
        ``"cce_kahan_full_c_full_e"``), or a block config (:class:`XlaConfig`, ``KernelConfig``).
      classifier_layout: ``"vd"`` or ``"dv"``, see ``c``.
      vocab_parallel: :class:`VocabParallelOptions` when ``c`` is this device's vocabulary shard inside
        ``shard_map``.
      interpret: run Pallas kernels in interpret mode (default: only when no GPU is present, with a one-time
        ``UserWarning`` because it is slow). ``interpret=False`` with a kernel ``impl`` away from a GPU raises a
        ``ValueError`` at trace time.
      check_targets: raise :class:`cce_jax.TargetsOutOfRangeError` (a ``ValueError``; message
        ``"targets: K target id(s) outside [0, V) ...; first offending value X"``) if a target is out of range.
        With concrete targets (eager calls) it is raised directly. With traced targets (under ``jax.jit``) it
        is raised at run time in a host callback, and JAX delivers it as ``jax.errors.JaxRuntimeError`` whose
        message ends with that line.
      z_loss: weight ``w`` of PaLM's z-loss: the loss becomes ``loss + w * R(lse^2)`` where ``R`` is the same
        reduction over the same valid tokens and weights as the loss (per token for ``"none"``). Unlike a
        z-loss built from ``return_lse``, it keeps a scalar loss on the three-pass training path.
      grad_path: how a differentiated scalar loss (``"mean"`` / ``"sum"``) gets its gradient.
        ``"three_pass"``: the forward pass computes each chunk of logits once and forms loss, dE and dC
        from it (3 matmul passes; temporary memory one chunk of logits, see ``max_temp_bytes``).
        ``"recompute"``: a one-pass forward saves only the lse and the backward recomputes the logits
        (4 passes, smallest memory). ``"auto"`` (default): ``"three_pass"`` for scalar losses of the
        ``"xla"`` and kernel implementations, ``"recompute"`` for ``reduction="none"`` and under
        ``vocab_parallel``. Evaluation (no gradient) always runs the one-pass forward.
      max_temp_bytes: temporary-memory budget of the three-pass path, which sizes its token chunks.
        Default: 45% of the bytes of the gradients (dE and dC), at least 32 MiB.

    Returns:
      The loss (float32 scalar, or per-token for ``"none"``), and the lse if ``return_lse``.
    """
    vocab_local = _validate(
        e, c, targets, bias, weights, classifier_layout=classifier_layout, reduction=reduction,
        softcap=softcap, label_smoothing=label_smoothing, ignore_index=ignore_index,
    )
    shift = _check_shift(shift, targets.shape)
    filter_eps = _check_filter_eps(filter_eps)
    return_lse = _check_flag("return_lse", return_lse)
    check_targets = _check_flag("check_targets", check_targets)
    for name, flag in (("accum_e_fp32", accum_e_fp32), ("accum_c_fp32", accum_c_fp32),
                       ("filter_e_grad", filter_e_grad), ("filter_c_grad", filter_c_grad)):
        _check_flag(name, flag)
    if interpret is not None:
        _check_flag("interpret", interpret)
    z_loss, grad_path, max_temp_bytes = _check_training_options(z_loss, grad_path, max_temp_bytes)
    if vocab_parallel is not None and not isinstance(vocab_parallel, VocabParallelOptions):
        raise TypeError(f"vocab_parallel must be a VocabParallelOptions or None, got {type(vocab_parallel).__name__}")
    impl_name, impl_config = _resolve_impl(
        impl, e.dtype, interpret, num_logits=int(np.prod(e.shape[:-1], dtype=np.int64)) * vocab_local
    )
    if impl_name not in ("dense", "xla") and jnp.dtype(e.dtype) not in options_lib.SUPPORTED_DTYPES:
        raise TypeError(f"impl={impl_name!r} supports bf16, fp16 and fp32 inputs, got {e.dtype}")

    label_smoothing = float(label_smoothing)
    spec = LogitSpec(
        layout=classifier_layout,
        softcap=None if softcap is None else float(softcap),
        need_sum=label_smoothing > 0.0,
    )
    eps = options_lib.resolve_filter_eps(filter_eps, e.dtype)
    if spec.need_sum:
        eps = None
    backward = options_lib.backward_options(
        impl_name, filter_eps=eps, filter_e_grad=filter_e_grad, filter_c_grad=filter_c_grad,
        accum_e_fp32=accum_e_fp32, accum_c_fp32=accum_c_fp32,
    )
    stats_fn = _stats_fn(impl_name, impl_config, spec, backward, interpret)

    shape = tuple(targets.shape)
    d = e.shape[-1]
    num_tokens = int(np.prod(shape, dtype=np.int64))
    tgt = _shift_along_sequence(targets, shift, ignore_index).reshape(num_tokens)
    e2 = e.reshape(num_tokens, d)

    if vocab_parallel is None:
        vocab_size = vocab_local
    else:
        from cce_jax import vocab_parallel as vp_lib  # noqa: PLC0415

        vocab_size = vp_lib.global_vocab_size(vocab_parallel, vocab_local)

    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < vocab_size)
    out_of_range = valid & ~in_range
    stats_targets = jnp.where(valid & in_range, tgt, -1).astype(jnp.int32)

    if check_targets:
        first_bad = jnp.where(out_of_range, tgt, 0)[jnp.argmax(out_of_range)] if num_tokens else 0
        checks.check_targets(_raise_on_bad_targets, out_of_range.sum(), first_bad, vocab_size)

    if weights is None:
        w = valid.astype(jnp.float32)
    else:
        w = _shift_along_sequence(weights.astype(jnp.float32), shift, 0.0).reshape(num_tokens)
        w = jnp.where(valid, w, 0.0)

    three_pass = reduction != "none" and impl_name != "dense" and vocab_parallel is None and num_tokens > 0
    if grad_path == "three_pass" and not three_pass:
        raise ValueError(
            'grad_path="three_pass" needs a scalar loss (reduction "mean" or "sum"), impl "xla" or a kernel '
            f"preset, no vocab_parallel and at least one token; got reduction={reduction!r}, impl={impl_name!r}, "
            f"vocab_parallel={'set' if vocab_parallel is not None else None}"
        )
    if three_pass and grad_path != "recompute":
        return _scalar_loss(
            e2, c, bias, stats_targets, w, valid, out_of_range, shape=shape, shift=shift, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, vocab_size=vocab_size, return_lse=return_lse,
            training=_training_fn(impl_name, impl_config, spec, backward, interpret, e2, c, max_temp_bytes,
                                  stats_fn),
        )

    if num_tokens == 0:
        zeros = jnp.zeros((0,), jnp.float32)
        stats = TokenStats(zeros, zeros, zeros)
    elif vocab_parallel is None:
        stats = stats_fn(*align_varying(e2, c, bias, stats_targets))
    else:
        stats = vp_lib.token_stats(
            stats_fn, e2, c, bias, stats_targets, vocab_parallel, vocab_local, spec=spec
        )

    nll = stats.lse - stats.target_logit
    if spec.need_sum:
        # mean over the vocabulary of -log p_v = lse - sum_v z_v / V
        smooth = stats.lse - stats.sum_logits / vocab_size
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if z_loss:
        nll = nll + z_loss * jnp.square(stats.lse)
    nll = jnp.where(valid, nll, 0.0)
    nll = jnp.where(out_of_range, jnp.nan, nll)
    weighted = w * nll

    if reduction == "none":
        loss = _unshift(weighted, shape, shift)
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        total = w.sum()
        loss = weighted.sum() / jnp.where(total == 0, 1.0, total)

    if not return_lse:
        return loss
    lse = _unshift(jnp.where(valid, stats.lse, 0.0), shape, shift)
    return loss, lse


def _scalar_loss(e2, c, bias, stats_targets, w, valid, out_of_range, *, shape, shift, reduction,
                 label_smoothing, z_loss, vocab_size, return_lse, training):
    """A mean or sum loss as ``sum_n [a lse + b z_t + s sum z + q lse^2]`` on the three-pass path.

    Each token's weight ``w'`` is its weight, divided by the weights' sum for the mean, and NaN for an
    out-of-range target (so the loss and every gradient are NaN, never plausible numbers).
    """
    if reduction == "mean":
        total = w.sum()
        w = w / jnp.where(total == 0, 1.0, total)
    w = jnp.where(out_of_range, jnp.nan, w)
    coeffs = LossCoefficients(
        a=w,
        b=-(1.0 - label_smoothing) * w,
        s=-(label_smoothing / vocab_size) * w,
        q=z_loss * w,
    )
    e2, c, bias, stats_targets, *coeffs = align_varying(e2, c, bias, stats_targets, *coeffs)
    loss, stats = three_pass_lib.scalar_loss(e2, c, bias, stats_targets, LossCoefficients(*coeffs), training)
    if not return_lse:
        return loss
    return loss, _unshift(jnp.where(valid, stats.lse, 0.0), shape, shift)


def _training_fn(impl_name, impl_config, spec, backward, interpret, e2, c, max_temp_bytes, stats_fn):
    """The implementation's three-pass pieces; ``stats_fn`` (its recompute path) serves per-token cotangents."""
    n, d = e2.shape
    v = spec.vocab_size(c)
    budget = max_temp_bytes or three_pass_lib.default_budget(e2.shape, c.shape, e2.dtype)
    if impl_name == "xla":
        return xla_lib.training_impl(n, d, v, e2.dtype, spec=spec, backward=backward,
                                     config=impl_config or xla_lib.XlaConfig(), budget_bytes=budget,
                                     stats_fn=stats_fn)
    from cce_jax import cce as cce_lib  # noqa: PLC0415

    return cce_lib.training_impl(n, d, v, e2.dtype, spec=spec, backward=backward, config=impl_config,
                                 interpret=interpret, budget_bytes=budget, stats_fn=stats_fn)


def _stats_fn(impl_name, impl_config, spec, backward, interpret):
    if impl_name == "dense":
        return functools.partial(dense_lib.token_stats, spec=spec)
    if impl_name == "xla":
        return functools.partial(
            xla_lib.token_stats, spec=spec, backward=backward, config=impl_config or xla_lib.XlaConfig()
        )
    from cce_jax import cce as cce_lib  # noqa: PLC0415

    return functools.partial(
        cce_lib.token_stats, spec=spec, backward=backward, config=impl_config, interpret=interpret
    )


def compute_z_loss(
    lse: jax.Array,
    targets: jax.Array | None = None,
    shift: int | bool = 0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> jax.Array:
    """z-loss ``lse**2`` over non-ignored tokens (PaLM's auxiliary loss), reduced like the main loss.

    Args:
      lse: per-token log-sum-exp from ``linear_cross_entropy(..., return_lse=True)`` (its last axis is
        ``T - shift``).
      targets: the same (unshifted) targets given to the loss, to know which tokens count; None counts all.
      shift: the shift given to the loss.
      ignore_index: the ignore_index given to the loss.
      reduction: ``"mean"`` over non-ignored tokens (0.0 if none), ``"sum"`` or ``"none"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of "mean", "sum", "none", got {reduction!r}')
    z = jnp.square(lse.astype(jnp.float32))
    if targets is None:
        valid = jnp.ones(lse.shape, bool)
    else:
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
        shift = _check_shift(shift, targets.shape)
        if shift:
            targets = targets[..., shift:]
        if tuple(targets.shape) != tuple(lse.shape):
            raise ValueError(
                f"lse.shape must equal targets.shape with the last axis shortened by shift "
                f"({targets.shape}), got {lse.shape}"
            )
        valid = targets != ignore_index
    z = jnp.where(valid, z, 0.0)
    if reduction == "none":
        return z
    if reduction == "sum":
        return z.sum()
    count = valid.sum()
    return z.sum() / jnp.where(count == 0, 1, count)
