"""A compact Flax NNX decoder-only language model whose loss goes through the CCE head.

One readable implementation covers the families of :mod:`cce_jax.models.config`: pre-norm blocks of
rotary-embedded grouped-query attention and a gated MLP, RMSNorm, and a :class:`cce_jax.nnx.
LinearCrossEntropyHead` on top that either owns the classifier or borrows the tied embedding table. Attention is
written out with einsums (small models, clarity over speed).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cce_jax.optional import require_flax

require_flax("cce_jax.models")
from flax import nnx  # noqa: E402

from cce_jax.models.config import DecoderConfig
from cce_jax.nnx import LinearCrossEntropyHead


def _linear(cfg: DecoderConfig, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` computed in float32; ``scale = 1 + w`` for zero-centred norms (Gemma)."""

    def __init__(self, dim: int, cfg: DecoderConfig):
        init = jnp.zeros if cfg.norm_zero_centered else jnp.ones
        self.weight = nnx.Param(init((dim,), cfg.param_dtype))
        self.eps = cfg.norm_eps
        self.zero_centered = cfg.norm_zero_centered

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (y * (1.0 + w if self.zero_centered else w)).astype(x.dtype)


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of ``x`` (B, T, H, hd), rotating the two halves of each head."""
    t, hd = x.shape[1], x.shape[-1]
    half = hd // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, rngs: nnx.Rngs):
        h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = _linear(cfg, cfg.d_model, h * hd, rngs, cfg.qkv_bias)
        self.k_proj = _linear(cfg, cfg.d_model, k * hd, rngs, cfg.qkv_bias)
        self.v_proj = _linear(cfg, cfg.d_model, k * hd, rngs, cfg.qkv_bias)
        self.o_proj = _linear(cfg, h * hd, cfg.d_model, rngs)
        self.cfg = cfg
        self.window = cfg.sliding_window if cfg.uses_window(layer) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = rotary(self.q_proj(x).reshape(b, t, h, hd), cfg.rope_theta)
        key = rotary(self.k_proj(x).reshape(b, t, k, hd), cfg.rope_theta)
        value = self.v_proj(x).reshape(b, t, k, hd)
        # Grouped-query attention: the h query heads form k groups that share one key/value head each.
        q = q.reshape(b, t, k, h // k, hd)
        scale = cfg.query_scale if cfg.query_scale is not None else hd**-0.5
        scores = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32) * scale
        if cfg.attn_logit_softcap is not None:
            scores = cfg.attn_logit_softcap * jnp.tanh(scores / cfg.attn_logit_softcap)
        pos = jnp.arange(t)
        mask = pos[None, :] <= pos[:, None]
        if self.window is not None:
            mask &= pos[:, None] - pos[None, :] < self.window
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, value).reshape(b, t, h * hd)
        return self.o_proj(out)


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.d_model, cfg.d_ff, rngs)
        self.up_proj = _linear(cfg, cfg.d_model, cfg.d_ff, rngs)
        self.down_proj = _linear(cfg, cfg.d_ff, cfg.d_model, rngs)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gate_proj(x)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down_proj(act * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg)
        self.attn = Attention(cfg, layer, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg)
        self.mlp = MLP(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg) if cfg.sandwich_norms else nnx.data(None)
        self.post_mlp_norm = RMSNorm(cfg.d_model, cfg) if cfg.sandwich_norms else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.attn(self.attn_norm(x))
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        m = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return x + m


class Decoder(nnx.Module):
    """Decoder-only language model; its loss never materialises the (B, T, V) logits.

    ``model(tokens, tokens)`` is the mean next-token loss (the head pairs position t with target t + 1);
    ``model(tokens)`` the float32 logits (B, T, V), ``model(tokens, last_only=True)`` those of the last
    position (B, V). Parameters: ``embed`` (an ``nnx.Embed``), ``layers``, ``final_norm`` and ``lm_head``,
    which has a ``kernel`` only when the family's embeddings are untied.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg)
        self.lm_head = LinearCrossEntropyHead(
            cfg.d_model, cfg.vocab_size, tied=cfg.tie_embeddings, softcap=cfg.final_logit_softcap, shift=1,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
        )

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """Final-normed hidden states (B, T, D) of integer ``tokens`` (B, T): the head's input."""
        x = self.embed(tokens)
        if self.config.embed_scale:
            # Gemma rounds the normaliser to the activation dtype before multiplying.
            x = x * jnp.asarray(self.config.d_model**0.5, x.dtype)
        for block in self.layers:
            x = block(x)
        return self.final_norm(x)

    def classifier(self) -> tuple[jax.Array, str]:
        """``(c, classifier_layout)`` the head uses: the tied (V, D) table or its own (D, V) kernel."""
        return self.lm_head.classifier(self.embed if self.config.tie_embeddings else None)

    def __call__(self, tokens: jax.Array, targets: jax.Array | None = None, **head_kwargs: Any):
        """Next-token loss of ``tokens`` against ``targets`` (usually the tokens themselves), or logits.

        ``head_kwargs`` go to :class:`~cce_jax.nnx.LinearCrossEntropyHead` (``reduction``, ``return_lse``,
        ``weights``, ``impl``, ``last_only``, ...).
        """
        embed = self.embed if self.config.tie_embeddings else None
        return self.lm_head(self.hidden_states(tokens), targets, embed=embed, **head_kwargs)
