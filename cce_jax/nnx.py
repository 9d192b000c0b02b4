"""Flax NNX head: the classifier of a language model whose loss never materialises the logits.

:class:`LinearCrossEntropyHead` replaces the ``nnx.Linear(d, vocab, use_bias=False)`` at the top of a decoder
(same ``kernel`` (D, V) and ``bias`` (V,) parameters, so the parameter tree and checkpoints do not change) or
borrows the table of a tied ``nnx.Embed`` at call time. Called with targets it returns
:func:`cce_jax.linear_cross_entropy`; called without, the logits for inference.

This module imports flax; ``import cce_jax`` alone does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from cce_jax.optional import require_flax

require_flax("cce_jax.nnx")
from flax import nnx  # noqa: E402

from cce_jax import api
from cce_jax import logits as logits_lib

default_kernel_init = nnx.initializers.lecun_normal()  # as nnx.Linear: logits start O(1) for unit-RMS inputs
default_bias_init = nnx.initializers.zeros_init()

# Options of :func:`cce_jax.linear_cross_entropy` that a head stores as defaults and that every call may
# override. The head itself decides ``classifier_layout``; ``weights`` and ``return_lse`` are per call.
LOSS_OPTIONS: tuple[str, ...] = (
    "ignore_index",
    "softcap",
    "reduction",
    "shift",
    "label_smoothing",
    "filter_eps",
    "accum_e_fp32",
    "accum_c_fp32",
    "filter_e_grad",
    "filter_c_grad",
    "impl",
    "vocab_parallel",
    "interpret",
    "check_targets",
    "z_loss",
    "grad_path",
    "max_temp_bytes",
)


def merge_loss_options(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The head's stored options with a call's overrides on top; unknown names raise a ``TypeError``."""
    unknown = sorted(set(overrides) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}; a head call accepts weights, return_lse, "
            f"last_only and the loss options {', '.join(LOSS_OPTIONS)}"
        )
    return {**defaults, **overrides}


