"""The Pallas kernels (impl "cce" and presets) in interpret mode against the float64 reference.

Small blocks (16..32) make every problem span several token, vocabulary, hidden and chunk blocks with ragged
edges in each. GPU-only failures are covered by test_kernel_lowering.py (CUDA lowering on the CPU) and
test_gpu_kernels.py (on a GPU).
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cce_jax.cce import KernelConfig
from cce_jax.options import BackwardOptions
from cce_jax.stats import LogitSpec
from pallas_kernels import backward as backward_lib
from pallas_kernels.backward import BackwardConfig
from pallas_kernels.lse_forward import ForwardConfig
from pallas_kernels.tiles import Problem
from tests.reference import Tolerance, check_against_reference, make_inputs

# dense_fraction=1.0 (the default): filtered chunks always go through the block-sparse products (the dense
# fallback has its own test below).
SMALL = KernelConfig(
    forward=ForwardConfig(block_n=16, block_v=32, block_d=16),
    backward=BackwardConfig(block_n=16, block_v=32, block_d=16, block_dout=16, block_vout=16, chunk_v=64),
    dense_fraction=1.0,
)

# (preset, dtype, layout, targets shape, D, V, options): every preset, every option, both layouts, all dtypes.
CASES = [
    ("cce", jnp.float32, "vd", (37,), 41, 101, {}),
    ("cce", jnp.float32, "dv", (3, 11), 33, 97, {"shift": 1, "reduction": "none", "return_lse": True}),
    ("cce", jnp.float32, "vd", (2, 9), 20, 67, {"softcap": 3.0, "bias": True, "weights": True, "reduction": "sum"}),
    ("cce", jnp.float32, "dv", (29,), 17, 131, {"label_smoothing": 0.2, "bias": True, "softcap": 2.0}),
    ("cce", jnp.bfloat16, "vd", (40,), 48, 211, {"bias": True}),
    ("cce", jnp.float16, "dv", (2, 13), 24, 89, {"shift": 2, "weights": True}),
    ("cce_kahan", jnp.bfloat16, "vd", (33,), 40, 97, {"softcap": 4.0, "return_lse": True}),
    ("cce_kahan_full_c", jnp.float32, "vd", (21,), 19, 83, {"reduction": "none", "bias": True}),
    ("cce_kahan_full_e", jnp.float32, "dv", (21,), 19, 83, {"weights": True, "label_smoothing": 0.1}),
    ("cce_exact", jnp.float32, "vd", (1,), 16, 7, {"bias": True}),
    ("cce_kahan_full_c_full_e", jnp.float16, "vd", (2, 8), 35, 61, {"shift": 7, "reduction": "none"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}-{c[2]}-{'-'.join(c[6]) or 'plain'}")
def test_kernels_match_reference(case):
    preset, dtype, layout, shape, d, v, options = case
    options = dict(options)
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    inputs = make_inputs(rng, shape, d, v, dtype, layout=layout, bias=options.pop("bias", False),
                         weights=options.pop("weights", False))
    return_lse = options.pop("return_lse", False)
    if preset != "cce":
        # Presets pick the default block table; pin small blocks through the preset's backward options.
        options.update(_preset_flags(preset))
    check_against_reference(inputs, rng, impl=SMALL, return_lse=return_lse, what=preset, interpret=True,
                            **options)


def _preset_flags(preset):
    from cce_jax.options import KERNEL_PRESETS

    return dict(KERNEL_PRESETS[preset])


@pytest.mark.parametrize("preset", ["cce", "cce_exact"])
def test_presets_by_name_run_default_blocks(preset):
    rng = np.random.default_rng(7)
    inputs = make_inputs(rng, (19,), 24, 53, jnp.float32, bias=True)
    check_against_reference(inputs, rng, impl=preset, what=preset, interpret=True)


def test_all_tokens_ignored_gives_zero_loss_and_gradients():
    rng = np.random.default_rng(3)
    inputs = make_inputs(rng, (2, 9), 20, 37, jnp.bfloat16, bias=True, ignore_frac=1.0)
    result = check_against_reference(inputs, rng, impl=SMALL, interpret=True)
    assert float(result["loss"]) == 0.0
    for g in (result["de"], result["dc"], result["dbias"]):
        assert np.all(np.asarray(g, np.float32) == 0.0)


def test_huge_logits_do_not_overflow():
    rng = np.random.default_rng(4)
    inputs = make_inputs(rng, (23,), 18, 45, jnp.float32, logit_scale=300.0)
    check_against_reference(inputs, rng, impl=SMALL, interpret=True, filter_eps=None,
                            loss_tol=Tolerance(1e-5, 1e-6), grad_tol=Tolerance(1e-4, 1e-5))


def _live_flags(e, c, targets, filter_eps, cfg=SMALL.backward):
    """The per-tile filter flags of the first chunk for a mean loss."""
    from cce_jax import dense

    n, d = e.shape
    v = c.shape[0]
    lse = dense.token_stats(e, c, None, targets, spec=LogitSpec()).lse
    g = jnp.full((n,), 1.0 / n, jnp.float32)
    _, live = backward_lib.logit_grad(
        e, c, None, targets, lse, g, -g, jnp.zeros_like(g), jnp.zeros((1,), jnp.int32),
        p=Problem(n=n, d=d, v=v), cfg=cfg, need_sum=False, filter_eps=filter_eps, interpret=True,
    )
    return np.asarray(live)


def _peaked(rng, n, d, v, dtype):
    """Apple's benchmark recipe: each token's own classifier row equals its hidden state, so one logit per
    row dominates and almost every other tile of the softmax is below eps."""
    e = rng.standard_normal((n, d)) / d**0.25
    c = rng.standard_normal((v, d)) / d**0.25
    c[:n] = e
    targets = np.arange(n, dtype=np.int32)
    return jnp.asarray(e, dtype), jnp.asarray(c, dtype), jnp.asarray(targets)


def test_filtering_skips_tiles_and_stays_within_tolerance():
    from tests.reference import Inputs

    rng = np.random.default_rng(5)
    n, d, v = 48, 512, 193  # the target logit is ~sqrt(D) = 22.6, others ~N(0, 1)
    e, c, targets = _peaked(rng, n, d, v, jnp.bfloat16)
    targets = targets.at[:8].set(40)  # mispredicted tokens keep their tiles live
    live = _live_flags(e, c, targets, filter_eps=2.0**-12)
    assert live.min() == 0 and live.max() == 1, "the peaked case must have both skipped and live tiles"
    inputs = Inputs(e=e, c=c, targets=targets, bias=None, weights=None, layout="vd", ignore_index=-100)
    check_against_reference(inputs, rng, impl=SMALL, interpret=True, what="filtered")


def test_filtering_skips_nothing_when_every_tile_matters():
    rng = np.random.default_rng(6)
    inputs = make_inputs(rng, (40,), 32, 101, jnp.float32, ignore_frac=0.0)
    live = _live_flags(inputs.e, inputs.c, inputs.targets, filter_eps=2.0**-28)
    assert live.min() == 1, "with O(1) logits and fp32 eps no tile may be skipped"
    check_against_reference(inputs, rng, impl=SMALL, interpret=True, what="unfiltered")


def test_large_filter_eps_really_drops_gradient():
    """Filtering must act: with an absurd eps, every tile that holds no target is skipped, so the dC rows of
    those tiles come out exactly zero, unlike the exact gradient."""
    import cce_jax

    rng = np.random.default_rng(8)
    inputs = make_inputs(rng, (16,), 24, 97, jnp.float32, ignore_frac=0.0)
    targets = jnp.asarray(rng.integers(0, 32, size=16), jnp.int32)  # only the first vocabulary tile

    def dc(filter_eps):
        f = lambda c: cce_jax.linear_cross_entropy(  # noqa: E731
            inputs.e, c, targets, impl=SMALL, filter_eps=filter_eps, interpret=True)
        return np.asarray(jax.grad(f)(inputs.c))

    exact, filtered = dc(None), dc(0.99)
    assert np.abs(exact[32:]).min() > 0
    assert np.all(filtered[32:] == 0.0)
    np.testing.assert_allclose(filtered[:32], exact[:32], rtol=1e-5, atol=1e-7)


def test_kernel_config_rejects_bad_blocks():
    with pytest.raises(ValueError, match="block_v"):
        KernelConfig(forward=ForwardConfig(block_v=96))
    with pytest.raises(ValueError, match="chunk_v"):
        KernelConfig(backward=BackwardConfig(block_v=64, block_vout=64, chunk_v=96))
    with pytest.raises(ValueError, match="block_vout"):
        KernelConfig(backward=BackwardConfig(block_v=64, block_vout=128))


def test_backward_options_of_presets():
    from cce_jax.options import backward_options

    exact = backward_options("cce_exact", filter_eps=1e-3, filter_e_grad=True, filter_c_grad=True,
                             accum_e_fp32=False, accum_c_fp32=False)
    assert exact == BackwardOptions(1e-3, False, False, True, True)
    full_c = backward_options("cce_kahan_full_c", filter_eps=1e-3, filter_e_grad=True, filter_c_grad=True,
                              accum_e_fp32=False, accum_c_fp32=False)
    assert full_c.filters_e and not full_c.filters_c and full_c.accum_e_fp32


def test_dense_fallback_reads_only_live_tiles():
    """With dense_fraction=0 every filtered chunk takes XLA's dense products on a buffer whose skipped tiles
    were never written (NaN in the interpreter): they must read as zeros, and the result match the sparse one."""
    import dataclasses

    import cce_jax

    rng = np.random.default_rng(9)
    n, d, v = 48, 512, 193
    e, c, targets = _peaked(rng, n, d, v, jnp.bfloat16)
    targets = targets.at[:8].set(40)
    assert _live_flags(e, c, targets, filter_eps=2.0**-12).min() == 0

    def grads(config):
        f = lambda e, c: cce_jax.linear_cross_entropy(e, c, targets, impl=config, interpret=True)  # noqa: E731
        return jax.grad(f, argnums=(0, 1))(e, c)

    dense = grads(dataclasses.replace(SMALL, dense_fraction=0.0))
    sparse = grads(SMALL)
    for a, b in zip(dense, sparse):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6)


def test_config_table_file_is_read(tmp_path, monkeypatch):
    import dataclasses
    import json

    from cce_jax import cce as cce_lib

    entry = {"device_kind": jax.devices()[0].device_kind, "shape_class": cce_lib.shape_class(24, jnp.float32),
             "config": {"forward": dataclasses.asdict(SMALL.forward), "backward": dataclasses.asdict(SMALL.backward),
                        "dense_fraction": 0.5}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setenv(cce_lib.TUNING_FILE_ENV, str(path))
    assert cce_lib.default_config(24, jnp.float32) == dataclasses.replace(SMALL, dense_fraction=0.5)
    assert cce_lib.default_config(4096, jnp.bfloat16) in set(cce_lib.TUNED.values()) | {cce_lib.DEFAULT}
    # The same file rewritten in place (an autotune run saving its result) is read again.
    entry["config"]["dense_fraction"] = 0.25
    path.write_text(json.dumps({"entries": [entry], "note": "rewritten"}))
    assert cce_lib.default_config(24, jnp.float32) == dataclasses.replace(SMALL, dense_fraction=0.25)


def test_config_round_trips_through_its_dict_form():
    """Every nested config (Triton tiles and both Mosaic GPU configs) survives ``dataclasses.asdict`` and JSON."""
    import dataclasses
    import json

    from cce_jax import cce as cce_lib
    from pallas_kernels.mosaic_forward import MosaicForwardConfig

    cfg = dataclasses.replace(SMALL, chunk_dc="per_chunk", forward_backend="triton",
                              mosaic=MosaicForwardConfig(block_n=64, block_v=256, stages=3, compute_wgs=1),
                              mosaic_chunk=MosaicForwardConfig(block_n=128, block_v=64, stages=2))
    assert cce_lib.config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    # Tables saved before the persistent grid carry the Mosaic configs' vocabulary splits, now chosen per problem.
    old = json.loads(json.dumps(dataclasses.asdict(cfg)))
    old["mosaic"]["v_splits"] = 2
    old["mosaic"].pop("ctas")
    assert cce_lib.config_from_dict(old) == cfg
