"""Writes a tuning table that makes the library run a variant of its built-in block configs on this GPU.

    python3 benchmarks/variant_table.py /tmp/cl2.json mosaic.cluster=2 mosaic_chunk.stages=4
    python3 benchmarks/variant_table.py /tmp/best.json --best-of mosaic.json [more overrides]
    CCE_JAX_TUNING_FILE=/tmp/cl2.json python -m cce_jax.benchmark ...

Each ``FIELD.ATTR=VALUE`` override (VALUE a Python literal) replaces one attribute of one nested config of
:class:`cce_jax.cce.KernelConfig` in the entry of every half-precision shape class for the local device kind, so
the benchmark (which has no config flags: it measures what users get) times the variant through the same code
path as the default, in a separate run. ``--best-of MOSAIC_JSON`` takes the ``mosaic`` overrides from a
``benchmarks/mosaic_gpu_check.py --json`` run: every field of the Mosaic forward config whose median time summed
over the run's shapes was lowest (debug-mode entries excluded), so one device call can time the kernels alone and
then the winner through the library.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cce_jax.autotune import save_entry  # noqa: E402
from cce_jax.cce import default_config, shape_class  # noqa: E402

NESTED = ("forward", "backward", "mosaic", "mosaic_chunk", "mosaic_sparse_de")
# One hidden size per half-precision shape class of cce_jax.cce.shape_class.
CLASS_DS = (1024, 3072, 4096)


def override(config, assignments: list[str]):
    """``config`` with each ``FIELD.ATTR=VALUE`` applied (a ValueError names a malformed one)."""
    for text in assignments:
        target, sep, value = text.partition("=")
        field, dot, attr = target.partition(".")
        if not sep or not dot or field not in NESTED:
            raise ValueError(f"override {text!r} must read FIELD.ATTR=VALUE with FIELD one of {NESTED}")
        inner = dataclasses.replace(getattr(config, field), **{attr: ast.literal_eval(value)})
        config = dataclasses.replace(config, **{field: inner})
    return config


def best_of(check_json: str) -> tuple[str, list[str]]:
    """The fastest Mosaic forward config of a mosaic_gpu_check timing run (summed over its shapes, configs timed
    at every shape only) and its fields as ``mosaic.ATTR=VALUE`` overrides."""
    run = json.loads(Path(check_json).read_text())
    shapes = {r["shape"] for r in run["timing"]}
    times: dict[str, dict[str, float]] = {}
    for r in run["timing"]:
        name = r["impl"].removeprefix("mosaic ")
        if r["impl"].startswith("mosaic ") and name in run["configs"] and "ms" in r:
            times.setdefault(name, {})[r["shape"]] = r["ms"]
    totals = {name: sum(t.values()) for name, t in times.items() if set(t) == shapes}
    if not totals:
        raise ValueError(f"{check_json} has no Mosaic config timed at every shape")
    best = min(totals, key=totals.get)
    return best, [f"mosaic.{k}={v!r}" for k, v in run["configs"][best].items()]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path, assignments = argv[0], argv[1:]
    if assignments[0] == "--best-of":
        if len(assignments) < 2:
            print(__doc__, file=sys.stderr)
            return 2
        name, best = best_of(assignments[1])
        print(f"fastest Mosaic forward config of {assignments[1]}: {name}")
        assignments = best + assignments[2:]
    kind = jax.devices()[0].device_kind
    for d in CLASS_DS:
        config = override(default_config(d, jnp.bfloat16), assignments)
        blocks = {name: dataclasses.asdict(getattr(config, name)) for name in NESTED}
        save_entry(path, {"device_kind": kind, "shape_class": shape_class(d, jnp.bfloat16), "config": blocks})
        print(f"{kind} {shape_class(d, jnp.bfloat16)}: {' '.join(assignments)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
