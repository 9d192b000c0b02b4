"""cce_jax.adapters.tunix against the Tunix models' own logits: for each decoder family a tiny randomly
initialised model, whose loss and every parameter gradient must equal those of its normal ``__call__`` (dense
logits) followed by optax's cross-entropy, in float32. Skipped when tunix is not importable."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

with warnings.catch_warnings():  # Tunix 0.1.7's imports of APIs that jax 0.11 deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("tunix.models.gemma.model", exc_type=ImportError)
    from tunix.models.gemma import model as gemma  # noqa: E402
    from tunix.models.gemma3 import model as gemma3  # noqa: E402
    from tunix.models.gemma3 import vision as gemma3_vision  # noqa: E402
    from tunix.models.gemma4 import model as gemma4  # noqa: E402
    from tunix.models.llama3 import model as llama3  # noqa: E402
    from tunix.models.qwen2 import model as qwen2  # noqa: E402
    from tunix.models.qwen3 import model as qwen3  # noqa: E402
    from tunix.sft import peft_trainer  # noqa: E402
    from tunix.sft import utils as sft_utils  # noqa: E402
from flax import nnx  # noqa: E402

import cce_jax  # noqa: E402
from cce_jax.adapters import tunix as cce_tunix  # noqa: E402

# Tunix 0.1.7 uses APIs that flax 0.12 and jax 0.11 deprecate (Variable.value on every parameter read,
# pxla.thread_resources, jax.experimental.shard_map): hundreds of warnings that are not about this adapter.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

V, D, H, B, T = 509, 32, 64, 2, 8  # a prime vocabulary: no block size divides it
IMPLS = ("xla", "dense")
# Several vocabulary blocks at V = 509 (recompute path) and 8-token chunks (three-pass path), so neither holds
# the (B, T, V) logits at once.
SMALL_BLOCKS = cce_jax.XlaConfig(block_n=8, block_v=128, chunk_tokens=8)

_common = dict(embed_dim=D, hidden_dim=H, num_heads=2, head_dim=16, num_kv_heads=1)
_A3, _A4 = gemma.AttentionType, gemma4.AttentionType


def _build(name: str):
    """A toy model of each family and variant (head layout, softcap, extra structure)."""
    rngs = nnx.Rngs(0)
    if name == "gemma1":
        return gemma.Gemma(gemma.ModelConfig(
            num_layers=1, num_embed=V, final_logit_softcap=None, use_post_attn_norm=False,
            use_post_ffw_norm=False, attention_types=(_A3.GLOBAL,), **_common), rngs=rngs)
    if name == "gemma2":  # final logit softcap, attention softcap, sliding window, post norms
        return gemma.Gemma(gemma.ModelConfig(
            num_layers=2, num_embed=V, final_logit_softcap=3.0, use_post_attn_norm=True, use_post_ffw_norm=True,
            attention_types=(_A3.LOCAL_SLIDING, _A3.GLOBAL), attn_logits_soft_cap=50.0, sliding_window_size=4,
            **_common), rngs=rngs)
    if name == "gemma3":
        return gemma3.Gemma3(gemma3.ModelConfig(
            num_layers=2, num_embed=V, sliding_window_size=4, param_dtype=jnp.float32, **_common), rngs=rngs)
    if name == "gemma4":  # softcap, per-layer inputs, and layer 2 sharing layer 1's keys and values
        return gemma4.Gemma4(gemma4.ModelConfig(
            num_layers=3, num_embed=V, final_logit_softcap=3.0, sliding_window_size=4, global_key_size=16,
            per_layer_input_dim=8, frac_shared_layers=1 / 3,
            attention_pattern=(_A4.LOCAL_SLIDING, _A4.GLOBAL, _A4.GLOBAL), **_common), rngs=rngs)
    if name in ("llama3", "llama3_tied"):
        return llama3.Llama3(llama3.ModelConfig(
            num_layers=2, vocab_size=V, rope_theta=10_000, norm_eps=1e-5, weight_tying=name.endswith("tied"),
            **_common), rngs=rngs)
    if name in ("qwen2", "qwen2_tied"):
        return qwen2.Qwen2(qwen2.ModelConfig(
            num_layers=2, vocab_size=V, rope_theta=10_000, norm_eps=1e-6,
            use_tied_embedding=name.endswith("tied"), **_common), rngs=rngs)
    if name in ("qwen3", "qwen3_tied", "qwen3_moe"):
        moe = dict(num_experts=4, num_experts_per_tok=2) if name.endswith("moe") else {}
        return qwen3.Qwen3(qwen3.ModelConfig(
            num_layers=2, vocab_size=V, rope_theta=10_000, norm_eps=1e-6,
            use_tied_embedding=name.endswith("tied"), **moe, **_common), rngs=rngs)
    raise KeyError(name)


MODELS = ("gemma1", "gemma2", "gemma3", "gemma4", "llama3", "llama3_tied", "qwen2", "qwen2_tied", "qwen3",
          "qwen3_tied", "qwen3_moe")
FAMILY = {"gemma1": "gemma", "gemma2": "gemma", "llama3_tied": "llama3", "qwen2_tied": "qwen2",
          "qwen3_tied": "qwen3", "qwen3_moe": "qwen3"}


@functools.cache
def _model(name: str):
    return _build(name)


def _inputs(seed: int = 0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, V)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    attention_mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    return tokens, positions, attention_mask


def _ignore(tokens):
    """Next-token targets with a few positions ignored (-100), the first of each row included."""
    drop = jnp.zeros(tokens.shape, bool).at[:, 1].set(True).at[0, 5].set(True).at[1, -1].set(True)
    return jnp.where(drop, -100, tokens)


def _dense_loss(model, tokens, targets, positions, attention_mask):
    """The model's own logits (its __call__) and optax, next-token, mean over non-ignored targets."""
    logits, _ = model(tokens, positions, None, attention_mask)
    logits, labels = logits[:, :-1].astype(jnp.float32), targets[:, 1:]
    valid = labels != -100
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


