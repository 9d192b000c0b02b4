"""Mosaic GPU forward (pallas_kernels.mosaic_forward) on a CPU: the Mosaic GPU interpreter against a float64
reference, and lowering for an abstract H200 (layout inference, Mosaic GPU dialect lowering, TMA descriptor
rules and the MLIR verifier run in Python, so most GPU-only errors show up without a GPU).

What neither can show: wgmma/TMA timing, register pressure (set_max_registers), ptxas errors. Those need the GPU
check, benchmarks/mosaic_gpu_check.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from pallas_kernels import mosaic_forward as mf
from pallas_kernels import mosaic_logits_chunk as mlc
from pallas_kernels.tiles import Problem

CFG = mf.MosaicForwardConfig(block_n=64, block_v=128, block_d=64, stages=3, compute_wgs=2)


def _inputs(n, d, v, layout, dtype, has_bias, seed=0, bias_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    e = jnp.asarray(rng.standard_normal((n, d)), dtype)
    c = jnp.asarray(rng.standard_normal((v, d)) / np.sqrt(d), dtype)  # O(1) logits
    if layout == "dv":
        c = c.T
    bias = jnp.asarray(rng.standard_normal(v) * 0.5, bias_dtype) if has_bias else None
    t = rng.integers(0, v, n)
    t[::7] = -1
    t[3::11] = v + rng.integers(0, 5, len(t[3::11]))  # out of range
    t[5] = v - 1  # last column, inside the ragged tile
    t[6] = 2**30
    return e, c, bias, jnp.asarray(t, jnp.int32)


def _reference(e, c, bias, t, p: Problem):
    """float64 (lse, target logit, sum of logits) of the (already half-rounded) inputs."""
    e64 = np.asarray(e.astype(jnp.float32), np.float64)
    c64 = np.asarray(c.astype(jnp.float32), np.float64)
    z = e64 @ (c64.T if p.layout == "vd" else c64)
    if bias is not None:
        z = z + np.asarray(bias.astype(jnp.float32), np.float64)[None, :]
    if p.softcap is not None:
        z = p.softcap * np.tanh(z / p.softcap)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    t = np.asarray(t)
    ok = (t >= 0) & (t < p.v)
    zt = np.where(ok, z[np.arange(p.n), np.clip(t, 0, p.v - 1)], 0.0)
    return lse, zt, z.sum(axis=1)


def _run_and_check(n, d, v, *, layout="vd", dtype=jnp.bfloat16, has_bias=False, softcap=None, need_sum=True,
                   cfg=CFG, bias_dtype=jnp.float32, seed=0, interpret=True):
    p = Problem(n=n, d=d, v=v, layout=layout, softcap=softcap, has_bias=has_bias)
    e, c, bias, t = _inputs(n, d, v, layout, dtype, has_bias, seed=seed, bias_dtype=bias_dtype)
    out = mf.lse_forward_mosaic(e, c, bias, t, p=p, cfg=cfg, need_sum=need_sum, interpret=interpret)
    lse, zt, zs = out
    for x in (lse, zt, zs):
        assert x.shape == (n,) and x.dtype == jnp.float32
    r_lse, r_zt, r_zs = _reference(e, c, bias, t, p)
    # Products of half inputs are exact in float32 and accumulate in float32: agreement to float32 rounding.
    np.testing.assert_allclose(np.asarray(lse), r_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(zt), r_zt, rtol=1e-5, atol=1e-5)
    if need_sum:  # float32 sums of V terms of either sign: the rounding grows with V
        np.testing.assert_allclose(np.asarray(zs), r_zs, rtol=1e-5, atol=2e-4 + 2e-7 * v)
    else:
        np.testing.assert_array_equal(np.asarray(zs), 0.0)
    return out


# N=70 (not a multiple of 8 or of block_n), V ragged against the 256-column CTA tile, D ragged against block_d.
@pytest.mark.parametrize("layout,v", [("vd", 328), ("dv", 336)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_plain(layout, v, dtype):
    _run_and_check(70, 80, v, layout=layout, dtype=dtype)


@pytest.mark.parametrize("layout,v", [("vd", 328), ("dv", 336)])
def test_bias_softcap(layout, v):
    _run_and_check(70, 96, v, layout=layout, has_bias=True, softcap=3.0)


def test_bias_half_dtype_no_sum():
    _run_and_check(72, 128, 264, has_bias=True, bias_dtype=jnp.bfloat16, need_sum=False)


def test_softcap_only_fp16():
    _run_and_check(64, 64, 512, dtype=jnp.float16, softcap=2.0)


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(CFG, compute_wgs=1),
    dataclasses.replace(CFG, block_v=64, stages=2),
    dataclasses.replace(CFG, ctas=2),  # a round of whole row blocks, then the last one split in two
    dataclasses.replace(CFG, ctas=4, compute_wgs=1, block_v=64),  # three row blocks, one per CTA, one CTA idle
    dataclasses.replace(CFG, block_n=128, block_d=32, stages=4),
    dataclasses.replace(CFG, async_wgmma=True, stages=4),
    dataclasses.replace(CFG, async_wgmma=True, stages=2, compute_wgs=1),  # the slot released late is the ring
    # Clusters of two CTAs: 3 row blocks make 2 units, the second with a phantom row block; on 2 clusters a round
    # of whole units; on 3 clusters (ctas 7 rounds down to 6) the units split in two, tails on the third.
    dataclasses.replace(CFG, cluster=2, ctas=4),
    dataclasses.replace(CFG, cluster=2, ctas=7, compute_wgs=1),
    # The target logits from gathered classifier rows in XLA (the kernel takes no targets).
    dataclasses.replace(CFG, target_gather=True, ctas=2),
    # Warpgroups splitting the rows of a 128 x 128 tile (64 each, one shared classifier tile, no merge).
    dataclasses.replace(CFG, block_n=128, wg_split="n", ctas=2),
    # Each tile's epilogue during the next tile's matmul (D = 96: 2 steps for 5 pieces, the last step runs 4):
    # with row-split warpgroups on 3 CTAs (splits and tails); one warpgroup of 64 x 128; clusters of two CTAs with
    # a wgmma kept in flight; the target from the epilogue and from XLA.
    dataclasses.replace(CFG, block_n=128, wg_split="n", overlap_epilogue=True, ctas=3),
    dataclasses.replace(CFG, compute_wgs=1, overlap_epilogue=True, ctas=2),
    dataclasses.replace(CFG, block_n=128, wg_split="n", overlap_epilogue=True, cluster=2, ctas=4, async_wgmma=True,
                        stages=4, target_gather=True),
    # Three compute warpgroups: 64 rows each of a 192-row block (N 240: a whole and a partial row block), or three column
    # slices of a 192-column tile merged into warpgroup 0.
    dataclasses.replace(CFG, block_n=192, compute_wgs=3, wg_split="n", ctas=2),
    dataclasses.replace(CFG, block_v=64, compute_wgs=3, ctas=3),
], ids=["1wg", "bv64-s2", "ctas2", "ctas4-1wg", "bn128-bd32", "async", "async-s2-1wg", "cluster2", "cluster2-tails",
        "target-gather", "split-n", "overlap-split-n", "overlap-1wg", "overlap-cluster2-async", "3wg-split-n", "3wg"])
def test_configs(cfg):
    _run_and_check(max(140, cfg.block_n + 48), 96, 328, has_bias=True, softcap=5.0, cfg=cfg)


@pytest.mark.parametrize("layout,v", [("vd", 1992), ("dv", 2000)])
def test_overlapped_epilogue_over_long_segments(layout, v):
    """``overlap_epilogue`` with more pipeline steps per tile than epilogue pieces (D = 320 in slices of 32: the
    head of the previous tile in step 0, its 4 exp slices in steps 1-4), segments of up to 16 tiles of 128
    columns (2 CTAs: a whole row block each, then the third split in two), the last tile ragged, bias and
    softcap; and without the exps (debug "row_max" keeps the max)."""
    cfg = mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=32, stages=4, compute_wgs=2, wg_split="n",
                                 overlap_epilogue=True, ctas=2)
    _run_and_check(300, 320, v, layout=layout, has_bias=True, softcap=5.0, cfg=cfg)
    p = Problem(n=300, d=320, v=v, layout=layout)
    e, c, _, t = _inputs(300, 320, v, layout, jnp.bfloat16, False)
    for debug in ("row_max", "matmul_only"):
        m, _, _ = mf.lse_forward_mosaic(e, c, None, t, p=p, cfg=cfg, need_sum=False, interpret=True, debug=debug)
        c64 = np.asarray(c.astype(jnp.float32), np.float64)
        z = np.asarray(e.astype(jnp.float32), np.float64) @ (c64.T if layout == "vd" else c64)
        np.testing.assert_allclose(np.asarray(m), z.max(axis=1), rtol=1e-5, atol=1e-5)


def test_single_tile_everything_masked_in_second_warpgroup():
    # V=264 < 2 tiles: with two CTAs the second one has only the last tile, where warpgroup 0 sees 8 valid
    # columns and warpgroup 1 none at all.
    _run_and_check(64, 64, 264, cfg=dataclasses.replace(CFG, ctas=2), has_bias=True)


def test_repeats_bit_identical():
    p = Problem(n=70, d=80, v=328)
    e, c, _, t = _inputs(70, 80, 328, "vd", jnp.bfloat16, False)
    a = mf.lse_forward_mosaic(e, c, None, t, p=p, cfg=CFG, need_sum=True, interpret=True)
    b = mf.lse_forward_mosaic(e, c, None, t, p=p, cfg=CFG, need_sum=True, interpret=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pure_math_helpers():
    z = jnp.asarray([[1.0, 2.0, -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    m, s = mf.online_update(jnp.full((2,), -jnp.inf), jnp.zeros(2), z)
    assert np.isfinite(np.asarray(s)).all() and float(s[1]) == 0.0
    np.testing.assert_allclose(float(mf.finish_lse(m, s)[0]), np.log(np.exp(1) + np.exp(2)), rtol=1e-6)
    m2, s2 = mf.merge_stats(m, s, jnp.asarray([0.5, -jnp.inf]), jnp.asarray([1.0, 0.0]))
    np.testing.assert_allclose(float(mf.finish_lse(m2, s2)[0]), np.log(np.exp(1) + np.exp(2) + np.exp(0.5)),
                               rtol=1e-6)
    assert float(s2[1]) == 0.0 and float(m2[1]) == -np.inf


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=jnp.float32), "bf16/fp16"),
    (dict(d=1000), "multiples of 16"),  # 2000-byte rows: no 32-byte swizzle divides them
    (dict(v=330), "V % 8"),
    (dict(layout="dv", v=328), "multiples of 16"),
    (dict(n=32), "smaller than one tile"),
])
def test_unsupported_raise(kwargs, match):
    n, d, v = kwargs.get("n", 70), kwargs.get("d", 64), kwargs.get("v", 336)
    layout, dtype = kwargs.get("layout", "vd"), kwargs.get("dtype", jnp.bfloat16)
    p = Problem(n=n, d=d, v=v, layout=layout)
    e = jnp.zeros((n, d), dtype)
    c = jnp.zeros((v, d) if layout == "vd" else (d, v), dtype)
    assert not mf.supports(e, c, p, CFG)
    with pytest.raises(NotImplementedError, match=match):
        mf.lse_forward_mosaic(e, c, None, jnp.zeros((n,), jnp.int32), p=p, cfg=CFG, need_sum=False)


def test_config_validation():
    for bad in (dict(block_n=96), dict(block_v=512), dict(stages=1), dict(compute_wgs=4), dict(ctas=0),
                dict(cluster=3), dict(cluster=2, ctas=1)):
        with pytest.raises(ValueError):
            mf.MosaicForwardConfig(**bad)
    with pytest.raises(ValueError, match="wg_split"):
        mf.MosaicForwardConfig(wg_split="d")
    with pytest.raises(ValueError, match="64 \\* compute_wgs=2"):  # 32 rows per warpgroup
        mf.MosaicForwardConfig(block_n=64, wg_split="n")
    with pytest.raises(ValueError, match="compute_wgs=3 needs block_v <= 128"):  # ptxas: 128 registers a thread
        mf.MosaicForwardConfig(block_n=192, block_v=256, compute_wgs=3, wg_split="n")
    with pytest.raises(ValueError, match="at most 8192 entries"):  # two 128 x 128 float32 tiles per warpgroup
        mf.MosaicForwardConfig(block_n=128, block_v=128, overlap_epilogue=True)
    cfg = mf.MosaicForwardConfig(block_n=128, block_v=256, wg_split="n")
    assert (cfg.tile_v, cfg.wg_rows, cfg.c_copies) == (256, 64, 1)
    cfg = mf.MosaicForwardConfig(block_n=128, block_v=128)
    assert (cfg.tile_v, cfg.wg_rows, cfg.c_copies) == (256, 128, 2)


# ---------------------------------------------------------------------------------------------- CUDA lowering


def lower_for_h200(fn, *structs) -> str:
    """StableHLO of ``jax.jit(fn)`` lowered for CUDA on a machine without a GPU (Mosaic GPU lowers in Python)."""
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()


def _structs(n, d, v, layout, has_bias):
    """Abstract bf16 (e, c, bias or None, targets) for lowering."""
    S = jax.ShapeDtypeStruct
    return [S((n, d), jnp.bfloat16), S((v, d) if layout == "vd" else (d, v), jnp.bfloat16),
            S((v,), jnp.float32) if has_bias else None, S((n,), jnp.int32)]


LOWER_CASES = [
    # (n, d, v, layout, has_bias, softcap, need_sum, cfg)
    (1030, 1008, 50264, "vd", False, None, False, CFG),
    (1030, 1008, 50264, "vd", True, 30.0, True, CFG),
    (1030, 1008, 50272, "dv", True, 30.0, True, CFG),
    (1030, 1008, 50264, "vd", True, 5.0, True,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=2, compute_wgs=2)),
    (8192, 2304, 256000, "vd", False, None, True,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2)),
    (8192, 4096, 128256, "vd", False, None, False,
     mf.MosaicForwardConfig(block_n=64, block_v=256, block_d=64, stages=3, compute_wgs=1)),
    (8192, 2304, 256000, "dv", True, 30.0, True,
     mf.MosaicForwardConfig(block_n=64, block_v=256, block_d=64, stages=3, compute_wgs=2, approx_math=True)),
    (8192, 2304, 256000, "vd", False, None, True,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=32, stages=8, compute_wgs=2, async_wgmma=True)),
    # Clusters of two CTAs: multicast classifier tiles, a cluster-wide "consumed" barrier.
    (8192, 4096, 128256, "vd", False, None, False,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=2, compute_wgs=2, cluster=2)),
    (1030, 1008, 50272, "dv", True, 30.0, True,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2, cluster=2)),
    (8192, 4096, 128256, "vd", True, None, False,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=2, compute_wgs=2, target_gather=True)),
    # Row-split warpgroups (m64n256 wgmma), and the overlapped epilogue (two 64 x 128 tiles per warpgroup).
    (8192, 4096, 128256, "vd", False, None, False,
     mf.MosaicForwardConfig(block_n=128, block_v=256, block_d=128, stages=2, compute_wgs=2, wg_split="n",
                            target_gather=True)),
    (1030, 1008, 50272, "dv", True, 30.0, True,
     mf.MosaicForwardConfig(block_n=128, block_v=256, block_d=64, stages=3, compute_wgs=2, wg_split="n")),
    (8192, 2304, 256000, "vd", False, None, False,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=3, compute_wgs=2, wg_split="n",
                            overlap_epilogue=True, target_gather=True)),
    (1030, 1008, 50264, "vd", True, 30.0, True,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=4, compute_wgs=2, wg_split="n",
                            overlap_epilogue=True, cluster=2, async_wgmma=True)),
    # Three compute warpgroups (160 registers each, compiled for 128): 192 x 128 CTA tiles of row-split ones, or
    # 128 x 384.
    (8192, 4096, 128256, "vd", False, None, False,
     mf.MosaicForwardConfig(block_n=192, block_v=128, block_d=64, stages=3, compute_wgs=3, wg_split="n",
                            target_gather=True)),
    (1030, 1008, 50264, "vd", True, 30.0, True,
     mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=3, cluster=2)),
]


@pytest.mark.parametrize("case", LOWER_CASES,
                         ids=lambda c: f"{c[3]}-{c[0]}x{c[1]}x{c[2]}-b{int(c[4])}-cl{c[7].cluster}-{c[7].wg_split}"
                                       f"{'-ov' if c[7].overlap_epilogue else ''}")
def test_lowers_for_h200(case):
    n, d, v, layout, has_bias, cap, need_sum, cfg = case
    p = Problem(n=n, d=d, v=v, layout=layout, softcap=cap, has_bias=has_bias)
    structs = _structs(n, d, v, layout, has_bias)

    def fn(e, c, b, t):
        return mf.lse_forward_mosaic(e, c, b, t, p=p, cfg=cfg, need_sum=need_sum)

    text = lower_for_h200(fn, *structs)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("shape", [(8192, 2304, 256000), (8192, 4096, 128256)], ids=["gemma2", "llama3"])
def test_autotune_candidates_lower_for_h200(shape):
    """Every Mosaic GPU candidate the autotuner times, as the forward at the benchmark shapes and as a three-pass
    logits chunk of 1024 tokens: a candidate that breaks the GPU's shape or SMEM rules fails here, not on the GPU."""
    from cce_jax import autotune  # noqa: PLC0415

    n, d, v = shape
    e, c, _, t = _structs(n, d, v, "vd", False)
    p = Problem(n=n, d=d, v=v)
    for cfg in autotune.MOSAIC_FORWARD_CANDIDATES:
        fn = lambda e, c, t: mf.lse_forward_mosaic(e, c, None, t, p=p, cfg=cfg, need_sum=False)  # noqa: E731
        assert "mosaic_gpu" in lower_for_h200(fn, e, c, t), cfg
    e, c, _, t = _structs(1024, d, v, "vd", False)
    p = Problem(n=1024, d=d, v=v)
    for cfg in autotune.MOSAIC_CHUNK_CANDIDATES:
        fn = lambda e, c, t: mlc.logits_chunk_mosaic(e, c, None, t, p=p, cfg=cfg, need_sum=False)  # noqa: E731
        assert "cce_logits_chunk_mosaic" in lower_for_h200(fn, e, c, t), cfg


