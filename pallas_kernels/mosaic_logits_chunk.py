"""The three-pass path's logits chunk on Pallas' Mosaic GPU backend (Hopper, sm_90).

The kernel is the forward's (:mod:`pallas_kernels.mosaic_kernel`: same grid, block layout, pipeline and shape
rules), run with its tile stores on: every compute warpgroup also writes each ``(block_n, block_v)`` logits tile
relative to its row maxima, in the input's precision, through an SMEM buffer and a TMA copy that overlaps the next
tile's matmul, and the maxima through a second one (as a (T, N) array: one contiguous row per tile, transposed by
XLA). Before it overwrites its buffers a warpgroup waits for its previous copies to have read them. The
persistent grid's schedule fills one wave however few row blocks a chunk has. The contract is
:func:`pallas_kernels.logits_chunk.logits_chunk`'s, so the three-pass path uses either kernel.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.mosaic_forward import MosaicForwardConfig, merge_outputs, run_kernel
from pallas_kernels.tiles import Problem


@functools.partial(jax.jit, static_argnames=("p", "cfg", "need_sum", "interpret"))
def logits_chunk_mosaic(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    p: Problem,
    cfg: MosaicForwardConfig,
    need_sum: bool,
    interpret=False,
):
    """The contract of :func:`pallas_kernels.logits_chunk.logits_chunk` on the Mosaic GPU kernel: ``(z_rel, m,
    lse, target_logit, sum_logits)`` with ``z_rel`` (N, T * block_v) in e's dtype, each ``block_v``-column
    tile stored relative to its row maxima ``m`` (N, T) float32, T = cdiv(V, tile_v) * c_copies; columns
    past V hold -inf. Needs N % block_n == 0 (the three-pass plan aligns its chunks). Every compute
    warpgroup writes each tile through SMEM with TMA while the next tile's operands stream in.
    """
    sch, lse, zt, zs, z_rel, m_t = run_kernel(e, c, bias, targets, p=p, cfg=cfg, need_sum=need_sum,
                                              interpret=interpret, debug=None, store=True)
    lse, zt, zs = merge_outputs(sch, lse, zt, zs, p, cfg, (e, c, bias, targets))
    return z_rel, m_t.T, lse, zt, zs
