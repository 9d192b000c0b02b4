"""The compiled kernels on a real GPU against the dense float32 computation; skipped without a GPU.

The CPU interpreter hides races, out-of-bounds reads and TF32 error, so every kernel change is run through
this file on the GPU (see benchmarks/README.md for the command).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

OPTIONS = [
    {},
    {"softcap": 30.0, "bias": True},
    {"label_smoothing": 0.1, "reduction": "sum"},
    {"classifier_layout": "dv", "shift": 1},
    {"reduction": "none", "return_lse": True, "weights": True},
    {"z_loss": 1e-3, "weights": True, "softcap": 30.0},
    {"return_lse": True, "shift": 1, "bias": True},
    {"grad_path": "recompute", "bias": True},
]


def _inputs(rng, n, d, v, dtype, layout="vd", bias=False, weights=False):
    e = rng.normal(size=(2, n // 2, d)).astype(np.float32)
    c = (rng.normal(size=(v, d)) / np.sqrt(d)).astype(np.float32)
    t = rng.integers(0, v, size=(2, n // 2)).astype(np.int32)
    t[0, :3] = -100
    args = dict(
        e=jnp.asarray(e, dtype),
        c=jnp.asarray(c.T if layout == "dv" else c, dtype),
        bias=jnp.asarray(rng.normal(size=(v,)) * 0.5, dtype) if bias else None,
        targets=jnp.asarray(t),
        weights=jnp.asarray(rng.uniform(0.5, 2.0, size=t.shape), jnp.float32) if weights else None,
    )
    return args  # ordered like the objective's parameters


def _objective(impl, opts):
    opts = {k: v for k, v in opts.items() if k not in ("bias", "weights")}

    def f(e, c, bias, targets, weights):
        out = cce_jax.linear_cross_entropy(e, c, targets, bias, weights=weights, impl=impl, **opts)
        if opts.get("return_lse"):
            loss, lse = out
            return loss.sum() + 1e-2 * cce_jax.compute_z_loss(lse)
        return out.sum()

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("impl", ["cce", "cce_exact", "xla"])
def test_kernels_match_dense_on_gpu(impl, dtype, tol, opts):
    rng = np.random.default_rng(len(str(opts)))
    n, d, v = 1030, 1000, 50257  # ragged in every dimension
    args = _inputs(rng, n, d, v, dtype, opts.get("classifier_layout", "vd"), opts.get("bias", False),
                   opts.get("weights", False))
    ref_args = {k: (x.astype(jnp.float32) if x is not None and x.dtype == dtype else x) for k, x in args.items()}
    (loss, grads) = _objective(impl, opts)(*args.values())
    (ref_loss, ref_grads) = _objective("dense", opts)(*ref_args.values())
    assert np.isfinite(float(loss))
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss)) + 1e-6
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert _rel(g, r) < 4 * tol


@pytest.mark.parametrize("grad_path", ["three_pass", "recompute"])
def test_kernels_are_deterministic_on_gpu(grad_path):
    rng = np.random.default_rng(0)
    args = _inputs(rng, 4096, 2304, 65537, jnp.bfloat16, bias=True)
    fn = _objective("cce", {"softcap": 30.0, "grad_path": grad_path})
    first = jax.tree.map(np.asarray, fn(*args.values()))
    for _ in range(2):
        again = jax.tree.map(np.asarray, fn(*args.values()))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), first, again)


# Shapes the Mosaic GPU kernels accept (D % 16, V % 8; "dv" also V % 16), ragged against every tile: on a
# Hopper GPU impl="cce" then runs the Mosaic logits chunk on the three-pass path (asserted from the lowering).
MOSAIC_OPTIONS = [
    {},
    {"softcap": 30.0, "bias": True},
    {"label_smoothing": 0.1, "reduction": "sum", "bias": True},
    {"classifier_layout": "dv", "shift": 1},
    {"z_loss": 1e-3, "weights": True, "softcap": 30.0},
]
HOPPER = jax.default_backend() == "gpu" and any(k in jax.devices()[0].device_kind for k in ("H100", "H200"))


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("opts", MOSAIC_OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_mosaic_three_pass_matches_dense_on_gpu(opts):
    rng = np.random.default_rng(7 + len(str(opts)))
    layout = opts.get("classifier_layout", "vd")
    n, d, v = 1030, 1008, 50264 if layout == "vd" else 50272
    args = _inputs(rng, n, d, v, jnp.bfloat16, layout, opts.get("bias", False), opts.get("weights", False))
    ref_args = {k: (x.astype(jnp.float32) if x is not None and x.dtype == jnp.bfloat16 else x)
                for k, x in args.items()}
    fn = _objective("cce", opts)
    assert "cce_logits_chunk_mosaic" in fn.lower(*args.values()).as_text()
    loss, grads = fn(*args.values())
    ref_loss, ref_grads = _objective("dense", opts)(*ref_args.values())
    assert abs(float(loss) - float(ref_loss)) <= 2e-3 * abs(float(ref_loss)) + 1e-6
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert _rel(g, r) < 2e-2
    again = fn(*args.values())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (loss, grads), again)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("reduction,sort_vocab", [("mean", False), ("none", False), ("mean", True)],
                         ids=["mean", "none", "mean-sorted"])
def test_mosaic_paths_per_token_cotangents_on_gpu(reduction, sort_vocab):
    """Random non-uniform per-token cotangents through the compiled Mosaic GPU paths: "mean" differentiates the
    returned lse too (three-pass gradients plus the exact recompute VJP), over 3 chunks of 512 whose last overlaps
    the one before it (N = 1280), in natural or sorted vocabulary order; "none" weighs each token's loss (the
    recompute path over the Mosaic forward)."""
    import dataclasses

    from cce_jax import cce

    rng = np.random.default_rng(11)
    n, d, v = 1280, 1008, 50264
    args = _inputs(rng, n, d, v, jnp.bfloat16, bias=True, weights=True)
    ref_args = {k: (x.astype(jnp.float32) if x is not None and x.dtype == jnp.bfloat16 else x)
                for k, x in args.items()}
    shape = args["targets"].shape
    g_lse = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape), jnp.float32)
    g_loss = jnp.asarray(rng.standard_normal(shape) * 2.0, jnp.float32)
    config = dataclasses.replace(cce.default_config(d, jnp.bfloat16), chunk_tokens=512, sort_vocab=sort_vocab)

    def objective(impl):
        def f(e, c, bias, targets, weights):
            loss, lse = cce_jax.linear_cross_entropy(e, c, targets, bias, weights=weights, impl=impl,
                                                     reduction=reduction, softcap=30.0, return_lse=True,
                                                     z_loss=1e-3 if reduction == "mean" else 0.0)
            return (loss * g_loss).sum() + (lse * g_lse).sum() if reduction == "none" else loss + (lse * g_lse).sum()
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    fn = objective(config)
    text = fn.lower(*args.values()).as_text()
    assert ("cce_logits_chunk_mosaic" in text) == (reduction == "mean")
    assert "cce_lse_forward_mosaic" in text
    value, grads = fn(*args.values())
    ref_value, ref_grads = objective("dense")(*ref_args.values())
    assert abs(float(value) - float(ref_value)) <= 2e-3 * abs(float(ref_value)) + 1e-3
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 2e-2
    again = fn(*args.values())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (value, grads), again)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_mosaic_sparse_de_on_gpu(layout):
    """The compiled Mosaic GPU block-sparse dE product in the three-pass path (every chunk sparse; random data
    leaves mostly the targets' tiles live), with per-token lse cotangents, against the dense float32 result, the
    Triton product's and itself (bit-identical repeats)."""
    import dataclasses

    from cce_jax import cce

    rng = np.random.default_rng(13)
    n, d, v = 1280, 1008, 50264 if layout == "vd" else 50272
    args = _inputs(rng, n, d, v, jnp.bfloat16, layout, bias=True)
    ref_args = {k: (x.astype(jnp.float32) if x is not None and x.dtype == jnp.bfloat16 else x)
                for k, x in args.items()}
    g_lse = jnp.asarray(rng.standard_normal(args["targets"].shape) * 0.5, jnp.float32)
    base = cce.default_config(d, jnp.bfloat16)
    # The kernel's rows are the filter flags' rows: 64 (the H200 table uses 128 at this D, so "auto" would
    # keep the Triton product there).
    config = dataclasses.replace(base, backward=dataclasses.replace(base.backward, block_n=64), chunk_tokens=512,
                                 chunk_dense_fraction=1.0, chunk_dc="sparse")

    def objective(impl, **extra):
        def f(e, c, bias, targets, weights):
            loss, lse = cce_jax.linear_cross_entropy(e, c, targets, bias, impl=impl, classifier_layout=layout,
                                                     return_lse=True, **extra)
            return loss + (lse * g_lse).sum()
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    fn = objective(dataclasses.replace(config, sparse_de_backend="mosaic"), filter_eps=1e-3)
    assert "cce_sparse_de_mosaic" in fn.lower(*args.values()).as_text()
    value, grads = fn(*args.values())
    ref_value, ref_grads = objective("dense")(*ref_args.values())
    assert abs(float(value) - float(ref_value)) <= 2e-3 * abs(float(ref_value)) + 1e-3  # the forward never filters
    # Filtering at 1e-3 drops most of this flat softmax (and with it most of the lse cotangent's dE), so the
    # products are checked against the same filtering on the Triton product: the same live tiles, bf16 rounding
    # of dE apart, and the same distance from the dense result.
    t_value, t_grads = objective(dataclasses.replace(config, sparse_de_backend="triton"), filter_eps=1e-3)(
        *args.values())
    assert float(value) == float(t_value)
    assert _rel(grads[0], t_grads[0]) < 5e-3
    assert abs(_rel(grads[0], ref_grads[0]) - _rel(t_grads[0], ref_grads[0])) < 5e-3
    for g, t in zip(grads[1:], t_grads[1:]):  # dC and dbias: the same Triton kernels
        np.testing.assert_array_equal(np.asarray(g), np.asarray(t))
    again = fn(*args.values())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (value, grads), again)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("layout,v,bias,cap", [("vd", 50264, True, 30.0), ("dv", 50272, True, None),
                                               ("vd", 328, False, 3.0)])
