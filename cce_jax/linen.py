"""Flax Linen head: the classifier of a language model whose loss never materialises the logits.

:class:`LinearCrossEntropyHead` replaces the ``nn.Dense(vocab, use_bias=False)`` at the top of a decoder (same
``kernel`` (D, V) and ``bias`` (V,) parameters under the module's name, so the parameter tree and checkpoints
do not change) or borrows the table of a tied ``nn.Embed`` at call time. Called with targets it returns
:func:`cce_jax.linear_cross_entropy`; called without, the logits for inference. The computation is shared
with the NNX head (:mod:`cce_jax.nnx`).

This module imports flax; ``import cce_jax`` alone does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cce_jax.optional import require_flax

require_flax("cce_jax.linen")
from flax import linen as nn  # noqa: E402

from cce_jax import api
from cce_jax.nnx import LOSS_OPTIONS, apply_head, merge_loss_options, tied_table

Initializer = Callable[..., jax.Array]


class LinearCrossEntropyHead(nn.Module):
    """Classifier + cross-entropy head for Flax Linen models, computed by :func:`cce_jax.linear_cross_entropy`.

    Untied (default), the head owns ``kernel`` (D, vocab_size), D taken from the hidden states as ``nn.Dense``
    does, and with ``use_bias`` a ``bias`` (vocab_size,). Tied (``tied=True``), it owns no classifier and each
    call passes ``embed=`` the model's ``nn.Embed`` (or its table); the (V, D) table is read in place
    (``classifier_layout="vd"``), never copied or transposed.

    Checkpoints: Linen names a module defined inline in an ``@nn.compact`` method after its class, so the
    ``nn.Dense`` it replaces was ``Dense_0`` (``Dense_1``, ...) and this head would be
    ``LinearCrossEntropyHead_0``. Pass ``name=`` the old layer's name (``name="Dense_0"``, or whatever name it
    was given) to keep the parameter tree, and checkpoints, unchanged. Assigned in ``setup()`` (``self.lm_head =
    ...``) it takes the attribute's name, as the Dense did.

    Example::

      class LM(nn.Module):
          @nn.compact
          def __call__(self, tokens, targets=None):
              embed = nn.Embed(32_003, 512)
              h = Body()(embed(tokens))
              return LinearCrossEntropyHead(32_003, tied=True, shift=1)(h, targets, embed=embed)

    Attributes:
      vocab_size: V.
      tied: borrow the classifier from an ``Embed`` passed at each call instead of owning one.
      use_bias: own a (V,) bias (also allowed when tied).
      dtype: compute dtype of hidden states and classifier (``None``: promote the two, as Flax layers do).
        Loss math is float32 whatever it is.
      param_dtype: dtype of the parameters this head creates.
      kernel_init, bias_init: initializers (``nn.with_logical_partitioning`` wrappers work).
      kernel_axes, bias_axes: logical axis names for partitioning, e.g. ``("embed", "vocab")`` and
        ``("vocab",)``; they wrap the initializers with ``nn.with_logical_partitioning``.
      ignore_index, softcap, reduction, shift, label_smoothing, filter_eps, accum_e_fp32, accum_c_fp32,
        filter_e_grad, filter_c_grad, impl, vocab_parallel, interpret, check_targets, z_loss, grad_path,
        max_temp_bytes: defaults for the loss options of :func:`cce_jax.linear_cross_entropy`, each overridable
        per call. ``softcap`` also caps the
        logits returned for inference.
    """

    vocab_size: int
    tied: bool = False
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    kernel_axes: tuple[str | None, ...] | None = None
    bias_axes: tuple[str | None, ...] | None = None
    ignore_index: int = -100
    softcap: float | None = None
    reduction: api.Reduction = "mean"
    shift: int | bool = 0
    label_smoothing: float = 0.0
    filter_eps: float | str | None = "auto"
    accum_e_fp32: bool = False
    accum_c_fp32: bool = False
    filter_e_grad: bool = True
    filter_c_grad: bool = True
    impl: Any = "auto"
    vocab_parallel: Any = None
    interpret: bool | None = None
    check_targets: bool = False
    z_loss: float = 0.0
    grad_path: str = "auto"
    max_temp_bytes: int | None = None

    @property
    def loss_options(self) -> dict[str, Any]:
        """The loss options stored in the module's attributes (each call may override them)."""
        return {name: getattr(self, name) for name in LOSS_OPTIONS}

    @nn.compact
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
          embed: the tied ``nn.Embed`` (or its (V, D) table) when the head was built with ``tied=True``.
          weights, return_lse: as in :func:`cce_jax.linear_cross_entropy`.
          last_only: without targets, return logits for the last position only: (..., T, D) -> (..., V).
          **loss_options: per-call overrides of the options stored in the attributes.

        Returns:
          With targets: the loss (float32; per-token for ``reduction="none"``), and the lse when
          ``return_lse``. Without: float32 logits (..., V).
        """
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
        options = merge_loss_options(self.loss_options, loss_options)
        d = e.shape[-1]
        if self.tied:
            if embed is None:
                raise ValueError("this head is tied: pass embed= the model's nn.Embed (or its (V, D) table)")
            c, layout = tied_table(embed, self.vocab_size, d), "vd"
        else:
            if embed is not None:
                raise ValueError("embed= is only for tied heads (tied=True); this head owns its kernel")
            c = self.param("kernel", self._init(self.kernel_init, self.kernel_axes), (d, self.vocab_size),
                           self.param_dtype)
            layout = "dv"
        bias = None
        if self.use_bias:
            bias = self.param("bias", self._init(self.bias_init, self.bias_axes), (self.vocab_size,),
                              self.param_dtype)
        return apply_head(
            e, c, bias, targets, classifier_layout=layout, dtype=self.dtype, options=options, weights=weights,
            return_lse=return_lse, last_only=last_only,
        )

    @staticmethod
    def _init(init: Initializer, axes: tuple[str | None, ...] | None) -> Initializer:
        return init if axes is None else nn.with_logical_partitioning(init, axes)
