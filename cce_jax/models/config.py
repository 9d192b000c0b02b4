"""Per-family decoder configurations: what each model family does differently, above all at its head.

The reference project patches Hugging Face models family by family so that their loss goes through CCE; the
bug its users hit was a patch that dropped a head detail (Gemma 2's final softcap). Here the head details are
fields of :class:`DecoderConfig`, set once per family in :data:`FAMILIES`:

============  ===============  ===================  ==============================================
family        classifier       final logit softcap  other differences modelled
============  ===============  ===================  ==============================================
llama3        own (untied)     none                 GQA 4:1, RoPE theta 5e5
llama3.2      tied to embed    none                 GQA 4:1, RoPE theta 5e5 (the 1B/3B models)
mistral       own (untied)     none                 GQA 4:1, sliding-window attention (4096)
gemma2        tied to embed    30.0                 inputs scaled by sqrt(d_model), (1 + w) RMSNorm,
                                                    norms after attention and MLP too, GeGLU,
                                                    attention softcap 50, local/global layers
phi3          own (untied)     none                 full multi-head attention, sliding window 2047
qwen2         tied to embed    none                 q/k/v biases, GQA 7:1, RoPE theta 1e6 (0.5B/1.5B)
============  ===============  ===================  ==============================================

All are pre-norm decoders with rotary position embeddings and gated MLPs; sizes are free (``d_model``,
``n_layers``, ``n_heads``) so tests and examples can build tiny random-initialised models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything :class:`cce_jax.models.Decoder` needs; build one with :func:`family_config`.

    Attributes:
      family: the family name, for display.
      vocab_size, d_model, n_layers, n_heads: model size.
      n_kv_heads: key/value heads (grouped-query attention when fewer than ``n_heads``).
      head_dim: width of each attention head (even, for rotary embeddings).
      d_ff: hidden width of the gated MLP.
      tie_embeddings: the classifier is the input embedding table (the head borrows it).
      final_logit_softcap: softcap of the output logits (Gemma 2: 30.0), applied inside the loss.
      embed_scale: multiply input embeddings by sqrt(d_model) (Gemma).
      attn_logit_softcap: softcap of attention scores (Gemma 2: 50.0).
      query_scale: attention score scale; None means ``head_dim ** -0.5``.
      activation: gate activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU).
      norm_zero_centered: RMSNorm multiplies by ``1 + w`` with ``w`` initialised to 0 (Gemma).
      sandwich_norms: also normalise the attention and MLP outputs before the residual add (Gemma 2).
      qkv_bias: biases on the query/key/value projections (Qwen2).
      sliding_window: attend to at most this many latest positions (itself included); None for full.
      sliding_window_every: layer ``i`` uses the window when ``i % sliding_window_every == 0`` (Gemma 2
        alternates local and global layers: 2).
      rope_theta: rotary embedding base.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype of activations (None: float32).
      param_dtype: dtype of parameters.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    tie_embeddings: bool
    final_logit_softcap: float | None = None
    embed_scale: bool = False
    attn_logit_softcap: float | None = None
    query_scale: float | None = None
    activation: str = "silu"
    norm_zero_centered: bool = False
    sandwich_norms: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    sliding_window_every: int = 1
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "sliding_window_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f'activation must be "silu" or "gelu_tanh", got {self.activation!r}')
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}")

    def uses_window(self, layer: int) -> bool:
        return self.sliding_window is not None and layer % self.sliding_window_every == 0


# Per family: the head details and the architecture fields, plus the ratios that size n_kv_heads and d_ff
# from the free sizes (taken from the family's headline model).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": dict(
        tie_embeddings=False, rope_theta=500_000.0, norm_eps=1e-5, kv_ratio=4, ff_ratio=3.5,
    ),
    "llama3.2": dict(
        tie_embeddings=True, rope_theta=500_000.0, norm_eps=1e-5, kv_ratio=4, ff_ratio=4.0,
    ),
    "mistral": dict(
        tie_embeddings=False, rope_theta=10_000.0, norm_eps=1e-5, sliding_window=4096, kv_ratio=4,
        ff_ratio=3.5,
    ),
    "gemma2": dict(
        tie_embeddings=True, final_logit_softcap=30.0, embed_scale=True, attn_logit_softcap=50.0,
        activation="gelu_tanh", norm_zero_centered=True, sandwich_norms=True, sliding_window=4096,
        sliding_window_every=2, rope_theta=10_000.0, norm_eps=1e-6, kv_ratio=2, ff_ratio=4.0,
    ),
    "phi3": dict(
        tie_embeddings=False, rope_theta=10_000.0, norm_eps=1e-5, sliding_window=2047, kv_ratio=1,
        ff_ratio=8 / 3,
    ),
    "qwen2": dict(
        tie_embeddings=True, qkv_bias=True, rope_theta=1_000_000.0, norm_eps=1e-6, kv_ratio=7,
        ff_ratio=4864 / 896,
    ),
}


def family_config(
    family: str, *, vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides: Any
) -> DecoderConfig:
    """The configuration of a ``family`` model of the given size; ``overrides`` replace any field.

    ``n_kv_heads`` follows the family's grouping ratio (rounded to a divisor of ``n_heads``), ``head_dim`` is
    ``d_model // n_heads`` and ``d_ff`` the family's MLP ratio times ``d_model``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    preset = dict(FAMILIES[family])
    kv_ratio, ff_ratio = preset.pop("kv_ratio"), preset.pop("ff_ratio")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < n_heads:
        raise ValueError(f"d_model must be an int >= n_heads ({n_heads}), got {d_model!r}")
    n_kv = max(1, n_heads // kv_ratio)
    while n_heads % n_kv:
        n_kv -= 1
    head_dim = d_model // n_heads
    head_dim -= head_dim % 2
    fields = dict(
        family=family, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=max(head_dim, 2), d_ff=max(1, int(round(ff_ratio * d_model))), **preset,
    )
    fields.update(overrides)
    return DecoderConfig(**fields)