def test_mosaic_logits_chunk_on_gpu(layout, v, bias, cap):
    """The compiled two-warpgroup logits-chunk kernel against float64 at the GPU's shape rules: stored tiles, tile
    maxima, statistics, -inf past V."""
    from test_mosaic_forward import _check_logits_chunk

    from pallas_kernels import mosaic_forward as mf

    # One CTA per SM (both row blocks split 66 ways); 5 CTAs (2 splits, tails on the fifth); clusters of two CTAs
    # (the row blocks as one unit, the classifier tiles multicast) on one wave and on 2 clusters (2 splits).
    for ctas, cluster in ((None, 1), (5, 1), (None, 2), (4, 2)):
        cfg = mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, ctas=ctas,
                                     cluster=cluster)
        _check_logits_chunk(256, 1008, v, layout=layout, has_bias=bias, softcap=cap, cfg=cfg, interpret=False)
    # Row-split warpgroups (each stores its 64 rows of a 256-column tile), and the overlapped epilogue (each tile
    # stored during the next tile's matmul), on 5 CTAs.
    for cfg in (mf.MosaicForwardConfig(block_n=128, block_v=256, block_d=64, stages=3, compute_wgs=2, wg_split="n",
                                       ctas=5),
                mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2, wg_split="n",
                                       overlap_epilogue=True, ctas=5)):
        _check_logits_chunk(256, 1008, v, layout=layout, has_bias=bias, softcap=cap, cfg=cfg, interpret=False)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("layout,v", [("vd", 50264), ("dv", 50272)])
