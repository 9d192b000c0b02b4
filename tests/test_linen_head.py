"""cce_jax.linen.LinearCrossEntropyHead against the float64 reference (tests/reference.py) and Flax conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from cce_jax import XlaConfig  # noqa: E402
from cce_jax.linen import LinearCrossEntropyHead  # noqa: E402
from cce_jax.nnx import LOSS_OPTIONS  # noqa: E402
from reference import assert_close, f64, make_inputs, reference_grads, reference_loss  # noqa: E402

B, T, D, V = 2, 7, 37, 101  # prime V, D not a multiple of any block
BLOCKS = XlaConfig(block_n=4, block_v=16)


def test_untied_head_matches_reference(rng):
    x = make_inputs(rng, (B, T), D, V, layout="dv", bias=True, weights=True)
    options = dict(softcap=2.0, shift=1, label_smoothing=0.1, ignore_index=x.ignore_index)
    head = LinearCrossEntropyHead(V, use_bias=True, impl=BLOCKS, reduction="sum", **options)
    params = {"params": {"kernel": x.c, "bias": x.bias}}
    abstract = jax.eval_shape(lambda: head.init(jax.random.key(0), x.e))
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, params)
    ref = reference_loss(x.e, x.c, x.targets, x.bias, weights=x.weights, reduction="sum", classifier_layout="dv",
                         **options)
    g_lse = rng.standard_normal(ref.lse.shape)

    @jax.jit
    def run(e, params):
        f = lambda e, p: head.apply(p, e, x.targets, weights=x.weights, return_lse=True)  # noqa: E731
        out, vjp = jax.vjp(f, e, params)
        return out, vjp((jnp.float32(-1.5), jnp.asarray(g_lse, jnp.float32)))

    (loss, lse), (de, dparams) = run(x.e, params)
    (ref_de, ref_dc, ref_db), (s_de, s_dc, s_db) = reference_grads(
        x.e, x.c, x.targets, x.bias, g_loss=-1.5, g_lse=g_lse, weights=x.weights, reduction="sum",
        classifier_layout="dv", with_scales=True, **options)
    assert_close(loss, ref.loss, jnp.float32, "loss", "loss", scale=ref.loss_scale)
    assert_close(lse, ref.lse, jnp.float32, "loss", "lse", scale=ref.lse_scale)
    assert_close(de, ref_de, jnp.float32, "grad", "de", scale=s_de)
    assert_close(dparams["params"]["kernel"], ref_dc, jnp.float32, "grad", "dkernel", scale=s_dc)
    assert_close(dparams["params"]["bias"], ref_db, jnp.float32, "grad", "dbias", scale=s_db)


class _LM(nn.Module):
    """Embedding, one Dense, and either the CCE head or the nn.Dense it replaces, both named lm_head."""

    head: str  # "tied", "untied" or "dense"

    def setup(self):
        self.embed = nn.Embed(V, D)
        self.proj = nn.Dense(D)
        if self.head == "dense":
            self.lm_head = nn.Dense(V, use_bias=False)
        else:
            self.lm_head = LinearCrossEntropyHead(V, tied=self.head == "tied", shift=1, impl=BLOCKS)

    def __call__(self, tokens, targets=None, **kwargs):
        h = self.proj(self.embed(tokens))
        if self.head == "dense":
            return self.lm_head(h)
        return self.lm_head(h, targets, embed=self.embed if self.head == "tied" else None, **kwargs)

    def hidden(self, tokens):
        return self.proj(self.embed(tokens))


def test_drop_in_for_dense():
    """Same parameter tree and initial values as the nn.Dense it replaces; same logits."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    dense_vars = _LM("dense").init(jax.random.key(4), tokens)
    head_vars = _LM("untied").init(jax.random.key(4), tokens)
    assert jax.tree.structure(dense_vars) == jax.tree.structure(head_vars)
    for a, b in zip(jax.tree.leaves(dense_vars), jax.tree.leaves(head_vars)):
        np.testing.assert_array_equal(a, b)
    logits = _LM("untied").apply(head_vars, tokens)
    assert_close(logits, f64(_LM("dense").apply(dense_vars, tokens)), jnp.float32, "loss", "logits vs nn.Dense")