def apply_head(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array | None,
    *,
    classifier_layout: str,
    dtype: Any,
    options: Mapping[str, Any],
    weights: jax.Array | None = None,
    return_lse: bool = False,
    last_only: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The computation shared by the NNX and Linen heads once the classifier arrays are known.

    ``e`` and ``c`` are cast to ``dtype`` (``None``: their promoted dtype, the Flax convention). With targets:
    :func:`cce_jax.linear_cross_entropy` with ``options``. Without: float32 logits ``softcap(e @ c + bias)``
    of shape ``(..., V)``, from the same logit function the loss uses, of the last position only when
    ``last_only`` (``e`` is then ``(..., T, D)`` and the result ``(..., V)``).
    """
    if not hasattr(e, "dtype") or not jnp.issubdtype(e.dtype, jnp.floating):
        raise TypeError(f"e must be a floating-point array of hidden states, got {getattr(e, 'dtype', type(e))}")
    dtype = jnp.result_type(e.dtype, c.dtype) if dtype is None else jnp.dtype(dtype)
    e, c = e.astype(dtype), c.astype(dtype)
    if targets is not None:
        if last_only:
            raise ValueError("last_only applies to logits only; call the head without targets to get them")
        return api.linear_cross_entropy(
            e, c, targets, bias, weights=weights, return_lse=return_lse, classifier_layout=classifier_layout,
            **options,
        )
    if weights is not None or return_lse:
        raise ValueError("weights and return_lse need targets; without targets the head returns logits")
    softcap = options.get("softcap")
    if softcap is not None and (isinstance(softcap, bool) or not softcap > 0):
        raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
    if last_only:
        if e.ndim < 2:
            raise ValueError(f"last_only needs e shaped (..., T, D), got shape {e.shape}")
        e = e[..., -1, :]
    d_axis = 1 if classifier_layout == "vd" else 0
    if c.shape[d_axis] != e.shape[-1]:
        raise ValueError(f"e must have D = {c.shape[d_axis]} features (the classifier's), got shape {e.shape}")
    z = logits_lib.logits(e.reshape(-1, e.shape[-1]), c, bias, classifier_layout, softcap)
    return z.reshape(*e.shape[:-1], z.shape[-1])


def tied_table(embed: Any, vocab_size: int, features: int) -> jax.Array:
    """The (V, D) array behind a tied embedding given as an ``Embed`` module, a ``Variable`` or an array."""
    table = getattr(embed, "embedding", embed)
    if isinstance(table, nnx.Variable):
        table = table[...]
    if not hasattr(table, "shape") or not hasattr(table, "dtype"):
        raise TypeError(f"embed must be an Embed module or its (V, D) table, got {type(embed).__name__}")
    if tuple(table.shape) != (vocab_size, features):
        raise ValueError(
            f"embed must hold a ({vocab_size}, {features}) table (vocab_size, in_features), got shape {table.shape}"
        )
    return table


class LinearCrossEntropyHead(nnx.Module):
    """Classifier + cross-entropy head for Flax NNX models, computed by :func:`cce_jax.linear_cross_entropy`.

    Untied (default), the head owns ``kernel`` (in_features, vocab_size) and, with ``use_bias``, ``bias``
    (vocab_size,): the parameters of the ``nnx.Linear`` it replaces, under the same names. Tied
    (``tied=True``), it owns no classifier and each call passes ``embed=`` the model's ``nnx.Embed`` (or its
    table); the (V, D) table is read in place (``classifier_layout="vd"``), never copied or transposed, and the
    parameter stays where it is in the model's state.

    Example::

      head = LinearCrossEntropyHead(512, 32_003, rngs=nnx.Rngs(0), shift=1)
      loss = head(hidden, tokens)                      # mean next-token loss, no (N, V) logits
      per_token = head(hidden, tokens, reduction="none")
      logits = head(hidden, last_only=True)            # (B, V) for sampling

    Args:
      in_features: D, the width of the hidden states.
      vocab_size: V.
      tied: borrow the classifier from an ``Embed`` passed at each call instead of owning one.
      use_bias: own a (V,) bias (also allowed when tied).
      dtype: compute dtype of hidden states and classifier (``None``: promote the two, as Flax layers do).
        Loss math is float32 whatever it is.
      param_dtype: dtype of the parameters this head creates.
      kernel_init, bias_init: initializers (``nnx.with_partitioning`` wrappers work).
      kernel_metadata, bias_metadata: ``Variable`` metadata, e.g. ``{"out_sharding": ("embed", "vocab")}``.
      rngs: needed when the head creates a parameter.
      ignore_index, softcap, reduction, shift, label_smoothing, filter_eps, accum_e_fp32, accum_c_fp32,
        filter_e_grad, filter_c_grad, impl, vocab_parallel, interpret, check_targets, z_loss, grad_path,
        max_temp_bytes: defaults for the loss options of :func:`cce_jax.linear_cross_entropy`, each overridable
        per call. ``softcap`` also caps the
        logits returned for inference.
    """

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        *,
        tied: bool = False,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        rngs: nnx.Rngs | None = None,
        ignore_index: int = -100,
        softcap: float | None = None,
        reduction: api.Reduction = "mean",
        shift: int | bool = 0,
        label_smoothing: float = 0.0,
        filter_eps: float | str | None = "auto",
        accum_e_fp32: bool = False,
        accum_c_fp32: bool = False,
        filter_e_grad: bool = True,
        filter_c_grad: bool = True,
        impl: Any = "auto",
        vocab_parallel: Any = None,
        interpret: bool | None = None,
        check_targets: bool = False,
        z_loss: float = 0.0,
        grad_path: str = "auto",
        max_temp_bytes: int | None = None,
    ):
        for name, value in (("in_features", in_features), ("vocab_size", vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (not tied or use_bias) and rngs is None:
            raise ValueError("rngs is required when the head creates parameters (untied, or use_bias=True)")
        self.in_features = in_features
        self.vocab_size = vocab_size
        self.tied = bool(tied)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        # A tuple of pairs, not a dict: NNX keeps plain attributes in the (hashable) graph definition.
        self._loss_defaults = (
            ("ignore_index", ignore_index), ("softcap", softcap), ("reduction", reduction), ("shift", shift),
            ("label_smoothing", label_smoothing), ("filter_eps", filter_eps), ("accum_e_fp32", accum_e_fp32),
            ("accum_c_fp32", accum_c_fp32), ("filter_e_grad", filter_e_grad), ("filter_c_grad", filter_c_grad),
            ("impl", impl), ("vocab_parallel", vocab_parallel), ("interpret", interpret),
            ("check_targets", check_targets), ("z_loss", z_loss), ("grad_path", grad_path),
            ("max_temp_bytes", max_temp_bytes),
        )
        self.kernel: nnx.Param | None
        if tied:
            self.kernel = nnx.data(None)
        else:
            self.kernel = nnx.Param(
                kernel_init(rngs.params(), (in_features, vocab_size), param_dtype), **kernel_metadata
            )
        self.bias: nnx.Param | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (vocab_size,), param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)

    @property
    def loss_options(self) -> dict[str, Any]:
        """The loss options stored at construction (each call may override them)."""
        return dict(self._loss_defaults)

    def classifier(self, embed: Any = None) -> tuple[jax.Array, str]:
        """``(c, classifier_layout)``: the owned (D, V) kernel, or the (V, D) table of the tied ``embed``."""
        if self.tied:
            if embed is None:
                raise ValueError("this head is tied: pass embed= the model's nnx.Embed (or its (V, D) table)")
            return tied_table(embed, self.vocab_size, self.in_features), "vd"
        if embed is not None:
            raise ValueError("embed= is only for tied heads (tied=True); this head owns its kernel")
        return self.kernel[...], "dv"

    def __call__(
        self,
        e: jax.Array,
        targets: jax.Array | None = None,
        *,
        embed: Any = None,
        weights: jax.Array | None = None,
        return_lse: bool = False,
        last_only: bool = False,
        **loss_options: Any,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Loss of hidden states ``e`` (..., D) against ``targets`` (...), or logits when ``targets`` is None.

        Args:
          e: hidden states (..., D), e.g. (B, T, D) after the final norm.
          targets: integer ids shaped ``e.shape[:-1]`` (with ``shift=1`` pass the input tokens themselves).
          embed: the tied ``nnx.Embed`` (or its (V, D) table) when the head was built with ``tied=True``.
          weights, return_lse: as in :func:`cce_jax.linear_cross_entropy`.
          last_only: without targets, return logits for the last position only: (..., T, D) -> (..., V).
          **loss_options: per-call overrides of the options stored at construction (``reduction="none"``
            for per-token losses, ``shift``, ``ignore_index``, ``softcap``, ``impl``, ...).

        Returns:
          With targets: the loss (float32; per-token for ``reduction="none"``), and the lse when
          ``return_lse``. Without: float32 logits (..., V).
        """
        options = merge_loss_options(self.loss_options, loss_options)
        c, layout = self.classifier(embed)
        bias = None if self.bias is None else self.bias[...]
        return apply_head(
            e, c, bias, targets, classifier_layout=layout, dtype=self.dtype, options=options, weights=weights,
            return_lse=return_lse, last_only=last_only,
        )