def _params(grads):
    return jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))


def _assert_grads_close(got, want):
    got, want = _params(got), _params(want)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert len(got) > 5
    # Absolute slack relative to the leaf's and to the largest gradient: a leaf whose true gradient is 0
    # (Gemma 4's last skip_scale, which the scale-invariant final norm cancels) holds rounding noise only.
    scale = max(float(np.abs(np.asarray(w)).max()) for _, w in want)
    for (path, g), (_, w) in zip(got, want):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()) + 1e-7 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def _check_no_copies(name, tokens, positions, attention_mask):
    """The adapter's traced loss has no (B, T-1, V) logits and no transposed copy of the classifier."""
    model = _model(name)
    head = cce_tunix.classifier(model)
    graphdef, state = nnx.split(model)

    def loss(state):
        return cce_tunix.linear_cross_entropy(nnx.merge(graphdef, state), tokens, tokens, positions,
                                              attention_mask, shift=1, impl=SMALL_BLOCKS)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(state)
    shapes, transposed = set(), []

    def walk(value):
        if hasattr(value, "eqns"):  # a Jaxpr
            for eqn in value.eqns:
                shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
                if eqn.primitive.name == "transpose" and eqn.invars[0].aval.shape == head.weight.shape:
                    transposed.append(eqn)
                for param in eqn.params.values():
                    walk(param)
        elif hasattr(value, "jaxpr"):  # a ClosedJaxpr (scan, cond, custom_vjp, pjit bodies)
            walk(value.jaxpr)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(jaxpr.jaxpr)
    shapes.discard(tuple(head.weight.shape))  # the classifier and its gradient
    flat_logits = [s for s in shapes if len(s) >= 2 and s[-1] == V and int(np.prod(s[:-1])) >= B * (T - 1)]
    assert not flat_logits, f"{name}: logits-sized arrays in the loss: {flat_logits}"
    assert not transposed, f"{name}: the classifier is transposed: {transposed}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_loss_and_grads_match_model_logits(name, impl):
    model = _model(name)
    assert cce_tunix.family(model) == FAMILY.get(name, name)
    tokens, positions, attention_mask = _inputs()
    targets = _ignore(tokens)

    def ours(m):
        return cce_tunix.linear_cross_entropy(m, tokens, targets, positions, attention_mask, shift=1, impl=impl)

    def theirs(m):
        return _dense_loss(m, tokens, targets, positions, attention_mask)

    loss, grads = nnx.value_and_grad(ours)(model)
    ref, ref_grads = nnx.value_and_grad(theirs)(model)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    _assert_grads_close(grads, ref_grads)
    if impl == "xla":
        _check_no_copies(name, tokens, positions, attention_mask)


