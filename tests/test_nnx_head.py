"""cce_jax.nnx.LinearCrossEntropyHead against the float64 reference (tests/reference.py) and Flax conventions."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cce_jax  # noqa: E402
from cce_jax import XlaConfig  # noqa: E402
from cce_jax.nnx import LOSS_OPTIONS, LinearCrossEntropyHead  # noqa: E402
from reference import (  # noqa: E402
    assert_close,
    f64,
    make_inputs,
    reference_grads,
    reference_loss,
    tolerance,
)

B, T, D, V = 2, 7, 37, 101  # prime V, D not a multiple of any block
BLOCKS = XlaConfig(block_n=4, block_v=16)  # several ragged blocks in both directions


def _reference_logits(e, c, bias, softcap, layout):
    z = f64(e) @ (f64(c).T if layout == "vd" else f64(c))
    if bias is not None:
        z = z + f64(bias)
    return z if softcap is None else softcap * np.tanh(z / softcap)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_untied_head_matches_reference(rng, reduction):
    x = make_inputs(rng, (B, T), D, V, layout="dv", bias=True, weights=True)
    options = dict(softcap=2.0, shift=1, label_smoothing=0.1, ignore_index=x.ignore_index)
    head = LinearCrossEntropyHead(D, V, use_bias=True, rngs=nnx.Rngs(0), impl=BLOCKS, reduction=reduction,
                                  **options)
    head.kernel[...] = x.c
    head.bias[...] = x.bias
    graphdef, params = nnx.split(head)
    ref = reference_loss(x.e, x.c, x.targets, x.bias, weights=x.weights, reduction=reduction,
                         classifier_layout="dv", **options)
    g_loss = rng.standard_normal(ref.loss.shape)
    g_lse = rng.standard_normal(ref.lse.shape)

    @jax.jit
    def run(e, params):
        f = lambda e, p: nnx.merge(graphdef, p)(e, x.targets, weights=x.weights, return_lse=True)  # noqa: E731
        out, vjp = jax.vjp(f, e, params)
        return out, vjp((jnp.asarray(g_loss, jnp.float32), jnp.asarray(g_lse, jnp.float32)))

    (loss, lse), (de, dparams) = run(x.e, params)
    (ref_de, ref_dc, ref_db), (s_de, s_dc, s_db) = reference_grads(
        x.e, x.c, x.targets, x.bias, g_loss=g_loss, g_lse=g_lse, weights=x.weights, reduction=reduction,
        classifier_layout="dv", with_scales=True, **options)
    assert loss.shape == (() if reduction == "mean" else (B, T - 1)) and lse.shape == (B, T - 1)
    assert_close(loss, ref.loss, jnp.float32, "loss", "loss", scale=ref.loss_scale)
    assert_close(lse, ref.lse, jnp.float32, "loss", "lse", scale=ref.lse_scale)
    assert_close(de, ref_de, jnp.float32, "grad", "de", scale=s_de)
    assert_close(dparams["kernel"][...], ref_dc, jnp.float32, "grad", "dkernel", scale=s_dc)
    assert_close(dparams["bias"][...], ref_db, jnp.float32, "grad", "dbias", scale=s_db)


class _TiedLM(nnx.Module):
    """The smallest model with a tied head: embedding, one projection, the head."""

    def __init__(self, rngs: nnx.Rngs, **head_options):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)
        self.lm_head = LinearCrossEntropyHead(D, V, tied=True, **head_options)

    def __call__(self, tokens, targets=None, **kwargs):
        return self.lm_head(self.proj(self.embed(tokens)), targets, embed=self.embed, **kwargs)


def test_tied_head_borrows_embedding(rng):
    x = make_inputs(rng, (B, T), D, V, layout="vd")
    model = _TiedLM(nnx.Rngs(0), impl=BLOCKS, reduction="sum")
    model.embed.embedding[...] = x.c
    # The table stays where the model put it: the head adds no parameter and no second path to it.
    paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert paths == ["embed/embedding", "proj/bias", "proj/kernel"]

    @nnx.jit
    def run(model, e):
        head, table = model.lm_head, model.embed.embedding[...]
        value_and_grads = jax.value_and_grad(lambda e, c: head(e, x.targets, embed=c), argnums=(0, 1))(e, table)
        return value_and_grads, head(e, x.targets, embed=model.embed), head(e, x.targets, embed=model.embed.embedding)

    (value, (de, dtable)), as_module, as_variable = run(model, x.e)
    ref = reference_loss(x.e, x.c, x.targets, reduction="sum")
    ref_de, ref_dc, _ = reference_grads(x.e, x.c, x.targets, reduction="sum")
    assert_close(value, ref.loss, jnp.float32, "loss", "tied loss", scale=ref.loss_scale)
    assert_close(de, ref_de, jnp.float32, "grad", "tied de")
    assert_close(dtable, ref_dc, jnp.float32, "grad", "tied dtable")
    # The value under differentiation comes from the three-pass computation, the others from the one-pass
    # forward: equal up to float32 rounding.
    assert float(as_module) == float(as_variable)
    np.testing.assert_allclose(float(value), float(as_module), rtol=1e-6)


def test_tied_head_in_model_trains_embedding():
    """Through the whole model the embedding gets both gradients: the lookup's and the classifier's."""
    model = _TiedLM(nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    grads = nnx.grad(lambda m: m(tokens, tokens, shift=1))(model)
    ref = nnx.grad(lambda m: _dense_tied_loss(m, tokens))(model)
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref)):
        assert_close(g[...], f64(r[...]), jnp.float32, "grad", "/".join(map(str, path)))


def _dense_tied_loss(model, tokens):
    h = model.proj(model.embed(tokens))
    logits = jnp.einsum("btd,vd->btv", h, model.embed.embedding[...], precision="highest")
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def test_drop_in_for_linear():
    """Same parameter names, shapes and initial values as the nnx.Linear it replaces; same logits."""
    linear = nnx.Linear(D, V, use_bias=True, rngs=nnx.Rngs(3))
    head = LinearCrossEntropyHead(D, V, use_bias=True, rngs=nnx.Rngs(3))
    flat_l, flat_h = nnx.to_flat_state(nnx.state(linear)), nnx.to_flat_state(nnx.state(head))
    assert [p for p, _ in flat_l] == [p for p, _ in flat_h] == [("bias",), ("kernel",)]
    for (_, a), (_, b) in zip(flat_l, flat_h):
        np.testing.assert_array_equal(a[...], b[...])
    e = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, D)), jnp.float32)
    assert_close(head(e), f64(linear(e)), jnp.float32, "loss", "logits vs nnx.Linear")


def test_logits_for_inference(rng):
    x = make_inputs(rng, (B, T), D, V, layout="dv", bias=True)
    head = LinearCrossEntropyHead(D, V, use_bias=True, softcap=3.0, rngs=nnx.Rngs(0))
    head.kernel[...] = x.c
    head.bias[...] = x.bias
    logits, last = nnx.jit(lambda h, e: (h(e), h(e, last_only=True)))(head, x.e)
    ref = _reference_logits(x.e, x.c, x.bias, 3.0, "dv")
    assert logits.shape == (B, T, V) and last.shape == (B, V) and logits.dtype == jnp.float32
    assert_close(logits, ref, jnp.float32, "loss", "logits")
    assert_close(last, ref[:, -1], jnp.float32, "loss", "last-position logits")


def test_per_call_overrides(rng):
    x = make_inputs(rng, (B, T), D, V, layout="dv")
    head = LinearCrossEntropyHead(D, V, rngs=nnx.Rngs(0), reduction="none", shift=1, impl=BLOCKS)
    head.kernel[...] = x.c

    @nnx.jit
    def run(head, e):
        return (head(e, x.targets), head(e, x.targets, shift=0), head(e, x.targets, reduction="sum"),
                head(e, x.targets, reduction="sum", impl="dense"), head(e, x.targets, label_smoothing=0.2))

    none1, none0, total, total_dense, smoothed = run(head, x.e)
    assert none1.shape == (B, T - 1) and none0.shape == (B, T)
    for got, kwargs in ((none1, dict(shift=1, reduction="none")), (none0, dict(reduction="none")),
                        (total, dict(shift=1, reduction="sum")), (total_dense, dict(shift=1, reduction="sum")),
                        (smoothed, dict(shift=1, reduction="none", label_smoothing=0.2))):
        ref = reference_loss(x.e, x.c, x.targets, classifier_layout="dv", **kwargs)
        assert_close(got, ref.loss, jnp.float32, "loss", str(kwargs), scale=ref.loss_scale)
    assert head.loss_options["reduction"] == "none"  # overrides do not stick


def test_mixed_precision(rng):
    """float32 parameters, bfloat16 compute: the loss equals the reference on the rounded operands."""
    x = make_inputs(rng, (B, T), D, V, layout="dv", bias=True)
    head = LinearCrossEntropyHead(D, V, use_bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl=BLOCKS)
    head.kernel[...] = x.c
    head.bias[...] = x.bias
    graphdef, params = nnx.split(head)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, e: nnx.merge(graphdef, p)(e, x.targets)))(params, x.e)
    assert loss.dtype == jnp.float32 and grads["kernel"][...].dtype == jnp.float32
    e16, c16 = x.e.astype(jnp.bfloat16), x.c.astype(jnp.bfloat16)
    ref = reference_loss(e16, c16, x.targets, x.bias, classifier_layout="dv")
    _, ref_dc, _ = reference_grads(e16, c16, x.targets, x.bias, classifier_layout="dv")
    assert_close(loss, ref.loss, jnp.bfloat16, "loss", "bf16 loss", scale=ref.loss_scale)
    assert_close(grads["kernel"][...], ref_dc, jnp.bfloat16, "grad", "bf16 dkernel")
    # and the rounding is real: the float32 reference differs by more than the float32 tolerance allows
    ref32 = reference_loss(x.e, x.c, x.targets, x.bias, classifier_layout="dv")
    assert abs(float(loss) - float(ref32.loss)) > tolerance(jnp.float32).rtol * abs(float(ref32.loss))

    bf16_params = LinearCrossEntropyHead(D, V, use_bias=True, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert bf16_params.kernel[...].dtype == jnp.bfloat16 and bf16_params.bias[...].dtype == jnp.bfloat16


def test_sharding_metadata():
    # Flax creates annotated variables sharded, so they need a mesh; one device is enough to read the specs.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("embed", "vocab"))
    with jax.set_mesh(mesh):
        by_metadata = nnx.eval_shape(lambda: LinearCrossEntropyHead(
            D, V, use_bias=True, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": ("embed", "vocab")},
            bias_metadata={"out_sharding": ("vocab",)}))
        by_init = nnx.eval_shape(lambda: LinearCrossEntropyHead(
            D, V, rngs=nnx.Rngs(0),
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab"))))
    specs = nnx.get_partition_spec(nnx.state(by_metadata))
    assert specs["kernel"].get_value() == P("embed", "vocab") and specs["bias"].get_value() == P("vocab")
    assert nnx.get_partition_spec(nnx.state(by_init))["kernel"].get_value() == P("embed", "vocab")


def test_loss_options_cover_the_api():
    params = set(inspect.signature(cce_jax.linear_cross_entropy).parameters)
    per_call = {"e", "c", "targets", "bias", "weights", "return_lse", "classifier_layout"}
    assert set(LOSS_OPTIONS) == params - per_call
    head_params = set(inspect.signature(LinearCrossEntropyHead.__init__).parameters)
    assert set(LOSS_OPTIONS) <= head_params


def test_errors():
    e = jnp.zeros((B, T, D))
    t = jnp.zeros((B, T), jnp.int32)
    untied = LinearCrossEntropyHead(D, V, rngs=nnx.Rngs(0))
    tied = LinearCrossEntropyHead(D, V, tied=True)
    with pytest.raises(ValueError, match="rngs"):
        LinearCrossEntropyHead(D, V)
    with pytest.raises(ValueError, match="vocab_size"):
        LinearCrossEntropyHead(D, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tied"):
        tied(e, t)
    with pytest.raises(ValueError, match="embed="):
        untied(e, t, embed=jnp.zeros((V, D)))
    with pytest.raises(ValueError, match=r"\(101, 37\)"):
        tied(e, t, embed=jnp.zeros((V, D + 1)))
    with pytest.raises(TypeError, match="redution"):
        untied(e, t, redution="sum")
    with pytest.raises(ValueError, match="last_only"):
        untied(e, t, last_only=True)
    with pytest.raises(ValueError, match="targets"):
        untied(e, return_lse=True)
    with pytest.raises(ValueError, match="reduction"):
        untied(e, t, reduction="avg")
    with pytest.raises(TypeError, match="floating"):
        untied(t)
    with pytest.raises(ValueError, match="D = 37"):
        untied(jnp.zeros((B, T, D + 1)))
