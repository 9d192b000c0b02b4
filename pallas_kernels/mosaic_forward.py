"""Log-sum-exp forward on Pallas' Mosaic GPU backend (Hopper, sm_90): the launch and the merge.

Per token ``(lse, target_logit, sum_logits)`` of ``z = softcap(e @ c^T + bias)``, all float32 (N,), in one pass
over the vocabulary, never storing a logit. Same contract as :func:`pallas_kernels.lse_forward.lse_forward`.

:func:`lse_forward_mosaic` pads e to whole 8-row groups, builds the persistent grid's schedule
(:mod:`pallas_kernels.mosaic_schedule`), runs the kernel (:func:`pallas_kernels.mosaic_kernel.forward_kernel`,
whose module docstring gives the grid, the block layout, the pipeline, the epilogue variants, the edges and the
shape rules) and merges its per-segment partial outputs in XLA, taking the target logits from a gathered product
when the config leaves them out of the kernel. :func:`run_kernel` is shared with the three-pass path's logits
chunk (:mod:`pallas_kernels.mosaic_logits_chunk`). The config, the shape rules, the online softmax and the
interpreter plumbing live in :mod:`pallas_kernels.mosaic_config`, :mod:`pallas_kernels.online_softmax` and
:mod:`pallas_kernels.mosaic_common`; their names are re-exported here, the kernel's public face.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_schedule as schedule
from pallas_kernels.mosaic_common import (  # noqa: F401
    INTERPRETER_THREADS, cpu_pool_threads, interpret_params, run_scoped)
from pallas_kernels.mosaic_config import (  # noqa: F401
    OVERLAP_TILE, SMEM_BYTES, MosaicForwardConfig, cdiv, check_supported, pick_swizzle, register_split,
    smem_bytes, smem_transforms, supports, widest_swizzle)
from pallas_kernels.mosaic_kernel import EXP_SLICE, forward_kernel  # noqa: F401
from pallas_kernels.online_softmax import (  # noqa: F401
    LOG2E, exp_sum, finish_lse, merge_stats, online_rescale, online_update, softcap)
from pallas_kernels.tiles import Problem


DEBUG_MODES = (None, "row_max", "matmul_only")
H200_SMS = 132
# Temporary memory of the partial outputs that XLA merges (per output; at least two slots per row block).
MERGE_BYTES = 2**20


def device_sms() -> int:
    """CTAs of one wave: the GPU's SMs (one CTA each: the kernel's shared memory), or an H200's 132 without a
    GPU (lowering for an abstract H200, the interpreter)."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or H200_SMS) if dev.platform == "gpu" else H200_SMS


def make_schedule(p: Problem, cfg: MosaicForwardConfig) -> schedule.Schedule:
    """The persistent grid's work assignment (:mod:`pallas_kernels.mosaic_schedule`) for this problem: its rows
    are the clusters' units of ``cfg.cluster`` row blocks, its CTAs the clusters."""
    units = cdiv(p.n, unit_rows(cfg))
    max_slots = max(2, MERGE_BYTES // (units * unit_rows(cfg) * 4))
    return schedule.make(units, cdiv(p.v, cfg.tile_v), (cfg.ctas or device_sms()) // cfg.cluster, max_slots)


def unit_rows(cfg: MosaicForwardConfig) -> int:
    """Tokens of one schedule unit: the row blocks of one cluster."""
    return cfg.block_n * cfg.cluster


def run_kernel(e, c, bias, targets, *, p: Problem, cfg: MosaicForwardConfig, need_sum: bool, interpret, debug,
               store: bool):
    """The kernel's outputs: ``(schedule, lse, zt, zs)`` with (slots, N_pad) partials (``zt`` None with
    ``cfg.target_gather``, ``zs`` None unless ``need_sum``), plus with ``store`` the logits buffer
    (N, cdiv(V, W) * W) and the transposed tile maxima (cdiv(V, W) * compute_wgs, N)."""
    check_supported(e, c, p, cfg, store)
    if debug not in DEBUG_MODES:
        raise ValueError(f"debug={debug!r} must be one of {DEBUG_MODES}")
    if (bias is not None) != p.has_bias:
        raise ValueError("bias must be given exactly when p.has_bias")
    targets = targets.astype(jnp.int32)
    if p.n % 8:
        # TMA copies of e are tiled in 8-row groups over the whole array: pad e (only e, never c) to 8k rows.
        e = jnp.pad(e, ((0, 8 - p.n % 8), (0, 0)))
    sch = make_schedule(p, cfg)
    kernel = functools.partial(forward_kernel, p=p, cfg=cfg, sch=sch, need_sum=need_sum, store=store, dtype=e.dtype,
                               bias_dtype=None if bias is None else bias.dtype, debug=debug)
    need_target = not cfg.target_gather
    args = (e, c) + ((bias,) if p.has_bias else ()) + ((targets,) if need_target else ())
    # Whole row blocks only: a store into an (N,) array would be a bulk copy clamped to 4 * (N % block_n) bytes
    # for the last block, undefined unless a multiple of 16 (mosaic_kernel, "Output stores").
    out = jax.ShapeDtypeStruct((sch.slots, sch.row_blocks * unit_rows(cfg)), jnp.float32)
    out_type = [out] * (1 + need_target + need_sum)
    if store:
        out_type += [jax.ShapeDtypeStruct((p.n, sch.tiles * cfg.tile_v), e.dtype),
                     jax.ShapeDtypeStruct((sch.tiles * cfg.c_copies, p.n), jnp.float32)]
    f = plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        grid=(sch.grid,),
        grid_names=("cta",),
        **(dict(cluster=(cfg.cluster,), cluster_names=("cluster",)) if cfg.cluster > 1 else {}),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=cfg.approx_math),
        interpret=interpret_params(interpret, 1 + cfg.cluster * (cfg.compute_wgs + 1)),
        kernel_name="cce_logits_chunk_mosaic" if store else "cce_lse_forward_mosaic",
    )
    outs = list(f(*args))
    if not need_target:
        outs.insert(1, None)
    if not need_sum:
        outs.insert(2, None)
    return (sch, *outs)


