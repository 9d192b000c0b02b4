"""Shared pytest setup: make ``tests/`` importable (``from reference import ...``) and give each test its own RNG."""

from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A NumPy generator seeded from the test's node id: fresh inputs per test, reproducible run to run and
    independent of test order or xdist worker assignment."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
