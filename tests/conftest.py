"""Shared pytest setup: make ``tests/`` importable (``from reference import ...``), give each test its own RNG, and
size XLA's CPU thread pool so that the Mosaic GPU interpreter cannot deadlock."""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest

# The Mosaic GPU interpreter runs each warpgroup of a kernel as its own XLA CPU computation, whose barrier waits
# block a thread of XLA's CPU pool while the kernel's launching callback blocks another. The pool has one thread
# per core (PJRT_NPROC overrides that before the CPU backend starts), so on a 2-core machine a waiting warpgroup
# and the launch can hold both threads while the warpgroup they wait for is queued: the test hangs (seen in CI and
# reproduced with PJRT_NPROC=1). At most seven threads block at once (the launch, and two compute warpgroups and
# the memory warpgroup in each CTA of a cluster of two, which the interpreter runs together; interpreted kernels
# in one program are ordered), so eight threads always leave room.
os.environ["PJRT_NPROC"] = str(max(8, os.cpu_count() or 1, int(os.environ.get("PJRT_NPROC") or 0)))

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A NumPy generator seeded from the test's node id: fresh inputs per test, reproducible run to run and
    independent of test order or xdist worker assignment."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
