"""Pallas GPU kernels (Triton lowering) of the linear cross-entropy: plain functions of arrays and static configs.

- :mod:`pallas_kernels.lse_forward`: blockwise log-sum-exp forward (lse, target logit, sum of logits per token).
- :mod:`pallas_kernels.backward`: the logit gradient of a vocabulary chunk with per-tile filter flags, and the
  block-sparse dE / dC products that visit only live tiles.
- :mod:`pallas_kernels.tiles`: the tile math both share (masked loads, the logits tile, softcap).
- :mod:`pallas_kernels.lowering`: lowering for CUDA without a GPU (for CI).

Every kernel also runs with ``interpret=True`` on a CPU. The loss semantics live in :mod:`cce_jax`.
"""