def test_gemma3_with_images():
    """A Gemma 3 with a (toy) SigLIP encoder: image soft tokens merged by the model's own input step, and the
    loss and every gradient (vision encoder included) equal to those of model(..., images=...)."""
    placeholder, n_img = 7, 4
    vision_config = gemma3_vision.SigLIPConfig(
        num_mm_tokens_per_image_prepool=n_img, num_mm_tokens_per_image=n_img, image_height=28, image_width=28,
        width=16, depth=1, mlp_dim=32, num_heads=2, soft_token_placeholder=placeholder)
    model = gemma3.Gemma3(gemma3.ModelConfig(num_layers=1, num_embed=V, sliding_window_size=4,
                                             param_dtype=jnp.float32, vision_config=vision_config, **_common),
                          rngs=nnx.Rngs(0))
    tokens, positions, attention_mask = _inputs()
    tokens = jnp.where(tokens == placeholder, placeholder + 1, tokens).at[:, 2:2 + n_img].set(placeholder)
    images = jax.random.uniform(jax.random.key(1), (B, 28, 28, 3))
    targets = jnp.where(tokens == placeholder, -100, _ignore(tokens))

    def ours(m):
        return cce_tunix.linear_cross_entropy(m, tokens, targets, positions, attention_mask, images=images,
                                              shift=1, impl="xla")

    def theirs(m):
        logits, _ = m(tokens, positions, None, attention_mask, images=images)
        labels = targets[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.maximum(labels, 0))
        return jnp.sum(jnp.where(labels != -100, nll, 0.0)) / jnp.sum(labels != -100)

    loss, grads = nnx.value_and_grad(ours)(model)
    ref, ref_grads = nnx.value_and_grad(theirs)(model)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    _assert_grads_close(grads, ref_grads)
    assert any("vision_encoder" in jax.tree_util.keystr(p) for p, _ in _params(grads))


@pytest.mark.parametrize("name", ["gemma2", "qwen2"])
def test_classifier_is_the_stored_array(name):
    model = _model(name)
    head = cce_tunix.classifier(model)
    if name == "gemma2":
        assert head.layout == "vd" and head.softcap == 3.0
        assert head.weight is model.embedder.input_embedding.get_value()
    else:
        assert head.layout == "dv" and head.softcap is None
        assert head.weight is model.lm_head.w.get_value() and head.weight.shape == (D, V)


@pytest.mark.parametrize("name", ["gemma2", "gemma4", "qwen3"])
def test_options_pass_through(name):
    """reduction="none", return_lse, label_smoothing and weights reach linear_cross_entropy unchanged."""
    model = _model(name)
    tokens, positions, attention_mask = _inputs(1)
    targets = _ignore(tokens)
    logits = model(tokens, positions, None, attention_mask)[0][:, :-1].astype(jnp.float32)
    labels = targets[:, 1:]
    valid = labels != -100
    safe = jnp.where(valid, labels, 0)

    per_token, lse = cce_tunix.linear_cross_entropy(model, tokens, targets, positions, attention_mask, shift=1,
                                                    reduction="none", return_lse=True, impl="xla")
    assert per_token.shape == lse.shape == (B, T - 1)
    want = jnp.where(valid, optax.softmax_cross_entropy_with_integer_labels(logits, safe), 0.0)
    np.testing.assert_allclose(per_token, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, jnp.where(valid, jax.nn.logsumexp(logits, axis=-1), 0.0), rtol=1e-5)

    alpha = 0.1
    smoothed = optax.smooth_labels(jax.nn.one_hot(safe, V), alpha)
    want = jnp.sum(jnp.where(valid, optax.softmax_cross_entropy(logits, smoothed), 0.0)) / jnp.sum(valid)
    got = cce_tunix.linear_cross_entropy(model, tokens, targets, positions, attention_mask, shift=1,
                                         label_smoothing=alpha, impl="xla")
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)

    weights = jnp.linspace(0.5, 2.0, B * T).reshape(B, T)
    got = cce_tunix.linear_cross_entropy(model, tokens, targets, positions, attention_mask, shift=1,
                                         weights=weights, reduction="sum", impl="dense")
    want = jnp.sum(jnp.where(valid, weights[:, 1:] * optax.softmax_cross_entropy_with_integer_labels(logits, safe),
                             0.0))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def _sft_inputs(seed: int = 2):
    """A padded batch as the trainer's gen_model_input_fn builds it (tunix/cli/peft_main.py)."""
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 1, V)
    pad = jnp.arange(T)[None, :] >= jnp.array([[T], [T - 3]])
    tokens = jnp.where(pad, 0, tokens)
    input_mask = (tokens != 0) & (jnp.arange(T)[None, :] >= 2)  # a 2-token prompt that is not trained on
    return {"input_tokens": tokens, "input_mask": input_mask,
            "positions": sft_utils.build_positions_from_mask(tokens != 0),
            "attention_mask": sft_utils.make_causal_attn_mask(tokens != 0)}


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "llama3", "qwen2_tied"])
def test_sft_loss_fn_matches_trainer_default_loss(name):
    """Value and gradients of sft_loss_fn equal those of PeftTrainer's own default loss."""
    model = _model(name)
    inputs = _sft_inputs()
    loss, grads = nnx.value_and_grad(cce_tunix.sft_loss_fn)(model, **inputs)
    ref, ref_grads = nnx.value_and_grad(peft_trainer._default_loss_fn)(model, **inputs)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
    _assert_grads_close(grads, ref_grads)

    summed = cce_tunix.make_sft_loss_fn(reduction="sum", impl="dense")(model, **inputs)
    np.testing.assert_allclose(float(summed), float(loss) * int(jnp.sum(inputs["input_mask"][:, 1:])), rtol=1e-5)


