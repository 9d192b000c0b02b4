"""Vocabulary parallelism: the classifier is split over devices by vocabulary rows; only per-token scalars move.

Inside ``jax.shard_map`` every device of the vocabulary axis holds a shard of ``c`` (and ``bias``) and the same
tokens. Each device computes its local per-token ``(lse, target_logit, sum_logits)`` with any implementation;
the global values are

- ``lse = m + log(psum(exp(lse_local - m)))`` with ``m = pmax(lse_local)`` (``m`` only stabilises, so its
  gradient is stopped);
- ``target_logit = psum(target_logit_local)`` (exactly one shard owns each target; the others report 0);
- ``sum_logits = psum(sum_logits_local)`` (label smoothing only).

These collectives are plain ``lax`` operations outside the implementations' ``custom_vjp``, so JAX's AD derives
the local cotangents (``g_lse_local = g_lse * exp(lse_local - lse)``) and the transpose of the one broadcast of
``e`` onto the vocabulary axis is the one ``psum`` of dE. Forward traffic: one ``pmax`` of N floats and one
``psum`` of 2N (3N with label smoothing). Backward traffic: one ``psum`` of the (N, D) dE.

Uneven splits. Under ``shard_map`` every shard has the same shape, so when V is not divisible by the number of
devices each device's shard is padded to a common length L: device k's rows ``[0, stop_k - start_k)`` are global
rows ``[start_k, stop_k)`` and its remaining rows are padding, which contributes nothing to the loss or lse and
receives a zero gradient. The padding is masked through the bias (a ``-1e30`` logit underflows to an exact zero
in the softmax) rather than by slicing, so ``c`` is never copied; with a softcap a masked logit is exactly
``-softcap``, whose known contribution is removed from the lse and the logit sum. :func:`vocab_partition` gives
the balanced split (shard sizes differ by at most one) and :func:`pad_vocab_shards` lays a full classifier out
that way; padding at the end (``[k * L, min((k + 1) * L, V))``, what :func:`sharded_linear_cross_entropy` uses
with ``vocab_size=``) works the same.

``VocabParallelOptions(axis_name, start, stop)`` takes this device's range as: nothing (an even split by
``axis_index``; V = L x axis size), per-device sequences of Python ints (:func:`vocab_parallel_options`; V is
known at trace time) or traced int scalars (e.g. a (1,)-slice of an array sharded over the axis; V then costs one
scalar ``pmax``).

``shard_map(check_vma=True)`` (JAX's default) is what keeps the backward at one dE ``psum``: ``e`` and ``c`` are
cast to vary over the same mesh axes before the implementation is called, so the transposes of those casts are
exactly the dE sum over the vocabulary axis and, for a classifier replicated over data axes, the dC sum over
them. Implementations must then declare varying axes on their loop carries and kernel outputs; all of them do
(the Pallas kernels through their output types), but jax 0.11.2's Pallas interpreter rejects varying axes, so
kernels in interpret mode need ``check_vma=False``. Results are then the same and the backward adds one
all-reduce of per-token scalars.

Under ``jax.jit`` with sharded arrays, :func:`sharded_linear_cross_entropy` wraps the above in ``shard_map`` so
neither the classifier nor the logits are ever gathered.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cce_jax.options import VocabParallelOptions
from cce_jax.stats import LogitSpec, TokenStats, TokenStatsFn
from cce_jax.vma import align_varying

# A logit this negative has exp(z - max) == 0 exactly in float32 and leaves room to sum many of them.
_PAD_BIAS = -1e30

Partition = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------------------------------------------
# Partitions and layouts (host-side helpers)
# --------------------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def vocab_partition(vocab_size: int, num_shards: int) -> Partition:
    """Balanced contiguous split of ``range(vocab_size)`` into ``num_shards`` ``(start, stop)`` ranges.

    The first ``vocab_size % num_shards`` shards get one row more than the others, so shard sizes differ by at
    most one and every shard pads by at most one row to the common length ``ceil(vocab_size / num_shards)``.
    """
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    num_shards = _check_positive_int("num_shards", num_shards)
    base, extra = divmod(vocab_size, num_shards)
    bounds, start = [], 0
    for k in range(num_shards):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def _check_partition(partition) -> Partition:
    try:
        parts = tuple((int(a), int(b)) for a, b in partition)
    except (TypeError, ValueError):
        raise TypeError(f"partition must be a sequence of (start, stop) int pairs, got {partition!r}") from None
    if not parts:
        raise ValueError("partition must have at least one shard")
    expected = 0
    for a, b in sorted(parts):
        if a != expected or b < a:
            raise ValueError(
                f"partition must split [0, V) into contiguous, non-overlapping (start, stop) ranges, got {parts}"
            )
        expected = b
    if expected < 1:
        raise ValueError(f"partition must cover at least one vocabulary row, got {parts}")
    return parts


def shard_length(partition: Sequence[tuple[int, int]]) -> int:
    """The common (padded) per-device length L of a partition: its largest shard."""
    return max(b - a for a, b in _check_partition(partition))


def _padded_rows(parts: Partition) -> tuple[np.ndarray, np.ndarray]:
    """For each row of the padded layout: the source row in vocabulary order, and whether it is a real row."""
    length = shard_length(parts)
    source = np.zeros(len(parts) * length, np.int32)
    live = np.zeros(len(parts) * length, bool)
    for k, (a, b) in enumerate(parts):
        source[k * length : k * length + b - a] = np.arange(a, b)
        live[k * length : k * length + b - a] = True
    return source, live


def pad_vocab_shards(x: jax.Array, partition: Sequence[tuple[int, int]], *, axis: int = 0) -> jax.Array:
    """Lays out a full classifier (or bias) so that an even split over devices gives each its shard.

    Shard k of the result (rows ``[k * L, (k + 1) * L)`` along ``axis``, L = :func:`shard_length`) holds rows
    ``[start_k, stop_k)`` of ``x`` followed by zero padding. Use ``axis=0`` for ``c`` (V, D) and ``bias``,
    ``axis=1`` for ``c`` (D, V). This copies ``x``: do it once when building the parameters.
    """
    parts = _check_partition(partition)
    vocab = max(b for _, b in parts)
    if x.shape[axis] != vocab:
        raise ValueError(f"x.shape[{axis}] must equal the partition's vocabulary size {vocab}, got {x.shape}")
    source, live = _padded_rows(parts)
    mask = live.reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])
    return jnp.where(mask, jnp.take(x, source, axis=axis), jnp.zeros((), x.dtype))


def unpad_vocab_shards(x: jax.Array, partition: Sequence[tuple[int, int]], *, axis: int = 0) -> jax.Array:
    """Inverse of :func:`pad_vocab_shards`: the (V, ...) array without padding rows, in vocabulary order."""
    parts = _check_partition(partition)
    length = shard_length(parts)
    if x.shape[axis] != length * len(parts):
        raise ValueError(
            f"x.shape[{axis}] must be {len(parts)} shards x {length} = {length * len(parts)}, got {x.shape}"
        )
    source, live = _padded_rows(parts)
    position = np.zeros(max(b for _, b in parts), np.int32)
    position[source[live]] = np.flatnonzero(live)
    return jnp.take(x, position, axis=axis)


def vocab_parallel_options(
    axis_name: str | tuple[str, ...], partition: Sequence[tuple[int, int]]
) -> VocabParallelOptions:
    """Options for a shard_map over ``axis_name`` where device k holds ``partition[k]`` (padded to L rows).

    ``start``/``stop`` are per-device sequences, so the global vocabulary size is known without communication.
    """
    parts = _check_partition(partition)
    return VocabParallelOptions(
        axis_name, start=tuple(a for a, _ in parts), stop=tuple(b for _, b in parts)
    )


# --------------------------------------------------------------------------------------------------------------
# Inside shard_map: the hooks called by cce_jax.api
# --------------------------------------------------------------------------------------------------------------


def _axes(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _axis_size(axis_name) -> int:
    try:
        size = 1
        for a in _axes(axis_name):
            size *= lax.axis_size(a)
        return size
    except NameError as err:
        raise ValueError(
            f"vocab_parallel.axis_name {axis_name!r} is not a bound mesh axis: call linear_cross_entropy with "
            "vocab_parallel= inside jax.shard_map over a mesh with that axis (or use "
            "sharded_linear_cross_entropy under jax.jit)"
        ) from err


def _axis_index(axis_name):
    axes = _axes(axis_name)
    return lax.axis_index(axes if len(axes) > 1 else axes[0])


def _is_static_int(x) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_sequence(x) -> bool:
    return isinstance(x, (tuple, list))


def _local_bounds(options: VocabParallelOptions, local_vocab: int):
    """Returns ``(start, count, static_vocab, padded)`` for this device.

    ``start``/``count`` are int32 scalars (traced unless the axis has one device), ``static_vocab`` the global
    V when it is known at trace time (else None), ``padded`` whether some rows of the local shard may be padding.
    """
    start, stop = options.start, options.stop
    n = _axis_size(options.axis_name)
    if start is None and stop is None:
        first = _axis_index(options.axis_name).astype(jnp.int32) * local_vocab
        return first, jnp.int32(local_vocab), local_vocab * n, False
    if start is None or stop is None:
        raise ValueError("vocab_parallel: give both start and stop, or neither (an even split by axis_index)")
    if _is_sequence(start) or _is_sequence(stop):
        if not (_is_sequence(start) and _is_sequence(stop)) or len(start) != n or len(stop) != n:
            raise ValueError(
                f"vocab_parallel: per-device start/stop sequences must both have one entry per device of axis "
                f"{options.axis_name!r} ({n}), got start={start!r}, stop={stop!r}"
            )
        parts = _check_partition(zip(start, stop))
        length = shard_length(parts)
        if length > local_vocab:
            raise ValueError(
                f"vocab_parallel: a shard spans {length} rows but c holds only {local_vocab} per device"
            )
        k = _axis_index(options.axis_name)
        first = jnp.asarray([a for a, _ in parts], jnp.int32)[k]
        count = jnp.asarray([b - a for a, b in parts], jnp.int32)[k]
        padded = any(b - a != local_vocab for a, b in parts)
        return first, count, max(b for _, b in parts), padded
    if _is_static_int(start) and _is_static_int(stop):
        if n != 1:
            raise ValueError(
                f"vocab_parallel: start={start}, stop={stop} are Python ints, hence the same on all {n} devices of "
                f"axis {options.axis_name!r}; pass one value per device (sequences, see vocab_parallel_options) "
                "or traced scalars"
            )
        if not 0 <= start <= stop or stop - start > local_vocab:
            raise ValueError(
                f"vocab_parallel: need 0 <= start <= stop and stop - start <= {local_vocab} (c's local vocabulary), "
                f"got start={start}, stop={stop}"
            )
        return jnp.int32(start), jnp.int32(stop - start), int(stop), stop - start != local_vocab
    # Traced per-device values, e.g. slices of an array sharded over the axis. Shape () or (1,).
    first = jnp.reshape(jnp.asarray(start), ()).astype(jnp.int32)
    last = jnp.reshape(jnp.asarray(stop), ()).astype(jnp.int32)
    return first, last - first, None, True


def global_vocab_size(options: VocabParallelOptions, local_vocab: int):
    """The full vocabulary size V: a Python int, or (with traced start/stop) the ``pmax`` of ``stop``."""
    first, count, static_vocab, _ = _local_bounds(options, local_vocab)
    if static_vocab is not None:
        return static_vocab
    return lax.pmax(first + count, options.axis_name)


def _remove_padding(stats: TokenStats, e, c, bias, live, count, local_vocab, spec: LogitSpec) -> TokenStats:
    """Local stats over the live rows only, given stats computed with padded rows masked by ``_PAD_BIAS``."""
    lse, target, total = stats
    num_pad = (local_vocab - count).astype(jnp.float32)
    if spec.softcap is not None:
        # A masked logit is softcap * tanh(-huge) = -softcap exactly; take its exp out of the sum. The remaining
        # mass is at least count * exp(-softcap), so log1p stays well conditioned unless the shard is empty.
        empty = count == 0
        ratio = jnp.where(empty, 0.0, num_pad * jnp.exp(-spec.softcap - lse))
        lse = jnp.where(empty, _PAD_BIAS, lse + jnp.log1p(-ratio))
        if spec.need_sum:
            total = total + spec.softcap * num_pad
    elif spec.need_sum:
        # Without a softcap the logits are linear in c and bias: sum over live rows = e . sum(c) + sum(bias).
        # (The masked sum from the implementation carries -1e30 per padded row and is dropped.)
        vaxis = 0 if spec.layout == "vd" else 1
        mask = live[:, None] if spec.layout == "vd" else live[None, :]
        c_sum = jnp.sum(jnp.where(mask, c, 0).astype(jnp.float32), axis=vaxis)
        total = jnp.dot(e.astype(jnp.float32), c_sum, precision=lax.Precision.HIGHEST)
        if bias is not None:
            total = total + jnp.sum(jnp.where(live, bias.astype(jnp.float32), 0.0))
    return TokenStats(lse, target, total)


def token_stats(
    stats_fn: TokenStatsFn,
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    options: VocabParallelOptions,
    local_vocab: int,
    *,
    spec: LogitSpec,
) -> TokenStats:
    """Global per-token stats from this device's vocabulary shard; identical on every device of the axis.

    Args:
      stats_fn: the implementation, computing local stats with local target ids (-1 = not on this shard).
      e: (N, D) tokens, the same on every device of the vocabulary axis.
      c: this device's shard, (L, D) or (D, L); rows past ``stop - start`` are padding.
      bias: this device's (L,) bias shard, or None.
      targets: (N,) global target ids, -1 for ignored or out-of-range tokens.
      options: the vocabulary axis and this device's range.
      local_vocab: L.
      spec: the logit function (softcap and whether ``sum_logits`` is needed).
    """
    axis = options.axis_name
    start, count, _, padded = _local_bounds(options, local_vocab)
    owned = (targets >= start) & (targets < start + count)
    local_targets = jnp.where(owned, targets - start, -1).astype(jnp.int32)
    if padded:
        live = jnp.arange(local_vocab, dtype=jnp.int32) < count
        base = jnp.zeros((local_vocab,), jnp.float32) if bias is None else bias.astype(jnp.float32)
        stats_bias = jnp.where(live, base, _PAD_BIAS)
    else:
        stats_bias = bias
    e, c, stats_bias, local_targets = align_varying(e, c, stats_bias, local_targets, axes=_axes(axis))
    local = stats_fn(e, c, stats_bias, local_targets)
    if padded:
        local = _remove_padding(local, e, c, bias, live, count, local_vocab, spec)

    m = lax.pmax(lax.stop_gradient(local.lse), axis)
    parts = [jnp.exp(local.lse - m), local.target_logit]
    if spec.need_sum:
        parts.append(local.sum_logits)
    summed = lax.psum(jnp.stack(parts), axis)
    lse = m + jnp.log(summed[0])
    total = summed[2] if spec.need_sum else jnp.zeros_like(lse)
    return TokenStats(lse, summed[1], total)


# --------------------------------------------------------------------------------------------------------------
# Under jax.jit with sharded arrays
# --------------------------------------------------------------------------------------------------------------


def _axis_tuple(name: str, value, mesh_axes) -> tuple[str, ...]:
    if value is None:
        axes = ()
    elif isinstance(value, str):
        axes = (value,)
    elif isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value):
        axes = tuple(value)
    else:
        raise TypeError(f"{name} must be a mesh axis name or a tuple of them, got {value!r}")
    unknown = [a for a in axes if a not in mesh_axes]
    if unknown:
        raise ValueError(f"{name}: {unknown} not among the mesh axes {tuple(mesh_axes)}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name} names an axis twice: {axes}")
    return axes


def _spec_entry(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _pad_at_end_partition(vocab_size: int, padded: int, num_shards: int) -> Partition:
    length = padded // num_shards
    return tuple((min(k * length, vocab_size), min((k + 1) * length, vocab_size)) for k in range(num_shards))


def _conform(x, mesh, spec: PartitionSpec):
    """Under Explicit mesh axes shard_map needs inputs already laid out as ``spec``; reshard those that are not."""
    if x is None:
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return x  # Auto axes: shard_map's input resharding is implicit.
    current = jax.typeof(x).sharding
    if getattr(current, "spec", None) is not None and _normalized(current.spec, x.ndim) == _normalized(spec, x.ndim):
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _normalized(spec: PartitionSpec, ndim: int) -> tuple:
    entries = tuple(spec) + (None,) * (ndim - len(spec))

    def norm(entry):
        if entry is None:
            return ()
        return (entry,) if isinstance(entry, str) else tuple(entry)

    return tuple(norm(x) for x in entries)


def sharded_linear_cross_entropy(
    e: jax.Array,
    c: jax.Array,
    targets: jax.Array,
    bias: jax.Array | None = None,
    *,
    vocab_axis: str | tuple[str, ...],
    batch_axes: str | tuple[str, ...] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    shift: int | bool = 0,
    return_lse: bool = False,
    weights: jax.Array | None = None,
    classifier_layout: Literal["vd", "dv"] = "vd",
    check_vma: bool | None = None,
    **options,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`cce_jax.linear_cross_entropy` on global arrays sharded over a mesh; use it under ``jax.jit``.

    ``c`` (and ``bias``) are split over the vocabulary across ``vocab_axis``, the first axis of ``targets``
    (and of ``e`` and ``weights``) across ``batch_axes``; everything else is replicated. Each device computes
    its (tokens x vocabulary shard) block; only per-token scalars and dE move over ``vocab_axis``, and only the
    reduced loss (and, through AD, dC of a classifier replicated over the batch axes) over ``batch_axes``. The
    classifier and the logits are never gathered. Gradients come back sharded like their inputs.

    Args:
      e, c, targets, bias, weights, ignore_index, shift, return_lse, classifier_layout: as in
        :func:`cce_jax.linear_cross_entropy`, for the global arrays. ``shift`` acts along the last axis of
        ``targets``, which must not be the sharded batch axis.
      vocab_axis: mesh axis (or tuple of axes) splitting the vocabulary. c's vocabulary dimension must be
        divisible by its size.
      batch_axes: mesh axes splitting the first axis of ``targets``/``e``/``weights``; None to replicate tokens.
      mesh: a ``jax.sharding.Mesh`` (Auto or Explicit axes); default: the mesh set by ``jax.set_mesh``.
      vocab_size: the real vocabulary size V when c is padded at the end to a multiple of the vocabulary axis
        size (rows ``[V, c_rows)`` are padding: never predicted, zero gradient). Default: all rows are real.
      reduction: ``"mean"`` (over all non-ignored tokens of the global batch), ``"sum"``, or ``"none"``
        (per-token losses, sharded like ``targets``).
      check_vma: passed to ``jax.shard_map``. With True JAX tracks which values vary over which mesh axes and
        the backward needs no communication beyond the dE sum; False makes the transposed ``psum`` of the
        forward statistics an extra all-reduce of per-token scalars in the backward (results are the same).
        Default: True for the pure-JAX implementations, False for the Pallas kernels (whose calls do not
        declare varying axes yet).
      **options: any other keyword of :func:`cce_jax.linear_cross_entropy` (softcap, label_smoothing, impl,
        filter_eps, accum_*_fp32, filter_*_grad, interpret, check_targets).

    Returns:
      The loss (a replicated scalar, or per-token sharded like ``targets``) and, with ``return_lse``, the
      per-token lse sharded like ``targets``.
    """
    from cce_jax.api import linear_cross_entropy  # noqa: PLC0415  (api imports this module lazily)

    if "vocab_parallel" in options:
        raise TypeError("sharded_linear_cross_entropy sets vocab_parallel itself; do not pass it")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("sharded_linear_cross_entropy needs mesh= or an active jax.set_mesh(...)")
    elif not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    vaxes = _axis_tuple("vocab_axis", vocab_axis, mesh.axis_names)
    if not vaxes:
        raise ValueError("vocab_axis must name at least one mesh axis")
    baxes = _axis_tuple("batch_axes", batch_axes, mesh.axis_names)
    if set(vaxes) & set(baxes):
        raise ValueError(f"vocab_axis {vaxes} and batch_axes {baxes} must be different mesh axes")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be one of "mean", "sum", "none", got {reduction!r}')
    for name, x in (("e", e), ("c", c), ("targets", targets)):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if classifier_layout not in ("vd", "dv"):
        raise ValueError(f'classifier_layout must be "vd" or "dv", got {classifier_layout!r}')
    if c.ndim != 2:
        raise ValueError(f"c must be 2-D, got shape {c.shape}")

    sizes = dict(mesh.shape)
    n_vocab = int(np.prod([sizes[a] for a in vaxes]))
    n_batch = int(np.prod([sizes[a] for a in baxes])) if baxes else 1
    vdim = 0 if classifier_layout == "vd" else 1
    rows = c.shape[vdim]
    if rows % n_vocab:
        raise ValueError(
            f"c's vocabulary dimension ({rows}) must be divisible by the size of vocab_axis {vaxes} ({n_vocab}); "
            f"pad c (and bias) with rows at the end and pass vocab_size=<real V>"
        )
    if vocab_size is None:
        vp_options = VocabParallelOptions(_spec_entry(vaxes))
    else:
        vocab_size = _check_positive_int("vocab_size", vocab_size)
        if vocab_size > rows:
            raise ValueError(f"vocab_size ({vocab_size}) exceeds c's vocabulary dimension ({rows})")
        vp_options = vocab_parallel_options(_spec_entry(vaxes), _pad_at_end_partition(vocab_size, rows, n_vocab))
    if baxes:
        if targets.ndim == 0 or targets.shape[0] % n_batch:
            raise ValueError(
                f"targets.shape[0] must be divisible by the size of batch_axes {baxes} ({n_batch}), "
                f"got targets.shape {targets.shape}"
            )
        if shift and targets.ndim == 1:
            raise ValueError(
                "shift pairs tokens along the last axis of targets, which here is the sharded batch axis; "
                "give targets a (batch, sequence) shape"
            )

    bentry, ventry = _spec_entry(baxes), _spec_entry(vaxes)
    tok_spec = PartitionSpec(bentry, *([None] * (targets.ndim - 1))) if targets.ndim else PartitionSpec()
    e_spec = PartitionSpec(bentry, *([None] * (e.ndim - 1))) if targets.ndim else PartitionSpec()
    c_spec = PartitionSpec(ventry, None) if vdim == 0 else PartitionSpec(None, ventry)
    b_spec = PartitionSpec(ventry)

    inner_reduction = "none" if reduction == "none" else "sum"
    shift_n = int(shift)

    def local(e_l, c_l, t_l, b_l, w_l):
        out = linear_cross_entropy(
            e_l, c_l, t_l, b_l, ignore_index=ignore_index, reduction=inner_reduction, shift=shift_n,
            return_lse=return_lse, weights=w_l, classifier_layout=classifier_layout, vocab_parallel=vp_options,
            **options,
        )
        loss, lse = out if return_lse else (out, None)
        if reduction == "sum":
            loss = lax.psum(loss, baxes) if baxes else loss
        elif reduction == "mean":
            t_s = t_l[..., shift_n:] if shift_n else t_l
            valid = t_s != ignore_index
            w = valid.astype(jnp.float32)
            if w_l is not None:
                w = jnp.where(valid, (w_l[..., shift_n:] if shift_n else w_l).astype(jnp.float32), 0.0)
            num_den = jnp.stack([loss, w.sum()])
            num_den = lax.psum(num_den, baxes) if baxes else num_den
            loss = num_den[0] / jnp.where(num_den[1] == 0, 1.0, num_den[1])
        return (loss, lse) if return_lse else loss

    loss_spec = tok_spec if reduction == "none" else PartitionSpec()
    out_specs = (loss_spec, tok_spec) if return_lse else loss_spec
    args = (e, c, targets, bias, weights)
    specs = (e_spec, c_spec, tok_spec, b_spec, tok_spec)
    args = tuple(_conform(x, mesh, s) for x, s in zip(args, specs))
    if check_vma is None:
        check_vma = _tracks_varying_axes(options.get("impl", "auto"), e.dtype, options.get("interpret"))
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=bool(check_vma))
    return fn(*args)


def _tracks_varying_axes(impl, dtype, interpret) -> bool:
    """Whether an implementation runs under ``shard_map(check_vma=True)``: the pure-JAX ones and the compiled
    kernels do; the kernels in Pallas interpret mode do not (jax 0.11.2's interpreter rejects varying axes)."""
    from cce_jax.api import _resolve_impl  # noqa: PLC0415
    from cce_jax.cce import resolve_interpret  # noqa: PLC0415

    name, _ = _resolve_impl(impl, dtype, interpret)
    return name in ("dense", "xla") or not resolve_interpret(interpret)
