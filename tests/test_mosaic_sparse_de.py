"""The Mosaic GPU block-sparse dE product (pallas_kernels.mosaic_sparse_de) on a CPU: the Mosaic GPU interpreter
against float64 NumPy over the live tiles, lowering for an abstract H200, and the three-pass path running it.

What neither can show (wgmma/TMA timing, races the interpreter serialises): tests/test_gpu_kernels.py and
benchmarks/mosaic_sparse_de_check.py on a GPU.

The interpreter's warpgroups block threads of XLA's CPU pool; tests/conftest.py sizes that pool so that they
cannot deadlock, which lets these tests interpret the two-compute-warpgroup default.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from cce_jax import KernelConfig
from pallas_kernels import backward as triton_bw
from pallas_kernels import mosaic_sparse_de as msd
from pallas_kernels.backward import BackwardConfig
from pallas_kernels.lse_forward import ForwardConfig
from reference import make_inputs, run_loss_vjp

TILE_V = 128
CFG = msd.MosaicSparseDeConfig(block_n=64, block_k=64, block_out=64, stages=3, compute_wgs=2)


def _case(rng, r, v, d, layout, frac, tile_v=TILE_V, block_n=64):
    t = -(-v // tile_v)
    g = rng.standard_normal((r, t * tile_v))
    g[:, v:] = 0.0  # the three-pass buffer holds zeros past V
    live = (rng.random((r // block_n, t)) < frac).astype(np.int32)
    live[1] = 0  # a row block with no live tile: its rows come out exactly 0
    c = rng.standard_normal((v, d)) / np.sqrt(d)
    g, c = jnp.asarray(g, jnp.bfloat16), jnp.asarray(c, jnp.bfloat16)
    mask = np.repeat(np.repeat(live, block_n, 0), tile_v, 1)
    ref = (np.asarray(g.astype(jnp.float32), np.float64) * mask)[:, :v] @ np.asarray(c.astype(jnp.float32),
                                                                                       np.float64)
    return g, (c if layout == "vd" else c.T), jnp.asarray(live), ref


# R = 192: three row blocks; V ragged against the 128-column tile (and % 16 for "dv"); D ragged against the
# CTA's output columns (2 x 64 or 1 x 128), so the last CTA writes past D (clipped).
@pytest.mark.parametrize("layout,v", [("vd", 328), ("dv", 336)])
@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, compute_wgs=1, block_out=128, stages=2),
                                 dataclasses.replace(CFG, block_k=32, stages=4)], ids=["2wg", "1wg-s2", "bk32"])
def test_matches_float64_over_live_tiles(rng, layout, v, cfg):
    g, c, live, ref = _case(rng, 192, v, 208, layout, 0.5)
    out = msd.sparse_de_mosaic(g, msd.live_lists(live), c, layout=layout, tile_v=TILE_V, cfg=cfg, interpret=True)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    # bf16 products are exact in float32 and accumulate in float32: agreement to float32 rounding.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(np.asarray(out)[64:128], 0.0)


def test_agrees_with_triton_kernel_and_repeats_bit_identical(rng):
    g, c, live, _ = _case(rng, 128, 520, 256, "vd", 0.3)
    lists = msd.live_lists(live)
    a = msd.sparse_de_mosaic(g, lists, c, layout="vd", tile_v=TILE_V, cfg=CFG, interpret=True)
    b = msd.sparse_de_mosaic(g, lists, c, layout="vd", tile_v=TILE_V, cfg=CFG, interpret=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cols, count, _, _ = triton_bw.live_lists(live)
    from pallas_kernels.tiles import Problem  # noqa: PLC0415

    t = triton_bw.accumulate_de(g, cols, count, c, jnp.zeros((1,), jnp.int32), jnp.zeros((128, 256), jnp.float32),
                                p=Problem(n=128, d=256, v=520), cfg=BackwardConfig(chunk_v=g.shape[1]),
                                interpret=True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(t), rtol=1e-5, atol=1e-6 * np.abs(np.asarray(t)).max())


def test_live_lists():
    live = jnp.asarray([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    lists = np.asarray(msd.live_lists(live))
    assert lists.shape == (3, msd.list_width(5)) and lists.shape[1] % msd.LIST_ALIGN == 0
    assert list(lists[0, :4]) == [3, 1, 3, 4]
    assert lists[1, 0] == 0
    assert list(lists[2, :6]) == [5, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=jnp.float32), "bf16/fp16"),
    (dict(r=100), "whole row blocks"),
    (dict(d=200), "multiples of 16"),
    (dict(v=330), "V % 8"),
    (dict(d=48), "smaller than one tile"),
])
def test_unsupported_raise(kwargs, match):
    r, v, d, dtype = kwargs.get("r", 128), kwargs.get("v", 328), kwargs.get("d", 208), kwargs.get("dtype",
                                                                                                 jnp.bfloat16)
    t = -(-v // TILE_V)
    g = jnp.zeros((r, t * TILE_V), dtype)
    c = jnp.zeros((v, d), dtype)
    lists = jnp.zeros((-(-r // 64), msd.list_width(t)), jnp.int32)
    assert not msd.supports(g, c, lists, "vd", TILE_V, CFG)
    with pytest.raises(NotImplementedError, match=match):
        msd.check_supported(g, c, lists, "vd", TILE_V, CFG)


def test_config_validation():
    for bad in (dict(block_n=32), dict(block_k=24), dict(block_out=320), dict(stages=1), dict(compute_wgs=3)):
        with pytest.raises(ValueError):
            msd.MosaicSparseDeConfig(**bad)
    with pytest.raises(ValueError, match="sparse_de_backend"):
        KernelConfig(sparse_de_backend="cuda")


@pytest.mark.parametrize("layout,r,v,d", [("vd", 1024, 256000, 2304), ("dv", 1664, 128256, 4096),
                                          ("vd", 192, 50264, 1008)])
def test_lowers_for_h200(layout, r, v, d):
    S = jax.ShapeDtypeStruct
    t = -(-v // TILE_V)
    cfg = msd.MosaicSparseDeConfig()
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    structs = (S((r, t * TILE_V), jnp.bfloat16), S((r // 64, msd.list_width(t)), jnp.int32),
               S((v, d) if layout == "vd" else (d, v), jnp.bfloat16))
    fn = lambda g, lists, c: msd.sparse_de_mosaic(g, lists, c, layout=layout, tile_v=TILE_V, cfg=cfg)  # noqa: E731
    with use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# The three-pass path with the Mosaic sparse dE product forced (interpreted), against the same path with the Triton
# product: the same live tiles, so dE agrees to float32 rounding before its bf16 rounding (at most one bf16 ulp).
_SPARSE = KernelConfig(
    forward=ForwardConfig(block_n=64, block_v=64, block_d=32),
    backward=BackwardConfig(block_n=64, block_v=64, block_d=32, block_dout=64),
    chunk_tokens=64, chunk_dense_fraction=1.0, chunk_dc="sparse",
    mosaic_sparse_de=msd.MosaicSparseDeConfig(block_n=64, block_k=32, block_out=64, stages=2, compute_wgs=1),
)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_three_pass_runs_the_mosaic_product(rng, layout, monkeypatch):
    calls = []
    original = msd.sparse_de_mosaic

    def counting(*args, **kwargs):
        calls.append(kwargs["layout"])
        return original(*args, **kwargs)

    monkeypatch.setattr(msd, "sparse_de_mosaic", counting)
    inputs = make_inputs(rng, (2, 70), 80, 336, jnp.bfloat16, bias=True, weights=True, layout=layout,
                         logit_scale=4.0)
    shape = inputs.targets.shape
    g_lse = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape)  # per-token cotangents on the lse
    opts = dict(reduction="mean", z_loss=0.05, filter_eps=1e-2, grad_path="three_pass")
    got = run_loss_vjp(inputs, -0.37, g_lse, impl=dataclasses.replace(_SPARSE, sparse_de_backend="mosaic"),
                       interpret=True, **opts)
    assert calls, "the Mosaic product was not used"
    want = run_loss_vjp(inputs, -0.37, g_lse, impl=dataclasses.replace(_SPARSE, sparse_de_backend="triton"),
                        interpret=True, **opts)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    de, de_t = (np.asarray(x.astype(jnp.float32)) for x in (got[2][0], want[2][0]))
    ulp = np.abs(de_t) * 2.0**-7 + 1e-30
    assert (np.abs(de - de_t) <= ulp).all(), np.abs(de - de_t).max()
    assert np.abs(de - de_t).max() < np.abs(de_t).max()  # and not all-zero agreement
    assert np.abs(de_t).max() > 0
    for a, b in zip(got[2][1:], want[2][1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # dC and dbias: the same Triton kernels