@pytest.mark.parametrize("ctas,bias,cap,need_sum,block_d,cluster,gather", [
    (None, True, 30.0, True, 64, 1, False), (None, False, None, False, 64, 1, False),
    (7, True, None, True, 64, 1, False), (60, False, 5.0, False, 64, 1, False),
    (None, True, 30.0, True, 128, 1, False), (7, False, None, False, 128, 1, False),
    (None, True, 30.0, True, 128, 2, False), (7, False, None, True, 128, 2, False),
    (60, True, 5.0, False, 64, 2, False), (None, True, 30.0, False, 128, 1, True), (7, False, None, True, 128, 2, True),
])
def test_mosaic_forward_on_gpu(layout, v, ctas, bias, cap, need_sum, block_d, cluster, gather):
    """The compiled Mosaic GPU forward against float64 at ragged shapes (N 1030: 9 row blocks, the last partial;
    D 1008; V ragged against the tile) on its persistent-grid schedules (pallas_kernels.mosaic_schedule): one CTA
    per SM (every row block split 14 ways), 7 CTAs (a round of whole row blocks, then 3 splits of the last two,
    their tails on the seventh CTA), 60 CTAs (6 splits, tails on the 6 spare CTAs); block_d 64 in 3 stages and
    128 in 2 (the default); clusters of two CTAs (5 units of 2 row blocks, the last with a phantom second row
    block; on 66, 3 and 30 clusters), the classifier tiles multicast; the target logits from XLA's gathered
    product (``target_gather``); bit-identical repeats."""
    from test_mosaic_forward import _run_and_check

    from pallas_kernels import mosaic_forward as mf

    cfg = mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=block_d, stages=3 if block_d == 64 else 2,
                                 compute_wgs=2, ctas=ctas, cluster=cluster, target_gather=gather)
    args = dict(layout=layout, has_bias=bias, softcap=cap, need_sum=need_sum, cfg=cfg, interpret=False)
    first = _run_and_check(1030, 1008, v, **args)
    again = _run_and_check(1030, 1008, v, **args)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("layout,v", [("vd", 50264), ("dv", 50272)])
