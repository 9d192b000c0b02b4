"""Pallas GPU kernels of the linear cross-entropy (Triton lowering; Mosaic GPU on Hopper): plain functions of
arrays and static configs.

- :mod:`pallas_kernels.lse_forward`: blockwise log-sum-exp forward (lse, target logit, sum of logits per token).
- :mod:`pallas_kernels.backward`: the logit gradient of a vocabulary chunk with per-tile filter flags, and the
  block-sparse dE / dC products that visit only live tiles.
- :mod:`pallas_kernels.logits_chunk` and :mod:`pallas_kernels.chunk_grad`: the three-pass path's logits of a token
  chunk and the logit gradient formed in place over them.
- On Pallas' Mosaic GPU backend (Hopper): :mod:`pallas_kernels.mosaic_forward` (the forward, whose kernel body is
  :mod:`pallas_kernels.mosaic_kernel`),
  :mod:`pallas_kernels.mosaic_logits_chunk` (the three-pass logits chunk) and
  :mod:`pallas_kernels.mosaic_sparse_de` (the three-pass block-sparse dE product).
- :mod:`pallas_kernels.tiles`: the tile math both share (masked loads, the logits tile, softcap).
- :mod:`pallas_kernels.lowering`: lowering for CUDA without a GPU (for CI).

Every kernel also runs with ``interpret=True`` on a CPU. The loss semantics live in :mod:`cce_jax`.
"""
