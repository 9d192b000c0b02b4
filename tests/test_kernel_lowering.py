"""Every kernel lowered for CUDA (an abstract H200) on the CPU, with the MLIR verifier on each Triton module.

The interpreter accepts things the GPU rejects (non-power-of-two tiles, full-array reductions in one step,
partial masks); lowering catches them here, without a GPU.
"""

import jax
import jax.numpy as jnp
import pytest

import cce_jax
from cce_jax import cce as cce_lib
from pallas_kernels.lowering import lower_for_cuda

S = jax.ShapeDtypeStruct
KERNEL_NAMES = ("cce_lse_forward", "cce_logit_grad", "cce_accumulate_de", "cce_write_dc")


def _lower(n, d, v, dtype, *, impl="cce", layout="vd", bias=False, **options):
    c_shape = (v, d) if layout == "vd" else (d, v)

    def f(e, c, b, t):
        def loss(e, c, b):
            return cce_jax.linear_cross_entropy(e, c, t, b, impl=impl, interpret=False, classifier_layout=layout,
                                                **options)
        return jax.value_and_grad(loss, argnums=(0, 1, 2) if bias else (0, 1))(e, c, b)

    return lower_for_cuda(f, S((n, d), dtype), S(c_shape, dtype), S((v,), dtype) if bias else None,
                          S((n,), jnp.int32))


@pytest.mark.parametrize(
    "n,d,v,dtype,impl,layout,bias,options",
    [
        (8192, 2304, 256000, jnp.bfloat16, "cce", "vd", False, {}),
        (8192, 4096, 128256, jnp.bfloat16, "cce_exact", "vd", False, {}),
        (1030, 1000, 50257, jnp.bfloat16, "cce_kahan_full_c", "dv", True, {"softcap": 30.0}),
        (37, 41, 101, jnp.float32, "cce", "dv", True, {"softcap": 2.0, "label_smoothing": 0.1}),
        (1, 16, 7, jnp.float16, "cce_kahan_full_e", "vd", True, {}),
    ],
)
def test_kernels_lower_for_cuda(n, d, v, dtype, impl, layout, bias, options):
    text = _lower(n, d, v, dtype, impl=impl, layout=layout, bias=bias, grad_path="recompute", **options)
    for name in ("cce_lse_forward", "cce_logit_grad"):
        assert name in text, f"{name} missing from the lowered module"
    # The three-pass path runs its chunk logits kernel, the block-sparse product of each side that may filter
    # (none with label smoothing, whose gradient is dense), and no forward or recompute kernel.
    text = _lower(n, d, v, dtype, impl=impl, layout=layout, bias=bias, grad_path="three_pass", **options)
    backward = cce_lib.options_lib.backward_options(impl, filter_eps=1.0, filter_e_grad=True, filter_c_grad=True,
                                                    accum_e_fp32=False, accum_c_fp32=False)
    smooth = options.get("label_smoothing", 0) > 0
    expected = {"cce_accumulate_de": backward.filters_e and not smooth,
                "cce_write_dc": backward.filters_c and not smooth,
                "cce_logits_chunk": True, "cce_chunk_grad": True, "cce_lse_forward": False,
                "cce_logit_grad": False}
    for name, present in expected.items():
        assert (name in text) == present, f"{name} {'missing from' if present else 'unexpected in'} the module"


def test_forward_lowers_for_cuda():
    def f(e, c, t):
        return cce_jax.linear_cross_entropy(e, c, t, impl="cce", interpret=False, softcap=30.0)

    text = lower_for_cuda(f, S((1030, 1000), jnp.bfloat16), S((50257, 1000), jnp.bfloat16), S((1030,), jnp.int32))
    assert "cce_lse_forward" in text and "cce_logit_grad" not in text


def test_filtered_products_lower_for_cuda():
    text = _lower(300, 200, 1000, jnp.bfloat16, impl="cce", grad_path="recompute")
    for name in KERNEL_NAMES:
        assert name in text


@pytest.mark.parametrize("config", sorted(set(cce_lib.TUNED.values()) | {cce_lib.DEFAULT}, key=repr), ids=repr)
def test_tuned_table_configs_lower_for_cuda(config):
    text = _lower(4096, 2304, 32000, jnp.bfloat16, impl=config, grad_path="recompute")
    for name in KERNEL_NAMES:
        assert name in text
    text = _lower(4096, 2304, 32000, jnp.bfloat16, impl=config, grad_path="three_pass")
    for name in ("cce_logits_chunk", "cce_chunk_grad", "cce_accumulate_de", "cce_write_dc"):
        assert name in text


@pytest.mark.parametrize("layout,bias,chunk_dc", [("vd", False, "sampled"), ("dv", True, "per_chunk")])
def test_three_pass_with_the_mosaic_logits_lowers_for_cuda(layout, bias, chunk_dc):
    """``forward_backend="mosaic"``: the three-pass path's logits chunk is the Mosaic GPU kernel (whole row
    blocks: the plan aligns chunks to its block_n), followed by the in-place gradient and the products."""
    import dataclasses

    config = dataclasses.replace(cce_lib.TUNED[("H200", "half-d<=3072")], forward_backend="mosaic",
                                 chunk_dc=chunk_dc)
    text = _lower(8192, 2304, 256000, jnp.bfloat16, impl=config, layout=layout, bias=bias,
                  grad_path="three_pass", softcap=30.0)
    for name in ("cce_logits_chunk_mosaic", "cce_chunk_grad", "cce_accumulate_de", "cce_write_dc"):
        assert name in text, name
    assert "cce_logits_chunk\"" not in text and 'name = "cce_logits_chunk"' not in text


@pytest.mark.parametrize("grad_path", ["recompute", "three_pass"])
def test_kernels_lower_inside_shard_map_with_check_vma(grad_path):
    """The kernels' outputs declare the manual axes they vary over, so value_and_grad inside
    ``shard_map(check_vma=True)`` type-checks and lowers for CUDA (without it, lowering raises)."""
    from functools import partial

    from jax.sharding import PartitionSpec as P

    def f(e, c, t):
        @partial(jax.shard_map, in_specs=(P(), P(), P()), out_specs=P())
        def sharded(e, c, t):
            e = jax.lax.pcast(e, "x", to="varying")  # this device's tokens
            loss = cce_jax.linear_cross_entropy(e, c, t, impl="cce", interpret=False, reduction="sum",
                                                grad_path=grad_path)
            return jax.lax.psum(loss, "x")

        return jax.value_and_grad(lambda e, c: sharded(e, c, t), argnums=(0, 1))(e, c)

    text = lower_for_cuda(f, S((64, 48), jnp.bfloat16), S((301, 48), jnp.bfloat16), S((64,), jnp.int32))
    names = KERNEL_NAMES if grad_path == "recompute" else ("cce_logits_chunk", "cce_accumulate_de", "cce_write_dc")
    for name in names:
        assert name in text
