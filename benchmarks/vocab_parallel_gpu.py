"""Vocabulary-parallel loss on every local device: correctness against one device, then timing per step.

    python benchmarks/vocab_parallel_gpu.py --json out.json    # on a machine with 2+ GPUs

1. Correctness: ``sharded_linear_cross_entropy`` with the classifier split over all devices (V = 50257 padded
   to a multiple of the device count, so the split is uneven in live rows) against the single-device result of
   the same implementation, for impl "xla" and "cce" (float32 inputs, so differences are reduction order only).
2. Timing: value_and_grad w.r.t. (e, c) at the gemma2 and llama3 shapes (bf16, flat logits), sharded over the
   vocabulary vs. on one device: median ms per step and per-device peak memory (``memory_stats``).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import cce_jax
from cce_jax.autotune import median_ms

SHAPES = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}


def _step(mesh, impl, vocab_size):
    def loss(e, c, t):
        if mesh is None:
            return cce_jax.linear_cross_entropy(e, c[:vocab_size], t, impl=impl)
        return cce_jax.sharded_linear_cross_entropy(e, c, t, mesh=mesh, vocab_axis="vocab", vocab_size=vocab_size,
                                                    impl=impl)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def correctness(mesh, n_dev, log):
    n, d, v = 1024, 512, 50257
    v_pad = -(-v // n_dev) * n_dev
    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((v_pad, d)) / d**0.5, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    out = {}
    for impl in ("xla", "cce"):
        ref_loss, (ref_de, ref_dc) = _step(None, impl, v)(e, c, t)
        cs = jax.device_put(c, NamedSharding(mesh, P("vocab", None)))
        loss, (de, dc) = _step(mesh, impl, v)(e, cs, t)
        err = {
            "loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
            "de": float(jnp.linalg.norm(de - ref_de) / jnp.linalg.norm(ref_de)),
            "dc": float(jnp.linalg.norm(dc[:v] - ref_dc[:v]) / jnp.linalg.norm(ref_dc[:v])),
            "dc_padding_max": float(jnp.abs(dc[v:]).max()) if v_pad > v else 0.0,
            "dc_sharding": str(dc.sharding.spec),
        }
        err["ok"] = err["loss"] < 1e-5 and err["de"] < 1e-4 and err["dc"] < 1e-4 and err["dc_padding_max"] == 0
        out[impl] = err
        log(f"correctness {impl}: {err}")
    return out


def timing(mesh, shapes, impls, log):
    rows = []
    for name in shapes:
        n, d, v = SHAPES[name]
        key_e, key_c, key_t = jax.random.split(jax.random.key(1), 3)
        e = jax.random.normal(key_e, (n, d), jnp.bfloat16)
        c = (jax.random.normal(key_c, (v, d), jnp.float32) / d**0.5).astype(jnp.bfloat16)
        t = jax.random.randint(key_t, (n,), 0, v)
        for impl in impls:
            for where in ("1 GPU", f"{mesh.size} GPUs vocab-parallel"):
                sharded = where != "1 GPU"
                cc = jax.device_put(c, NamedSharding(mesh, P("vocab", None))) if sharded else c
                fn = _step(mesh if sharded else None, impl, v)
                try:
                    ms = median_ms(fn, e, cc, t)
                    stats = [dev.memory_stats() or {} for dev in (mesh.devices.flat if sharded else [jax.devices()[0]])]
                    peak = [s.get("peak_bytes_in_use", 0) / 2**20 for s in stats]
                    temp = fn.lower(e, cc, t).compile().memory_analysis().temp_size_in_bytes / 2**20
                    row = dict(shape=name, impl=impl, where=where, ms=ms, temp_mb=temp, peak_mb_per_device=peak)
                except Exception as err:  # keep going: one failing row must not hide the others
                    row = dict(shape=name, impl=impl, where=where, error=f"{type(err).__name__}: {str(err)[:300]}")
                rows.append(row)
                log(f"timing {row}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gemma2,llama3")
    parser.add_argument("--impls", default="cce,xla")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,))
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}")
    result = {"devices": [d.device_kind for d in devices], "jax": jax.__version__,
              "correctness": correctness(mesh, len(devices), log),
              "timing": timing(mesh, [s for s in args.shapes.split(",") if s], args.impls.split(","), log)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