def gathered_target_logits(e: jax.Array, c: jax.Array, bias: jax.Array | None, targets: jax.Array,
                           p: Problem) -> jax.Array:
    """(N,) float32 ``softcap(e[i] . c[t[i]] + bias[t[i]])``, 0 where the target is outside [0, V): the target
    logits from N gathered classifier rows (``cfg.target_gather``), products accumulated in float32."""
    ok = (targets >= 0) & (targets < p.v)
    t = jnp.where(ok, targets, 0)
    rows = jnp.take(c, t, axis=0 if p.layout == "vd" else 1)
    if p.layout == "dv":
        rows = rows.T
    z = jnp.einsum("nd,nd->n", e, rows, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias[t].astype(jnp.float32)
    return jnp.where(ok, softcap(z, p.softcap), 0.0)


def merge_outputs(sch: schedule.Schedule, lse, zt, zs, p: Problem, cfg: MosaicForwardConfig, operands,
                  debug=None):
    """(N,) ``(lse, target_logit, sum_logits)`` from the kernel's partials (``sum_logits`` zeros when None; the
    target logits from ``operands = (e, c, bias, targets)`` when the kernel left them out)."""
    lse, zt, zs = schedule.merge(sch, unit_rows(cfg), p.n, lse, zt, zs,
                                 row_max=debug in ("row_max", "matmul_only"))
    if zt is None:
        zt = gathered_target_logits(*operands, p)
    return lse, zt, jnp.zeros_like(lse) if zs is None else zs


@functools.partial(jax.jit, static_argnames=("p", "cfg", "need_sum", "interpret", "debug"))
def lse_forward_mosaic(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    p: Problem,
    cfg: MosaicForwardConfig,
    need_sum: bool,
    interpret=False,
    debug: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``(lse, target_logit, sum_logits)`` of ``softcap(e @ c^T + bias)``, all float32 (N,).

    ``e`` is (N, D), ``c`` (V, D) for ``p.layout == "vd"`` or (D, V) for ``"dv"``, bf16 or fp16 (one dtype);
    ``bias`` (V,) any float dtype or None (must match ``p.has_bias``); ``targets`` (N,) int32 local column ids,
    ``-1`` (or any id outside [0, V)) gives a target logit of 0. ``sum_logits`` is zeros unless ``need_sum``.
    ``interpret``: False (compiled, Hopper GPU), True (Mosaic GPU interpreter with default parameters) or a
    ``plgpu.InterpretGPUParams``. ``debug``: None (normal), ``"row_max"`` (first output is the row max of the
    logits instead of the lse) or ``"matmul_only"`` (the row max with the rest of the epilogue left out). See the
    docstring of :mod:`pallas_kernels.mosaic_kernel` for the grid, the block layout and the limits.
    """
    sch, lse, zt, zs = run_kernel(e, c, bias, targets, p=p, cfg=cfg, need_sum=need_sum, interpret=interpret,
                                  debug=debug, store=False)
    return merge_outputs(sch, lse, zt, zs, p, cfg, (e, c, bias, targets), debug)