def test_output_stores_are_whole_row_blocks(monkeypatch):
    """The first H200 run's failure: an SMEM->GMEM store of the last, partial row block into an (N,) output is a
    bulk copy clamped to 4 * (N % block_n) bytes (24 at N = 1030), undefined unless a multiple of 16; the rows
    were not written. Every store must now cover a whole row block of a padded output."""
    from jax.experimental.mosaic.gpu import launch_context
    from jax._src.lib.mlir import ir

    stores = []
    orig = launch_context.LaunchContext.async_copy

    def spy(self, *, src_ref, dst_ref, **kw):
        dst_ty = ir.MemRefType(dst_ref.type)
        if dst_ty.memory_space is None:  # GMEM destination: a store
            stores.append(tuple(dst_ty.shape))
        return orig(self, src_ref=src_ref, dst_ref=dst_ref, **kw)

    monkeypatch.setattr(launch_context.LaunchContext, "async_copy", spy)
    n, d, v = 1030, 1008, 50264
    p = Problem(n=n, d=d, v=v)
    S = jax.ShapeDtypeStruct
    for need_sum in (True, False):
        stores.clear()
        lower_for_h200(lambda e, c, t: mf.lse_forward_mosaic(e, c, None, t, p=p, cfg=CFG, need_sum=need_sum),
                       S((n, d), jnp.bfloat16), S((v, d), jnp.bfloat16), S((n,), jnp.int32))
        assert len(stores) == 2 + need_sum, stores  # the sum of logits is stored only when needed
        assert all(s[-1] % CFG.block_n == 0 for s in stores), stores  # (slots, N_pad) partials


