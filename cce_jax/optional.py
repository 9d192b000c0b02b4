"""Optional dependencies: a clear ImportError that names the extra to install."""

from __future__ import annotations

import importlib


def require_flax(module: str) -> None:
    """Imports flax, or raises an ``ImportError`` saying that ``module`` needs the ``[flax]`` extra."""
    try:
        importlib.import_module("flax")
    except ModuleNotFoundError as err:
        if (err.name or "flax").split(".")[0] != "flax":
            raise  # flax is installed but one of its own dependencies is missing: show that error as is
        raise ImportError(
            f'{module} needs flax, which is not installed: pip install "cce-jax[flax]" (or pip install flax). '
            "import cce_jax alone (linear_cross_entropy) does not need it."
        ) from err
