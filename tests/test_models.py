"""Model-family adapters: each family's decoder trains through the CCE head exactly as with dense logits.

For every family a tiny random-initialised model computes its next-token loss and the gradients of all its
parameters twice: through its :class:`~cce_jax.nnx.LinearCrossEntropyHead` (blockwise "xla" with small ragged
blocks, what "auto" picks on CPU) and through an independent dense path written here (hidden states @
classifier, the family's softcap, ``optax.softmax_cross_entropy_with_integer_labels``). The head details
themselves (tying, softcap) are pinned against the families' published configurations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from cce_jax import XlaConfig  # noqa: E402
from cce_jax.models import FAMILIES, Decoder, DecoderConfig, family_config  # noqa: E402

VOCAB, D_MODEL, LAYERS, HEADS = 131, 52, 2, 4  # prime V; D not a multiple of any block
BATCH, SEQ = 2, 11
BLOCKS = XlaConfig(block_n=8, block_v=32)  # 22 tokens and 131 classes: several ragged blocks each way

# What each family's published configuration says about its head (the thing model patches get wrong).
EXPECTED_HEADS = {
    "llama3": dict(tie_embeddings=False, final_logit_softcap=None, embed_scale=False),
    "llama3.2": dict(tie_embeddings=True, final_logit_softcap=None, embed_scale=False),
    "mistral": dict(tie_embeddings=False, final_logit_softcap=None, embed_scale=False),
    "gemma2": dict(tie_embeddings=True, final_logit_softcap=30.0, embed_scale=True),
    "phi3": dict(tie_embeddings=False, final_logit_softcap=None, embed_scale=False),
    "qwen2": dict(tie_embeddings=True, final_logit_softcap=None, embed_scale=False),
}


def test_family_head_details():
    assert set(FAMILIES) == set(EXPECTED_HEADS)
    for family, expected in EXPECTED_HEADS.items():
        cfg = family_config(family, vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, n_heads=HEADS)
        got = {name: getattr(cfg, name) for name in expected}
        assert got == expected, family
        model = nnx.eval_shape(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0)))  # structure only, no compute
        head = model.lm_head
        assert head.tied == cfg.tie_embeddings
        assert head.loss_options["softcap"] == cfg.final_logit_softcap
        assert head.loss_options["shift"] == 1
        # A tied head owns nothing: the table stays at embed/embedding only.
        assert (head.kernel is None) == cfg.tie_embeddings
        paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert ("lm_head/kernel" in paths) == (not cfg.tie_embeddings)
        assert "embed/embedding" in paths


def _random_params(cfg: DecoderConfig, seed: int):
    """(graphdef, params) of a random model, drawn with NumPy (compiling JAX's initialisers costs seconds).

    Every parameter is random, norm scales included (ones/zeros would hide gradient bugs). The final norm is
    scaled up so the logits are far from O(1) where a softcap is: a head that dropped Gemma 2's softcap 30
    would be off by a lot.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    boost = 12.0 if cfg.final_logit_softcap else 2.0

    def draw(path, x):
        name, noise = path[-1], rng.standard_normal(x.shape)
        if name == "weight":  # RMSNorm scale, stored as w in (1 + w) for zero-centred norms
            value = (0.0 if cfg.norm_zero_centered else 1.0) + 0.2 * noise
            if path[0] == "final_norm":
                value = value + boost - 1.0
        elif name == "embedding":
            value = noise / np.sqrt(x.shape[1])
        elif name == "kernel":
            value = noise / np.sqrt(x.shape[0])
        else:  # biases
            value = 0.1 * noise
        return jnp.asarray(value, x.dtype)

    params = nnx.from_flat_state([(p, v.replace(draw(p, v))) for p, v in nnx.to_flat_state(abstract)])
    return graphdef, params


def _dense_loss(model: Decoder, tokens: jax.Array) -> jax.Array:
    """The same model with materialised logits and optax's cross-entropy, written independently of the head."""
    cfg = model.config
    h = model.hidden_states(tokens)
    if cfg.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", h, model.embed.embedding[...], precision="highest")
    else:
        logits = jnp.einsum("btd,dv->btv", h, model.lm_head.kernel[...], precision="highest")
    if cfg.final_logit_softcap is not None:
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean(), logits


@pytest.mark.parametrize("family", sorted(EXPECTED_HEADS))
def test_family_loss_and_grads_match_dense(family):
    # A window shorter than the sequence makes the sliding-window families differ from full attention.
    cfg = family_config(family, vocab_size=VOCAB, d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS,
                        **({"sliding_window": 4} if FAMILIES[family].get("sliding_window") else {}))
    tokens = jax.random.randint(jax.random.key(3), (BATCH, SEQ), 0, VOCAB)

    graphdef, params = _random_params(cfg, seed=2)

    @jax.jit  # one compilation for both losses, both gradients and the logits
    def run(params, tokens):
        cce = jax.value_and_grad(lambda p: nnx.merge(graphdef, p)(tokens, tokens, impl=BLOCKS))(params)
        (dense, logits), dense_grads = jax.value_and_grad(
            lambda p: _dense_loss(nnx.merge(graphdef, p), tokens), has_aux=True)(params)
        model = nnx.merge(graphdef, params)
        return cce, (dense, dense_grads), logits, model(tokens), model(tokens, last_only=True)

    (loss, grads), (ref_loss, ref_grads), ref_logits, logits, last = run(params, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    if cfg.final_logit_softcap is not None:
        assert float(jnp.abs(ref_logits).max()) > 15.0  # the softcap is doing real work in this test
    flat, ref_flat = nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat]
    for (path, g), (_, r) in zip(flat, ref_flat):
        g, r = np.asarray(g[...]), np.asarray(r[...])
        assert np.abs(r).max() > 0, path
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=2e-5 * np.abs(r).max(), err_msg=str(path))
    # Inference logits come from the same head and match the dense ones.
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, ref_logits[:, -1], rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="family"):
        family_config("gpt2", vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, n_heads=HEADS)
    with pytest.raises(ValueError, match="n_kv_heads"):
        family_config("llama3", vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, n_heads=HEADS, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        family_config("llama3", vocab_size=VOCAB, d_model=D_MODEL, n_layers=1, n_heads=HEADS, head_dim=7)
    with pytest.raises(ValueError, match="vocab_size"):
        DecoderConfig("x", 0, 8, 1, 2, 1, 4, 8, False)