@pytest.mark.parametrize("name", ["Dense_1", "lm_head"])
def test_named_head_keeps_the_compact_dense_tree(name):
    """In @nn.compact, nn.Dense(V) is auto-named Dense_1 (after the body's Dense_0) and the head
    LinearCrossEntropyHead_0; with name= set to the old layer's name the parameter tree is the Dense's."""

    class Compact(nn.Module):
        cce: bool
        head_name: str | None = None

        @nn.compact
        def __call__(self, tokens):
            h = nn.Dense(D)(nn.Embed(V, D)(tokens))
            if self.cce:
                return LinearCrossEntropyHead(V, impl=BLOCKS, name=self.head_name)(h)
            return nn.Dense(V, use_bias=False, name=None if self.head_name == "Dense_1" else self.head_name)(h)

    tokens = jnp.zeros((B, T), jnp.int32)
    dense_vars = Compact(cce=False, head_name=name).init(jax.random.key(3), tokens)
    head_vars = Compact(cce=True, head_name=name).init(jax.random.key(3), tokens)
    assert name in dense_vars["params"]
    assert jax.tree.map(jnp.shape, head_vars) == jax.tree.map(jnp.shape, dense_vars)
    for a, b in zip(jax.tree.leaves(dense_vars), jax.tree.leaves(head_vars)):
        np.testing.assert_array_equal(a, b)
    unnamed = Compact(cce=True).init(jax.random.key(3), tokens)
    assert "LinearCrossEntropyHead_0" in unnamed["params"] and name not in unnamed["params"]


def test_tied_head_in_model(rng):
    """The tied head adds no parameter; the embedding gets the lookup's and the classifier's gradients."""
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    model = _LM("tied")
    variables = model.init(jax.random.key(1), tokens)
    assert set(variables["params"]) == {"embed", "proj"}

    def dense_loss(variables):
        h = model.apply(variables, tokens, method=_LM.hidden)
        logits = jnp.einsum("btd,vd->btv", h, variables["params"]["embed"]["embedding"], precision="highest")
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    @jax.jit
    def run(variables):
        return (jax.value_and_grad(lambda v: model.apply(v, tokens, tokens))(variables),
                jax.value_and_grad(dense_loss)(variables), model.apply(variables, tokens, last_only=True))

    (loss, grads), (ref_loss, ref_grads), last = run(variables)
    assert_close(loss, f64(ref_loss), jnp.float32, "loss", "tied loss")
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = ref_grads
        for key in path:
            r = r[key.key]
        assert_close(g, f64(r), jnp.float32, "grad", jax.tree_util.keystr(path))
    h = model.apply(variables, tokens, method=_LM.hidden)
    ref_last = f64(h[:, -1]) @ f64(variables["params"]["embed"]["embedding"]).T
    assert_close(last, ref_last, jnp.float32, "loss", "last-position logits")


def test_partitioning_and_dtypes(rng):
    head = LinearCrossEntropyHead(V, use_bias=True, kernel_axes=("embed", "vocab"), bias_axes=("vocab",),
                                  param_dtype=jnp.bfloat16)
    e = jnp.zeros((B, T, D), jnp.float32)
    abstract = jax.eval_shape(lambda: head.init(jax.random.key(0), e))
    specs = nn.get_partition_spec(abstract)["params"]
    assert specs["kernel"] == P("embed", "vocab") and specs["bias"] == P("vocab")
    assert nn.unbox(abstract)["params"]["kernel"].dtype == jnp.bfloat16

    # float32 parameters, bfloat16 compute: the loss equals the reference on the rounded operands.
    x = make_inputs(rng, (B, T), D, V, layout="dv")
    mixed = LinearCrossEntropyHead(V, dtype=jnp.bfloat16, impl=BLOCKS)
    loss = jax.jit(mixed.apply)({"params": {"kernel": x.c}}, x.e, x.targets)
    ref = reference_loss(x.e.astype(jnp.bfloat16), x.c.astype(jnp.bfloat16), x.targets, classifier_layout="dv")
    assert loss.dtype == jnp.float32
    assert_close(loss, ref.loss, jnp.bfloat16, "loss", "bf16 loss", scale=ref.loss_scale)


def test_options_and_errors():
    head = LinearCrossEntropyHead(V, softcap=30.0, reduction="none")
    assert head.loss_options == {**{n: getattr(LinearCrossEntropyHead, n) for n in LOSS_OPTIONS},
                                 "softcap": 30.0, "reduction": "none"}
    e = jnp.zeros((B, T, D))
    t = jnp.zeros((B, T), jnp.int32)
    variables = {"params": {"kernel": jnp.zeros((D, V))}}
    with pytest.raises(ValueError, match="tied"):
        LinearCrossEntropyHead(V, tied=True).apply({}, e, t)
    with pytest.raises(ValueError, match="embed="):
        head.apply(variables, e, t, embed=jnp.zeros((V, D)))
    with pytest.raises(ValueError, match=r"\(101, 37\)"):
        LinearCrossEntropyHead(V, tied=True).apply({}, e, t, embed=jnp.zeros((V + 1, D)))
    with pytest.raises(TypeError, match="redution"):
        head.apply(variables, e, t, redution="sum")
    with pytest.raises(ValueError, match="vocab_size"):
        LinearCrossEntropyHead(0).init(jax.random.key(0), e)
    with pytest.raises(ValueError, match="last_only"):
        head.apply(variables, e, t, last_only=True)
