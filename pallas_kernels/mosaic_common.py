"""Plumbing shared by the Mosaic GPU kernels: scoped scratch allocation and the interpreter's parameters."""

from __future__ import annotations

import os
import warnings

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def run_scoped(body, scratch: dict):
    """``pl.run_scoped`` over the scratch dict (collective over the warpgroups), passing None for the entries a
    problem does not need."""
    names = list(scratch)
    present = {k: v for k, v in scratch.items() if v is not None}

    def inner(**refs):
        body(*(refs.get(k) for k in names))

    pl.run_scoped(inner, **present, collective_axes="wg")


# Threads of XLA's CPU pool the Mosaic GPU interpreter needs: the launch, and the two compute warpgroups and the
# memory warpgroup of each CTA in a cluster of two (run together) can each block one while they wait on a barrier.
INTERPRETER_THREADS = 8


def cpu_pool_threads() -> int:
    """Threads of XLA's CPU pool: ``PJRT_NPROC`` when set, else one per core."""
    try:
        return int(os.environ["PJRT_NPROC"])
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def interpret_params(interpret, needed: int = INTERPRETER_THREADS):
    """``plgpu.kernel``'s ``interpret`` argument from ours: True (the interpreter's defaults), False / None
    (compiled) or the interpreter's parameters as given. Warns when XLA's CPU pool has fewer than ``needed``
    threads (at least :data:`INTERPRETER_THREADS`), as the interpreter can then deadlock (README, Development)."""
    if interpret is False or interpret is None:
        return None
    threads, needed = cpu_pool_threads(), max(needed, INTERPRETER_THREADS)
    if threads < needed:
        warnings.warn(
            f"the Mosaic GPU interpreter can deadlock with {threads} threads in XLA's CPU pool: set "
            f"PJRT_NPROC={needed} (or more) in the environment before JAX starts", RuntimeWarning,
            stacklevel=3)
    return plgpu.InterpretGPUParams() if interpret is True else interpret