def test_sft_trainer_trains_with_cce_loss(tmp_path):
    """Two PeftTrainer steps with with_loss_fn(sft_loss_fn) leave the same parameters as with its default loss."""
    batches = [peft_trainer.TrainingInput(input_tokens=np.asarray(x["input_tokens"]),
                                          input_mask=np.asarray(x["input_mask"])) for x in (_sft_inputs(3),
                                                                                            _sft_inputs(4))]

    def gen_model_input_fn(x):
        pad_mask = x.input_tokens != 0
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(pad_mask),
                "attention_mask": sft_utils.make_causal_attn_mask(pad_mask)}

    def train(loss_fn):
        model = _build("qwen3")
        config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=2, pbar_description=None)
        trainer = peft_trainer.PeftTrainer(model, optax.sgd(0.5), config).with_gen_model_input_fn(gen_model_input_fn)
        if loss_fn is not None:
            trainer = trainer.with_loss_fn(loss_fn)
        trainer.train(batches)
        trainer.close()
        return nnx.state(model, nnx.Param)

    trained, ref = train(cce_tunix.sft_loss_fn), train(None)
    initial = nnx.state(_build("qwen3"), nnx.Param)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), trained, initial)
    assert max(jax.tree.leaves(moved)) > 1e-3
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_errors_name_the_argument():
    model = _model("llama3")
    tokens, positions, attention_mask = _inputs()
    with pytest.raises(TypeError, match="softcap: set by the model"):
        cce_tunix.linear_cross_entropy(model, tokens, tokens, positions, attention_mask, softcap=30.0)
    with pytest.raises(TypeError, match="classifier_layout: set by the model"):
        cce_tunix.linear_cross_entropy(model, tokens, tokens, positions, attention_mask, classifier_layout="vd")
    with pytest.raises(TypeError, match="unexpected keyword argument.*smoothing"):
        cce_tunix.linear_cross_entropy(model, tokens, tokens, positions, attention_mask, smoothing=0.1)
    with pytest.raises(ValueError, match="images: a Tunix Llama3 model takes text only"):
        cce_tunix.linear_cross_entropy(model, tokens, tokens, positions, attention_mask, images=jnp.zeros(3))
    with pytest.raises(ValueError, match="segment_ids: the Tunix Llama3"):
        cce_tunix.hidden_states(model, tokens, positions, attention_mask, segment_ids=jnp.ones_like(tokens))
    with pytest.raises(ValueError, match="input_tokens must be a \\(batch, length\\)"):
        cce_tunix.hidden_states(model, tokens[0], positions, attention_mask)
    with pytest.raises(TypeError, match="model must be a Tunix decoder.*GemmaWithScoreHead"):
        cce_tunix.family(gemma.GemmaWithScoreHead(_model("gemma1"), rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="shift: fixed for the SFT loss"):
        cce_tunix.make_sft_loss_fn(shift=1)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        cce_tunix.make_sft_loss_fn(reduction="none")
    with pytest.raises(ValueError, match="input_mask must have the shape of input_tokens"):
        cce_tunix.sft_loss_fn(model, tokens, tokens[:, :-1] > 0, positions, attention_mask)


def test_lora_on_the_classifier_is_refused():
    model = _build("llama3")
    model.lm_head.w_lora = nnx.LoRAParam(jnp.zeros((D, 2)))
    with pytest.raises(ValueError, match="model.lm_head \\(the classifier\\) has LoRA parameters"):
        cce_tunix.classifier(model)


@pytest.mark.parametrize("name", ["gemma3_bf16", "qwen2_bf16_compute"])
def test_low_precision_models(name):
    """Gemma 3's default bfloat16 parameters, and Qwen2 computing in bfloat16 over float32 parameters (the
    adapter then casts the hidden states, never the weights): the float32 loss is close to the model's own
    bfloat16 logits with optax."""
    rngs = nnx.Rngs(0)
    if name == "gemma3_bf16":
        model = gemma3.Gemma3(gemma3.ModelConfig(num_layers=2, num_embed=V, sliding_window_size=4, **_common),
                              rngs=rngs)
    else:
        model = qwen2.Qwen2(qwen2.ModelConfig(num_layers=2, vocab_size=V, rope_theta=10_000, norm_eps=1e-6,
                                              dtype=jnp.bfloat16, **_common), rngs=rngs)
    head = cce_tunix.classifier(model)
    assert head.weight.dtype == (jnp.bfloat16 if name == "gemma3_bf16" else jnp.float32)
    tokens, positions, attention_mask = _inputs()
    targets = _ignore(tokens)
    loss = cce_tunix.linear_cross_entropy(model, tokens, targets, positions, attention_mask, shift=1, impl="xla")
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(_dense_loss(model, tokens, targets, positions, attention_mask)),
                               rtol=2e-2)
