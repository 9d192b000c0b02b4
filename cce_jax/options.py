"""Implementation names, kernel presets and the resolved backward configuration.

The loss API takes strings (``impl="cce"``) for the common cases and small config dataclasses
(``impl=XlaConfig(block_n=..., block_v=...)``) when a caller wants to pin block sizes. Both resolve here
into one :class:`BackwardOptions`, which every implementation reads the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

ImplName = Literal[
    "auto",
    "dense",
    "xla",
    "cce",
    "cce_kahan",
    "cce_kahan_full_c",
    "cce_kahan_full_e",
    "cce_exact",
    "cce_kahan_full_c_full_e",
]

# Each kernel preset fixes some of the backward options; fields it does not name come from the caller.
KERNEL_PRESETS: dict[str, dict[str, bool | None]] = {
    "cce": {},
    "cce_kahan": {"accum_e_fp32": True, "accum_c_fp32": True},
    "cce_kahan_full_c": {"accum_e_fp32": True, "accum_c_fp32": True, "filter_c_grad": False},
    "cce_kahan_full_e": {"accum_e_fp32": True, "accum_c_fp32": True, "filter_e_grad": False},
    "cce_exact": {
        "accum_e_fp32": True,
        "accum_c_fp32": True,
        "filter_e_grad": False,
        "filter_c_grad": False,
    },
}
KERNEL_PRESETS["cce_kahan_full_c_full_e"] = KERNEL_PRESETS["cce_exact"]

IMPL_NAMES: tuple[str, ...] = ("auto", "dense", "xla", *KERNEL_PRESETS)

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class BackwardOptions:
    """What the backward pass of a blockwise implementation may skip or must accumulate in float32.

    Attributes:
      filter_eps: a tile of the gradient is skipped when every ``|softmax - onehot|`` in it is strictly
        below this value; ``None`` disables filtering.
      filter_e: whether the dE computation may skip tiles.
      filter_c: whether the dC (and dbias) computation may skip tiles.
      accum_e_fp32: accumulate dE in float32.
      accum_c_fp32: accumulate dC in float32.
    """

    filter_eps: float | None = None
    filter_e: bool = True
    filter_c: bool = True
    accum_e_fp32: bool = True
    accum_c_fp32: bool = True

    @property
    def filters_e(self) -> bool:
        return self.filter_eps is not None and self.filter_e

    @property
    def filters_c(self) -> bool:
        return self.filter_eps is not None and self.filter_c


def resolve_filter_eps(filter_eps: float | str | None, dtype) -> float | None:
    """``"auto"`` is the machine epsilon of ``dtype`` divided by 32 (bf16: 2**-12, fp16: 2**-15, fp32: 2**-28)."""
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        return float(jnp.finfo(dtype).eps) / 32.0
    return float(filter_eps)


def backward_options(
    preset: str,
    *,
    filter_eps: float | None,
    filter_e_grad: bool,
    filter_c_grad: bool,
    accum_e_fp32: bool,
    accum_c_fp32: bool,
) -> BackwardOptions:
    """Applies ``preset``'s fixed fields over the caller's options."""
    opts = dict(
        filter_e_grad=filter_e_grad,
        filter_c_grad=filter_c_grad,
        accum_e_fp32=accum_e_fp32,
        accum_c_fp32=accum_c_fp32,
    )
    opts.update(KERNEL_PRESETS.get(preset, {}))
    return BackwardOptions(
        filter_eps=filter_eps,
        filter_e=bool(opts["filter_e_grad"]),
        filter_c=bool(opts["filter_c_grad"]),
        accum_e_fp32=bool(opts["accum_e_fp32"]),
        accum_c_fp32=bool(opts["accum_c_fp32"]),
    )


@dataclasses.dataclass(frozen=True)
class VocabParallelOptions:
    """The classifier passed to the loss is this device's shard of the vocabulary.

    Use inside ``shard_map`` (or another context that binds ``axis_name``): ``c`` holds rows
    ``[start, stop)`` of the full classifier (columns for ``classifier_layout="dv"``) and ``bias`` the same
    slice. ``start``/``stop`` default to an even split by ``lax.axis_index(axis_name)``. For uneven splits
    pass per-device sequences (one entry per device along the axis, e.g. from
    :func:`cce_jax.vocab_parallel_options`) or traced per-device scalars; each shard is then padded to a
    common length and its rows past ``stop - start`` are masked out (see :mod:`cce_jax.vocab_parallel`).
    """

    axis_name: str | tuple[str, ...]
    start: int | jnp.ndarray | None = None
    stop: int | jnp.ndarray | None = None
