"""Lower kernels for CUDA on a machine without a GPU, running Triton lowering and the MLIR verifier.

GPU-only errors (non-power-of-two tiles, unsupported ops, malformed masks) then fail on any CI machine.
Uses private jax APIs, which is why jax is pinned for tests.
"""

from __future__ import annotations

import warnings

import jax
from jax._src.pallas.triton import lowering as _triton_lowering
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh


def _lower_and_verify(*args, **kwargs):
    result = _ORIGINAL(*args, **kwargs)
    result.module.operation.verify()
    return result


_ORIGINAL = _triton_lowering.lower_jaxpr_to_triton_module


def lower_for_cuda(fn, *shape_dtype_structs, device_kind: str = "NVIDIA H200", num_cores: int = 132) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for CUDA; every Triton module in it is verified."""
    _triton_lowering.lower_jaxpr_to_triton_module = _lower_and_verify
    device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    try:
        with use_abstract_mesh(mesh), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return jax.jit(fn).trace(*shape_dtype_structs).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        _triton_lowering.lower_jaxpr_to_triton_module = _ORIGINAL