@pytest.mark.parametrize("tiles,ctas,cluster,bias,cap,need_sum,gather", [
    ("n256", None, 1, True, 30.0, True, False), ("n256", 7, 1, False, None, False, True),
    ("ov", None, 1, True, 30.0, True, False), ("ov", 7, 1, False, 5.0, True, True),
    ("ov", None, 2, True, None, False, True), ("ov", 7, 2, True, 30.0, True, False),
    ("ov-async", 60, 1, False, None, True, True),
])
def test_mosaic_forward_row_split_on_gpu(layout, v, tiles, ctas, cluster, bias, cap, need_sum, gather):
    """The compiled Mosaic GPU forward with row-split warpgroups (``wg_split="n"``: 64 rows each, of 256 columns
    in one m64n256 wgmma, or of 128 columns with ``overlap_epilogue``, each tile's epilogue during the next
    tile's matmul; with a wgmma kept in flight in "ov-async") against float64 at the ragged shapes of
    :func:`test_mosaic_forward_on_gpu`, on one wave, 7 and 60 CTAs, with clusters of two CTAs (a phantom row
    block on 7 CTAs), the target from the epilogue and from XLA; bit-identical repeats."""
    from test_mosaic_forward import _run_and_check

    from pallas_kernels import mosaic_forward as mf

    base = dict(block_n=128, compute_wgs=2, wg_split="n", ctas=ctas, cluster=cluster, target_gather=gather)
    cfg = {"n256": mf.MosaicForwardConfig(block_v=256, block_d=128, stages=2, **base),
           "ov": mf.MosaicForwardConfig(block_v=128, block_d=128, stages=3, overlap_epilogue=True, **base),
           "ov-async": mf.MosaicForwardConfig(block_v=128, block_d=64, stages=6, overlap_epilogue=True,
                                              async_wgmma=True, **base)}[tiles]
    args = dict(layout=layout, has_bias=bias, softcap=cap, need_sum=need_sum, cfg=cfg, interpret=False)
    first = _run_and_check(1030, 1008, v, **args)
    again = _run_and_check(1030, 1008, v, **args)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
