"""Data recipes of the benchmark (``python -m cce_jax.benchmark``): e, c and targets generated on the device, and
the statistics of their softmax (entropy, top probability, the fraction of entries above the filter eps, live
gradient tiles). :mod:`cce_jax.benchmark`'s docstring describes each recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cce_jax import options

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
DATA_RECIPES = ("flat", "peaked", "lm", "lm-loose", "lm-sorted")
# The LM-like recipes differ only in how token ids follow token frequency (see the module docstring).
LM_RECIPES = ("lm", "lm-loose", "lm-sorted")
# Standard deviation of the noise added to log(id) before ranking ids for "lm-loose".
LM_LOOSE_ORDER_NOISE = 2.0
# Gradient tile shapes whose live fraction (some |softmax - onehot| >= filter eps) each data set reports.
LIVE_TILES = ((128, 128), (16, 128))
LM_ZIPF_EXPONENT = 1.0
LM_NOISE_STD = 5.0
LM_PRIOR_FEATURES = 16
# Logit elements the data-statistics pass holds per temporary (256 MB of float32).
_STATS_ELEMENTS = 1 << 26


def _lm_prior_features(d: int) -> int:
    return max(1, min(LM_PRIOR_FEATURES, d // 4))


@functools.partial(jax.jit, static_argnames=("recipe", "n", "d", "v", "dtype"))
def _generate(key, *, recipe: str, n: int, d: int, v: int, dtype):
    k_e, k_c, k_t, k_r = jax.random.split(key, 4)
    if recipe == "flat":
        e = jax.random.normal(k_e, (n, d), jnp.float32)
        c = jax.random.normal(k_c, (v, d), jnp.float32) * d**-0.5
    elif recipe == "peaked":
        scale = d**-0.25
        e = jax.random.normal(k_e, (n, d), jnp.float32) * scale
        c = jax.random.normal(k_c, (v, d), jnp.float32) * scale
        m = min(n, v)
        c = c.at[:m].set(e[:m])
    elif recipe in LM_RECIPES:
        k = _lm_prior_features(d)
        e = jax.random.normal(k_e, (n, d), jnp.float32).at[:, :k].set(1.0)
        c = jax.random.normal(k_c, (v, d), jnp.float32) * (LM_NOISE_STD / math.sqrt(d - k))
        if recipe == "lm":  # frequent tokens at random ids
            ranks = jax.random.permutation(k_r, v) + 1
        elif recipe == "lm-sorted":  # ids in frequency order
            ranks = jnp.arange(1, v + 1)
        else:  # ids loosely follow frequency: ranked by log(id) plus noise
            key = jnp.log1p(jnp.arange(v, dtype=jnp.float32)) + LM_LOOSE_ORDER_NOISE * jax.random.normal(k_r, (v,))
            ranks = jnp.argsort(jnp.argsort(key)) + 1
        prior = -LM_ZIPF_EXPONENT * jnp.log(ranks.astype(jnp.float32))
        c = c.at[:, :k].set(jnp.broadcast_to(prior[:, None] / k, (v, k)))
    else:
        raise ValueError(f"unknown data recipe {recipe!r}")
    targets = jax.random.randint(k_t, (n,), 0, v, dtype=jnp.int32)
    return e.astype(dtype), c.astype(dtype), targets


@functools.partial(jax.jit, static_argnames=("sample", "eps"))
def _softmax_stats(e, c, key, *, sample: bool, eps: float):
    """Per row: softmax entropy, top probability, entries >= eps, a target drawn from it (if ``sample``) and the
    largest probability of each block of LIVE_TILES[0][1] columns."""
    n, v = e.shape[0], c.shape[0]
    precision = lax.Precision.HIGHEST if e.dtype == jnp.float32 else lax.Precision.DEFAULT

    block = LIVE_TILES[0][1]
    pad = -v % block

    def row(args):
        e_row, k = args
        z = lax.dot_general(c, e_row, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(z)
        p = jnp.exp(z - lse)
        entropy = lse - jnp.sum(p * z)
        target = jnp.argmax(z + jax.random.gumbel(k, z.shape)).astype(jnp.int32) if sample else jnp.int32(0)
        block_max = jnp.pad(p, (0, pad)).reshape(-1, block).max(axis=1)
        return entropy, p.max(), jnp.sum(p >= eps, dtype=jnp.float32), target, block_max

    return lax.map(row, (e, jax.random.split(key, n)), batch_size=max(1, min(n, _STATS_ELEMENTS // v)))


def live_tile_fractions(block_max: np.ndarray, targets: np.ndarray, eps: float) -> dict[str, float]:
    """Fraction of gradient tiles in which some ``|softmax - onehot| >= eps``, per tile shape of LIVE_TILES.

    ``block_max`` is each row's largest probability per block of columns; a block holding the row's target is
    live (its onehot entry deviates by ``1 - p``, which only a near-certain prediction brings below eps)."""
    n, blocks = block_max.shape
    live = block_max >= eps
    live[np.arange(n), targets // LIVE_TILES[0][1]] = True
    out = {}
    for rows, cols in LIVE_TILES:
        pad = -n % rows
        grid = np.pad(live, ((0, pad), (0, 0))).reshape(-1, rows, blocks).any(axis=1)
        out[f"live_{rows}x{cols}"] = float(grid.mean())
    return out


@dataclasses.dataclass
class Data:
    e: jax.Array
    c: jax.Array
    targets: jax.Array
    stats: dict[str, float]


def make_data(recipe: str, n: int, d: int, v: int, dtype: str, seed: int) -> Data:
    """Generates one data recipe on the default device (see the module docstring) and measures its softmax."""
    if recipe not in DATA_RECIPES:
        raise ValueError(f"recipe must be one of {DATA_RECIPES}, got {recipe!r}")
    key = jax.random.fold_in(jax.random.key(seed), DATA_RECIPES.index(recipe))
    gen_key, stats_key = jax.random.split(key)
    e, c, targets = _generate(gen_key, recipe=recipe, n=n, d=d, v=v, dtype=DTYPES[dtype])
    eps = options.resolve_filter_eps("auto", DTYPES[dtype])
    lm = recipe in LM_RECIPES
    entropy, top, dense, sampled, block_max = _softmax_stats(e, c, stats_key, sample=lm, eps=eps)
    if lm:
        targets = sampled
    entropy, top, dense = (np.asarray(x, np.float64) for x in (entropy, top, dense))
    stats = {
        "entropy_mean": float(entropy.mean()),
        "entropy_std": float(entropy.std()),
        "top_prob_mean": float(top.mean()),
        "frac_p_ge_eps": float(dense.sum() / (n * v)),
        "filter_eps": eps,
        **live_tile_fractions(np.asarray(block_max), np.asarray(targets), eps),
    }
    jax.block_until_ready((e, c, targets))
    return Data(e, c, targets, stats)