@pytest.mark.parametrize("debug", ["row_max", "matmul_only"])
def test_debug_row_max(debug):
    # "matmul_only" (the epilogue left out but the row max, for timing) must still mask the columns past V.
    for cfg in (CFG, dataclasses.replace(CFG, ctas=2)):
        p = Problem(n=70, d=80, v=328, has_bias=True, softcap=3.0)
        e, c, bias, t = _inputs(70, 80, 328, "vd", jnp.bfloat16, True)
        m, _, _ = mf.lse_forward_mosaic(e, c, bias, t, p=p, cfg=cfg, need_sum=False, interpret=True, debug=debug)
        z = np.asarray(e.astype(jnp.float32), np.float64) @ np.asarray(c.astype(jnp.float32), np.float64).T
        z = 3.0 * np.tanh((z + np.asarray(bias, np.float64)[None]) / 3.0)
        np.testing.assert_allclose(np.asarray(m), z.max(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,expected", [("mosaic", True), ("triton", False)])
def test_loss_dispatches_the_mosaic_forward(backend, expected):
    """``impl=KernelConfig(forward_backend=...)`` routes the loss's forward (evaluation) through the Mosaic GPU
    kernel or the Triton one; lowered for an H200 inside the jitted public loss."""
    import dataclasses

    import cce_jax
    from cce_jax import cce

    cfg = dataclasses.replace(cce.DEFAULT, forward_backend=backend)
    S = jax.ShapeDtypeStruct

    def fn(e, c, t):
        return cce_jax.linear_cross_entropy(e, c, t, impl=cfg, interpret=False, softcap=30.0)

    text = lower_for_h200(fn, S((1030, 1008), jnp.bfloat16), S((50264, 1008), jnp.bfloat16), S((1030,), jnp.int32))
    assert ("mosaic_gpu" in text) == expected
    if not expected:
        assert "cce_lse_forward" in text  # the Triton kernel's name


def test_auto_backend_keeps_triton_off_hopper():
    """Off a GPU (and in interpret mode) ``forward_backend="auto"`` never picks the Mosaic kernel."""
    import dataclasses

    from cce_jax import cce

    e = jnp.zeros((128, 64), jnp.bfloat16)
    c = jnp.zeros((512, 64), jnp.bfloat16)
    p = Problem(n=128, d=64, v=512)
    assert not cce.use_mosaic_forward(e, c, None, p, cce.DEFAULT, interpret=True)
    forced = dataclasses.replace(cce.DEFAULT, forward_backend="mosaic")
    with pytest.raises(NotImplementedError):  # D = 1000 and V = 50257 break the Mosaic copies' tiling
        cce.use_mosaic_forward(jnp.zeros((128, 1000), jnp.bfloat16), jnp.zeros((50257, 1000), jnp.bfloat16), None,
                               Problem(n=128, d=1000, v=50257), forced, False)


# ----------------------------------------------------------------------- logits chunk (three-pass pass 1)


def _check_logits_chunk(n, d, v, *, layout="vd", has_bias=False, softcap=None, need_sum=True, cfg=CFG,
                        dtype=jnp.bfloat16, interpret=True):
    """``logits_chunk_mosaic``: the stored tiles plus their maxima give back the float64 logits to the buffer's
    precision (relative to each tile's row maximum), the maxima and the statistics are float32-exact, columns
    past V hold -inf."""
    p = Problem(n=n, d=d, v=v, layout=layout, softcap=softcap, has_bias=has_bias)
    e, c, bias, t = _inputs(n, d, v, layout, dtype, has_bias)
    z_rel, m, lse, zt, zs = mlc.logits_chunk_mosaic(e, c, bias, t, p=p, cfg=cfg, need_sum=need_sum,
                                                   interpret=interpret)
    tile = cfg.block_v
    width = -(-v // cfg.tile_v) * cfg.tile_v
    assert z_rel.shape == (n, width) and z_rel.dtype == dtype and m.shape == (n, width // tile)
    e64 = np.asarray(e.astype(jnp.float32), np.float64)
    c64 = np.asarray(c.astype(jnp.float32), np.float64)
    z = e64 @ (c64.T if layout == "vd" else c64)
    if bias is not None:
        z = z + np.asarray(bias.astype(jnp.float32), np.float64)[None, :]
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    z_pad = np.pad(z, ((0, 0), (0, width - v)), constant_values=-np.inf)
    want_m = z_pad.reshape(n, width // tile, tile).max(axis=2)
    np.testing.assert_allclose(np.asarray(m), want_m, rtol=1e-5, atol=1e-5)
    got = np.asarray(z_rel.astype(jnp.float32), np.float64)
    assert np.all(got[:, v:] == -np.inf), "columns past V must hold -inf"
    rel = z - np.repeat(want_m, tile, axis=1)[:, :v]
    np.testing.assert_allclose(got[:, :v], rel, rtol=2 ** -8, atol=1e-4 * np.abs(z).max())
    # At most the tile's row maximum, up to a last-place difference between the compiled kernel's two uses of z.
    assert np.all(got[:, :v] <= 2.0 ** -10 * np.abs(z).max()), "a stored entry above its tile's row maximum"
    r_lse, r_zt, r_zs = _reference(e, c, bias, t, p)
    np.testing.assert_allclose(np.asarray(lse), r_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(zt), r_zt, rtol=1e-5, atol=1e-5)
    if need_sum:  # float32 sums of V terms: the error grows with the sum of |z|
        np.testing.assert_allclose(np.asarray(zs), r_zs, rtol=1e-5, atol=2e-4 + 1e-6 * np.abs(z).sum(axis=1).max())


@pytest.mark.parametrize("layout,v", [("vd", 328), ("dv", 336)])
def test_logits_chunk(layout, v):
    _check_logits_chunk(128, 80, v, layout=layout, has_bias=True, softcap=3.0, cfg=CFG)


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(CFG, compute_wgs=1, ctas=3),  # one row block in three splits
    dataclasses.replace(CFG, compute_wgs=1, block_v=64, stages=2),
    dataclasses.replace(CFG, async_wgmma=True, block_d=32, stages=3),
    # Row-split warpgroups (each stores its own rows of a tile); with the overlapped epilogue each tile is stored
    # during the next tile's matmul.
    dataclasses.replace(CFG, block_n=128, block_v=256, wg_split="n", ctas=3),
    dataclasses.replace(CFG, block_n=128, wg_split="n", overlap_epilogue=True, ctas=3),
], ids=["1wg-ctas3", "1wg-bv64-s2", "async-bd32", "split-n", "overlap"])
def test_logits_chunk_configs(cfg):
    _check_logits_chunk(cfg.block_n, 96, 328, cfg=cfg, need_sum=False, dtype=jnp.float16)


def test_logits_chunk_needs_whole_row_blocks():
    p = Problem(n=70, d=80, v=328)
    e, c, _, t = _inputs(70, 80, 328, "vd", jnp.bfloat16, False)
    with pytest.raises(NotImplementedError, match="N % \\(block_n \\* cluster\\)"):
        mlc.logits_chunk_mosaic(e, c, None, t, p=p, cfg=CFG, need_sum=False, interpret=True)
    # With clusters of two CTAs the units of two row blocks must be whole too (no phantom row block's stores).
    p = Problem(n=192, d=80, v=328)
    e, c, _, t = _inputs(192, 80, 328, "vd", jnp.bfloat16, False)
    with pytest.raises(NotImplementedError, match="cluster=2"):
        mlc.logits_chunk_mosaic(e, c, None, t, p=p, cfg=dataclasses.replace(CFG, cluster=2), need_sum=False,
                                interpret=True)


def test_logits_chunk_clusters():
    """Clusters of two CTAs (4 row blocks, 2 units) on 3 clusters: the units split in two, tails on the third."""
    _check_logits_chunk(256, 96, 328, has_bias=True, softcap=3.0, cfg=dataclasses.replace(CFG, cluster=2, ctas=6))


@pytest.mark.parametrize("layout,v", [("vd", 328), ("dv", 336)])
def test_target_gather(layout, v):
    """``target_gather``: the kernel leaves the target logit to XLA's gathered product (ignored and out-of-range
    targets give 0, bias and softcap apply), in the forward with and without the sum and in the logits chunk."""
    cfg = dataclasses.replace(CFG, target_gather=True)
    _run_and_check(70, 96, v, layout=layout, has_bias=True, softcap=5.0, cfg=cfg)
    _run_and_check(70, 96, v, layout=layout, need_sum=False, cfg=cfg)
    _check_logits_chunk(128, 80, v, layout=layout, has_bias=True, softcap=3.0, cfg=cfg)


@pytest.mark.parametrize("layout,bias,cap,extra", [("vd", False, None, {}), ("dv", True, 30.0, {}),
                                                  ("vd", False, None, dict(block_d=32, stages=6, async_wgmma=True))])
def test_logits_chunk_lowers_for_h200(layout, bias, cap, extra):
    cfg = mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=3, compute_wgs=2)
    cfg = dataclasses.replace(cfg, **extra)
    n, d, v = 1024, 2304, 256000
    p = Problem(n=n, d=d, v=v, layout=layout, softcap=cap, has_bias=bias)
    structs = _structs(n, d, v, layout, bias)

    def fn(e, c, b, t):
        return mlc.logits_chunk_mosaic(e, c, b, t, p=p, cfg=cfg, need_sum=True)

    assert "cce_logits_chunk_mosaic" in lower_for_h200(fn, *structs)


@pytest.mark.parametrize("layout,v", [("vd", 1992), ("dv", 2000)])
def test_persistent_schedule_rounds_splits_and_tails(layout, v):
    """Five row blocks of 64 tokens on three CTAs: a round of whole row blocks, then the last two row blocks with
    their final tiles taken by the spare CTA (three segments on one CTA: the targets', bias' and statistics'
    buffers cycle across segments)."""
    from pallas_kernels import mosaic_schedule as ms  # noqa: PLC0415

    cfg = dataclasses.replace(CFG, ctas=3)
    sch = mf.make_schedule(Problem(n=300, d=96, v=v), cfg)
    assert (sch.rounds, sch.rem, sch.splits) == (1, 2, 1) and sch.tail > 0, sch
    assert max(ms.num_segments(sch, p) for p in range(sch.grid)) == 3
    _run_and_check(300, 96, v, layout=layout, has_bias=True, softcap=5.0, cfg=cfg)
    _check_logits_chunk(320, 96, v, layout=layout, has_bias=True, cfg=cfg, need_sum=False)


def test_interpreter_warns_when_the_cpu_pool_is_too_small(monkeypatch):
    """With fewer than 8 threads in XLA's CPU pool the interpreter can deadlock (README, Development): say so."""
    import warnings  # noqa: PLC0415

    monkeypatch.setenv("PJRT_NPROC", "2")
    with pytest.warns(RuntimeWarning, match="PJRT_NPROC=8"):
        mf.interpret_params(True)
    monkeypatch.setenv("PJRT_NPROC", "8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mf.interpret_params(True) is not None
        assert mf.interpret_params(False) is None


def test_block_d_128_two_stages():
    """The default tiles (block_d 128 in a 2-stage ring) with D = 320: two whole slices of D and a ragged one."""
    cfg = mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=2, compute_wgs=2)
    _run_and_check(140, 320, 328, has_bias=True, softcap=5.0, cfg=cfg)
