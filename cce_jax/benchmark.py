"""``python -m cce_jax.benchmark``: time and check the loss implementations at LM-head shapes.

For every (shape, data recipe, implementation, kind) the command jit-compiles the loss (kind ``fw``) or
``jax.value_and_grad`` of it with respect to ``(e, c)`` (kind ``fw-bw``), runs it ``--warmup`` times, then
makes one more call to measure memory and keep its outputs, then times ``--iters`` calls (fewer, at least 3, if
they would take longer than ``--row-seconds``) with the host wall clock around the compiled call and
``block_until_ready`` and reports the median. Each row also reports:

- ``temp MB``: ``compiled.memory_analysis().temp_size_in_bytes``, the executable's scratch memory (outputs,
  e.g. the gradients, are not included). This is the number the anchors table quotes for JAX rows.
- ``peak MB``: the most device memory the measured call had in use above what was in use before it (outputs
  included, inputs excluded), from ``memory_stats()["peak_bytes_in_use"]``; ``-`` where the backend has no
  memory statistics (CPU). JAX cannot reset that counter, so before the call the harness fills the allocator
  up to the current peak with throw-away "ballast" buffers (freed right after the call): any byte the call
  allocates then raises the peak, and ``peak after - in use before`` is the call's own peak. A row whose
  compiled temp + output size would not fit beside the ballast, or that runs out of memory with it, runs
  without it and reports ``-``. Each row raises the process-wide peak by its usage, so each shape runs in its
  own child process (``--no-isolate``: all in this process). XLA allocates statically, so the peak of an
  (impl, kind) is measured on the first data recipe and repeated for the others, whose rows reuse the
  compiled executable.
- ``loss`` and ``err``: the loss, and the worst relative error against a float32 reference computed in the
  same process on the same data, independently of this library: dense logits of the float32-upcast inputs at
  ``Precision.HIGHEST``, the loss from their log-sum-exp, and the gradients as explicit products
  ``(softmax - onehot) @ c / N`` and ``(softmax - onehot)^T @ e / N``. Errors are ``|loss - ref| / |ref|``
  and ``||g - g_ref|| / ||g_ref||`` (Frobenius) for dE and dC.
- ``ok``: every error within its tolerance (:data:`TOLERANCES`). Half-precision gradients are rounded to
  8 (bf16) or 11 (fp16) mantissa bits, which alone costs ~1e-3 relative, hence the 1e-2 / 5e-3 gradient
  tolerances; float32 rows allow 2e-3 because XLA's default float32 matmul precision on GPUs is TF32, which
  the baseline uses. Gradient filtering (skipping tiles where every ``|softmax - onehot| < filter_eps``)
  changes the result by design, so implementations that filter dE or dC get, on top of the tolerance, 1.5x
  the relative size of everything an element-wise filter at that eps would drop (computed by the reference,
  reported per data set as the filter drop bound; at V 128k-256k in bf16 it is 2e-2 to 4e-2 for dE and
  2e-3 to 5e-3 for dC on ``flat`` and ``lm`` data, ~0 on ``peaked``).
- ``det``: whether two calls of the same compiled function on the same inputs gave bit-identical outputs
  (the measured call and the last timed call of every round).

``--rounds R`` makes each row's timed calls once per round, the rows of a data set interleaved (every row's
calls of round 1, then of round 2, ...), and reports the median of all of them. A GPU that runs into its power
limit (the H200 at these shapes) slows down as it heats, so rows timed one after the other see different
clocks; interleaved rounds let every implementation see the same ones.

Data recipes (all generated on the device with ``jax.random``, O(1)-scale, then cast to ``--dtype``):

- ``flat``: ``e ~ N(0, 1)``, ``c ~ N(0, 1/D)``, so logits are ~N(0, 1): nearly uniform softmax (entropy
  ~ln V - 0.5), uniform random targets. Every softmax entry is below bf16's filter eps, so filtering skips
  almost every tile that holds no target.
- ``peaked``: Apple's benchmark recipe: ``e, c ~ N(0, 1) / D**0.25`` with ``c[:N] = e``, so token i's logit
  against column i is ``|e_i|^2 ~ sqrt(D)`` and dwarfs the rest (entropy ~0); targets uniform random over
  the vocabulary, as Apple draws them (so the loss is ~sqrt(D)).
- ``lm``: closer to a trained LM head. Logits are ``prior_v + noise_iv``: a Zipf prior
  ``prior_v = -log(rank_v)`` (exponent 1, token frequencies of natural text) with the ranks a random
  permutation of the vocabulary (tokenizers do not number tokens by frequency), plus per-token Gaussian
  noise of standard deviation 5 (``e ~ N(0, 1)``, ``c ~ N(0, 25/(D-k))`` on D - k features). The prior is
  folded into the matmul as a bias: ``k = 16`` features of ``e`` are 1 and the same features of ``c`` hold
  ``prior_v / k`` (entries at most ~0.8). The noise scale is chosen so the mean softmax entropy is ~3 nats
  at V = 128k and 256k (3.0 and 3.2 measured), which is where trained LMs sit on text, with a wide
  per-token spread (std ~1.2), top-1 probability ~0.37, and the probable tokens of different rows spread
  over the whole vocabulary (so, unlike ``flat``, few tiles are skippable). Targets are sampled from each
  row's own softmax (Gumbel-max), so the expected loss equals the entropy. The measured mean entropy is
  printed and recorded for every recipe.

Results: a table on stdout, one progress line per row on stderr, ``--json`` / ``--csv`` (rewritten after each
shape, with metadata: date, device, jax version, git commit or ``$CCE_BENCH_COMMIT``, command line; while a
shape runs, its rows stream to ``<json>.partial.jsonl``, so a run stopped from outside keeps them) and
``--markdown`` (appended). Rows that raise (an implementation that is not available, out of memory) are
recorded as errors and the run continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cce_jax import api, options
from cce_jax import cce as cce_lib
from cce_jax.bench_data import DATA_RECIPES, DTYPES, LM_RECIPES, Data, make_data
from cce_jax.bench_data import _lm_prior_features  # noqa: F401 (re-exported for the tests)
from cce_jax.bench_report import (
    data_lines, fmt_err, fmt_ok, format_markdown, format_table, row_line, write_csv, write_json,
)

SHAPES: dict[str, tuple[int, int, int]] = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "small": (512, 256, 4099),
    "llama3-65k": (65536, 4096, 128256),
}
KINDS = ("fw", "fw-bw")
KERNEL_IMPLS = ("cce", "cce_sorted", "cce_kahan", "cce_kahan_full_c", "cce_kahan_full_e", "cce_exact")
IMPLS = (*KERNEL_IMPLS, "xla", "dense", "baseline", "baseline_f32")

# (loss relative error, gradient relative error) allowed per input dtype; see the module docstring.
TOLERANCES: dict[str, tuple[float, float]] = {
    "bf16": (1e-4, 1e-2),
    "fp16": (1e-4, 5e-3),
    "fp32": (1e-3, 2e-3),
}
# (loss, gradient) relative errors allowed to an implementation that rounds its logits to a half dtype (the
# baseline): a bf16 logit carries a relative error of 2**-9, several times the library's own tolerances.
HALF_LOGIT_TOLERANCES = (4e-3, 3e-2)
# Multiplies the reference's "what an element-wise filter would drop" bound for implementations that filter.
FILTER_ALLOWANCE = 1.5


_GIB = 1 << 30
_MIB = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Implementations


@dataclasses.dataclass(frozen=True)
class Impl:
    """A timed implementation: ``loss(e, c, targets) -> float32 scalar`` and which gradients it may filter."""

    loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    filters_e: bool = False
    filters_c: bool = False
    half_logits: bool = False  # rounds logits to the input dtype: judged with HALF_LOGIT_TOLERANCES


def _library_impl(name: str) -> Impl:
    """``cce_jax.linear_cross_entropy(..., impl=name)`` with default options (mean reduction)."""

    def loss(e, c, targets):
        return api.linear_cross_entropy(e, c, targets, impl=name)

    if name == "dense":
        return Impl(loss)
    backward = options.backward_options(
        name, filter_eps=1.0, filter_e_grad=True, filter_c_grad=True, accum_e_fp32=False, accum_c_fp32=False
    )
    return Impl(loss, backward.filters_e, backward.filters_c)


def baseline_loss(e: jax.Array, c: jax.Array, targets: jax.Array) -> jax.Array:
    """The plain XLA baseline as JAX users write it: ``(e @ c^T).astype(float32)`` then optax's cross-entropy.

    The product is in the input dtype, so its backward runs input-dtype matmuls (what the anchors measured).
    """
    logits = lax.dot_general(e, c, (((1,), (1,)), ((), ()))).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def baseline_f32_loss(e: jax.Array, c: jax.Array, targets: jax.Array) -> jax.Array:
    """The baseline with float32-accumulated logits (``preferred_element_type``); its backward multiplies a
    float32 logit gradient with half-precision operands, which XLA runs as float32 matmuls."""
    logits = lax.dot_general(e, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _sorted_loss(e, c, targets):
    """impl="cce" walking the vocabulary in sampled-probability order (``KernelConfig.sort_vocab``)."""
    config = dataclasses.replace(cce_lib.default_config(e.shape[1], e.dtype), sort_vocab=True)
    return api.linear_cross_entropy(e, c, targets, impl=config)


# Name -> implementation; ``--impl`` accepts exactly these names.
IMPL_REGISTRY: dict[str, Impl] = {name: _library_impl(name) for name in IMPLS
                                  if name.startswith(("cce", "xla", "dense")) and name != "cce_sorted"}
IMPL_REGISTRY["cce_sorted"] = dataclasses.replace(IMPL_REGISTRY["cce"], loss=_sorted_loss)
IMPL_REGISTRY["baseline"] = Impl(baseline_loss, half_logits=True)
IMPL_REGISTRY["baseline_f32"] = Impl(baseline_f32_loss)


# --------------------------------------------------------------------------------------------------------------
# Reference and checks


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


@functools.partial(jax.jit, static_argnames=("grads", "eps"))
def reference(e, c, targets, *, grads: bool, eps: float):
    """float32 loss of the upcast inputs and, if ``grads``, the gradients of the mean loss written out by hand.

    Returns ``(loss, None)`` or ``(loss, (de, dc, (drop_e, drop_c)))`` where ``drop_*`` is the relative size of
    the part of each gradient that comes from softmax entries with ``|softmax - onehot| < eps``: the most an
    element-wise gradient filter at ``eps`` can change it.
    """
    hi = lax.Precision.HIGHEST
    e32, c32 = e.astype(jnp.float32), c.astype(jnp.float32)
    n = e.shape[0]
    z = lax.dot_general(e32, c32, (((1,), (1,)), ((), ())), precision=hi)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_t = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    loss = jnp.mean(lse - z_t)
    if not grads:
        return loss, None
    g = jnp.exp(z - lse[:, None]).at[jnp.arange(n), targets].add(-1.0)
    dropped = jnp.where(jnp.abs(g) < eps, g, 0.0)

    def products(x):
        return jnp.dot(x, c32, precision=hi) / n, jnp.dot(x.T, e32, precision=hi) / n

    de, dc = products(g)
    de_drop, dc_drop = products(dropped)
    return loss, (de, dc, (_norm(de_drop) / _norm(de), _norm(dc_drop) / _norm(dc)))


@jax.jit
def _rel_err(x, ref):
    return _norm(x.astype(jnp.float32) - ref) / _norm(ref)


@jax.jit
def _bits_equal(a, b):
    def same(x, y):
        if jnp.issubdtype(x.dtype, jnp.floating):
            uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
            x, y = lax.bitcast_convert_type(x, uint), lax.bitcast_convert_type(y, uint)
        return jnp.array_equal(x, y)

    return jnp.stack([same(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]).all()


def check(row: dict, out, ref_loss: float, ref_grads, drops: tuple[float, float] | None) -> dict:
    """Errors of one row's outputs against the reference, its tolerances and the verdict."""
    impl = IMPL_REGISTRY[row["impl"]]
    tol_loss, tol_grad = TOLERANCES[row["dtype"]]
    if impl.half_logits and row["dtype"] != "fp32":
        tol_loss, tol_grad = max(tol_loss, HALF_LOGIT_TOLERANCES[0]), max(tol_grad, HALF_LOGIT_TOLERANCES[1])
    loss = out if row["kind"] == "fw" else out[0]
    res = {"loss_err": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30), "tol_loss": tol_loss,
           "de_err": None, "dc_err": None, "tol_de": None, "tol_dc": None}
    verdicts = [res["loss_err"] <= tol_loss]
    if row["kind"] == "fw-bw":
        de, dc = out[1]
        res["de_err"] = float(_rel_err(de, ref_grads[0]))
        res["dc_err"] = float(_rel_err(dc, ref_grads[1]))
        res["tol_de"] = tol_grad + (FILTER_ALLOWANCE * drops[0] if impl.filters_e else 0.0)
        res["tol_dc"] = tol_grad + (FILTER_ALLOWANCE * drops[1] if impl.filters_c else 0.0)
        verdicts += [res["de_err"] <= res["tol_de"], res["dc_err"] <= res["tol_dc"]]
    errs = [x for x in (res["loss_err"], res["de_err"], res["dc_err"]) if x is not None]
    res["err"] = math.nan if any(math.isnan(x) for x in errs) else max(errs)
    res["ok"] = all(verdicts)  # a NaN error compares False and fails
    return res


# --------------------------------------------------------------------------------------------------------------
# Timing one (shape, data) group


def _error_text(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}"[:300] if lines else type(exc).__name__


def _memory_stats(device) -> dict | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without statistics raise or return None)
        return None
    if not stats or "peak_bytes_in_use" not in stats or "bytes_in_use" not in stats:
        return None
    return stats


def ballast_sizes(gap: int) -> list[int]:
    """``gap`` bytes (rounded down to 256) as 1 GiB pieces and then distinct powers of two, so the buffers
    come in at most 23 distinct shapes (each compiles once) and need no single large free region."""
    sizes = [_GIB] * (gap // _GIB)
    bit = _GIB >> 1
    while bit >= 256:
        if (gap % _GIB) & bit:
            sizes.append(bit)
        bit >>= 1
    return sizes


def _ballast(device, stats: dict, need: int) -> list[jax.Array] | None:
    """Buffers filling the allocator up to its recorded peak, or None when that would leave less free than
    ``need`` bytes (plus a margin) for the row, which then goes without a peak measurement."""
    gap = stats["peak_bytes_in_use"] - stats["bytes_in_use"]
    limit = stats.get("bytes_limit")
    if limit and stats["peak_bytes_in_use"] + int(1.25 * need) + _GIB > limit:
        return None
    chunks = [jnp.zeros((size,), jnp.uint8, device=device) for size in ballast_sizes(gap)]
    jax.block_until_ready(chunks)
    return chunks


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _iterations(cfg: dict, seconds_per_call: float) -> int:
    """``--iters``, cut so the timed calls of a row take about ``--row-seconds`` (but at least 3 calls)."""
    budget = cfg.get("row_seconds")
    if budget is None or seconds_per_call * cfg["iters"] <= budget:
        return cfg["iters"]
    return max(int(budget / seconds_per_call), min(3, cfg["iters"]))


def _new_row(base: dict, impl: str, kind: str) -> dict:
    return dict(base, impl=impl, kind=kind, status="ok", error=None, median_ms=None, min_ms=None, times_ms=None,
                temp_mb=None, peak_mb=None, loss=None, loss_err=None, de_err=None, dc_err=None, err=None,
                tol_loss=None, tol_de=None, tol_dc=None, ok=None, det=None)


class Worker:
    """Runs groups in this process and keeps their compiled executables (reused across data recipes)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.device = jax.devices()[0]
        self.compiled: dict[tuple, Any] = {}
        self.peaks: dict[tuple, float | None] = {}
        self.impls = self._impl_names()
        self.emitted = 0

    def device_info(self) -> dict:
        return {"device_kind": self.device.device_kind, "platform": self.device.platform,
                "device_count": jax.device_count()}

    def _impl_names(self) -> list[str]:
        if self.cfg["impls"] is not None:
            return list(self.cfg["impls"])
        if self.device.platform == "cpu":
            _progress("note: no accelerator, so the kernel presets are left out (interpret mode is no benchmark); "
                      "name them with --impl to run them anyway")
            return [name for name in IMPLS if name not in KERNEL_IMPLS]
        return list(IMPLS)

    def run_group(self, shape: Sequence, recipe: str, emit: Callable[[dict], None]) -> None:
        """Times every (impl, kind) on one data set, then checks them; emits "row", "check", "group" records."""
        name, n, d, v = shape
        base = {"shape": name, "n": n, "d": d, "v": v, "dtype": self.cfg["dtype"], "data": recipe}
        started = time.perf_counter()
        data = make_data(recipe, n, d, v, self.cfg["dtype"], self.cfg["seed"])
        _progress(f"{name} {recipe}: data ready in {time.perf_counter() - started:.1f}s, mean softmax entropy "
                  f"{data.stats['entropy_mean']:.2f} nats (std {data.stats['entropy_std']:.2f}), top prob "
                  f"{data.stats['top_prob_mean']:.3f}, fraction of p >= eps {data.stats['frac_p_ge_eps']:.1e}")
        rows, outputs, indices = [], [], []
        pairs = [(impl, kind) for impl in self.impls for kind in self.cfg["kinds"]]
        rounds = self.cfg.get("rounds", 1)

        def finish(run):
            row, out = self._finish_row(run)
            indices.append(self.emitted)
            self.emitted += 1
            emit({"type": "row", "index": indices[-1], **row})
            _progress(f"[{len(rows) + 1}/{len(pairs)}] {row_line(row)}")
            rows.append(row)
            outputs.append(out)

        runs = []
        for impl, kind in pairs:
            run = self._start_row(base, data, impl, kind)
            self._time_row(run, data)
            if rounds == 1:
                finish(run)
            else:
                runs.append(run)
        # Later rounds interleave the rows' timed calls, so that a drifting clock (a power-capped GPU heating up)
        # weighs on every implementation alike.
        for _ in range(rounds - 1):
            for run in runs:
                self._time_row(run, data)
        for run in runs:
            finish(run)
        # The reference is the group's largest computation: run last, the rows' ballast need not cover it.
        info = dict(base, **data.stats, ref_loss=None, drop_de=None, drop_dc=None, ref_error=None,
                    **self.device_info())
        need_grads = any(r["kind"] == "fw-bw" and r["status"] == "ok" for r in rows)
        try:
            ref_loss, ref_grads = reference(data.e, data.c, data.targets, grads=need_grads,
                                            eps=data.stats["filter_eps"])
            info["ref_loss"] = float(ref_loss)
            drops = None
            if ref_grads is not None:
                drops = tuple(float(x) for x in ref_grads[2])
                info["drop_de"], info["drop_dc"] = drops
            for index, row, out in zip(indices, rows, outputs):
                if out is not None:
                    result = check(row, out, info["ref_loss"], ref_grads, drops)
                    row.update(result)
                    emit({"type": "check", "index": index, **result})
        except Exception as exc:  # noqa: BLE001
            info["ref_error"] = _error_text(exc)
            _progress(f"{name} {recipe}: reference failed: {info['ref_error']}")
        emit({"type": "group", **info})
        checked = ", ".join(f"{r['impl']} {r['kind']} {fmt_err(r)} {fmt_ok(r)}" for r in rows if r["ok"] is not None)
        _progress(f"{name} {recipe}: relative errors vs the float32 reference: {checked or 'none'}")

    def _key(self, base: dict, impl: str, kind: str) -> tuple:
        return (base["n"], base["d"], base["v"], base["dtype"], impl, kind)

    def _compile(self, base: dict, data: Data, impl: str, kind: str):
        """The executable for (shape, dtype, impl, kind), compiled once; a failure is remembered and re-raised."""
        key = self._key(base, impl, kind)
        if key not in self.compiled:
            loss = IMPL_REGISTRY[impl].loss
            fn = loss if kind == "fw" else jax.value_and_grad(loss, argnums=(0, 1))
            try:
                self.compiled[key] = jax.jit(fn).lower(data.e, data.c, data.targets).compile()
            except Exception as exc:  # noqa: BLE001
                self.compiled[key] = exc
        if isinstance(self.compiled[key], Exception):
            raise self.compiled[key]
        return self.compiled[key]

    def _start_row(self, base: dict, data: Data, impl: str, kind: str) -> dict:
        """Compiles, warms up and makes the memory-measured call of one row; the timed calls come later
        (:meth:`_time_row`, once per round)."""
        row = _new_row(base, impl, kind)
        run = {"row": row, "compiled": None, "first": None, "once": None, "times": [], "det": True}
        args = (data.e, data.c, data.targets)
        ballast = None
        try:
            compiled = self._compile(base, data, impl, kind)
            analysis = compiled.memory_analysis()
            if analysis is not None:
                row["temp_mb"] = analysis.temp_size_in_bytes / _MIB
            for _ in range(self.cfg["warmup"]):
                jax.block_until_ready(compiled(*args))
            gc.collect()
            key = self._key(base, impl, kind)
            before = None if key in self.peaks else _memory_stats(self.device)
            if before is not None and analysis is not None:
                # Fill the allocator up to its recorded peak, so that whatever the call allocates raises it.
                need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
                ballast = _ballast(self.device, before, need)
                before = _memory_stats(self.device) if ballast is not None else None
            start = time.perf_counter()
            try:
                run["first"] = jax.block_until_ready(compiled(*args))
            except Exception as exc:  # noqa: BLE001
                if ballast is None or not _is_oom(exc):
                    raise
                ballast = before = None  # the ballast took the room the call needed: run without it
                gc.collect()
                start = time.perf_counter()
                run["first"] = jax.block_until_ready(compiled(*args))
            run["once"] = time.perf_counter() - start
            if key not in self.peaks:
                after = _memory_stats(self.device) if before is not None else None
                self.peaks[key] = None if after is None else (
                    max(after["peak_bytes_in_use"] - before["bytes_in_use"], 0) / _MIB)
            row["peak_mb"] = self.peaks[key]
            run["compiled"] = compiled
        except Exception as exc:  # noqa: BLE001  (one failing implementation must not stop the run)
            row.update(status="error", error=_error_text(exc))
            run["first"] = None
        finally:
            ballast = None
            gc.collect()
        return run

    def _time_row(self, run: dict, data: Data) -> None:
        """One round of a row's timed calls (``--iters``, fewer when slow: :func:`_iterations`); the round's
        last output must equal the measured call's bit for bit (``det``)."""
        if run["compiled"] is None:
            return
        args = (data.e, data.c, data.targets)
        last = None
        try:
            for _ in range(_iterations(self.cfg, run["once"])):
                last = None
                start = time.perf_counter()
                last = jax.block_until_ready(run["compiled"](*args))
                run["times"].append((time.perf_counter() - start) * 1e3)
            run["det"] = run["det"] and bool(_bits_equal(run["first"], last))
        except Exception as exc:  # noqa: BLE001
            run["row"].update(status="error", error=_error_text(exc))
            run["compiled"] = run["first"] = None
        finally:
            last = None
            gc.collect()

    def _finish_row(self, run: dict) -> tuple[dict, Any]:
        """The row's timing, determinism and loss, and its first output (for the check), or an error row."""
        row, first = run["row"], run["first"]
        run.update(compiled=None, first=None)
        if row["status"] != "ok" or first is None:
            return row, None
        times = run["times"]
        row["times_ms"] = times
        row["median_ms"] = float(np.median(times))
        row["min_ms"] = float(np.min(times))
        row["det"] = run["det"]
        row["loss"] = float(first if row["kind"] == "fw" else first[0])
        return row, first


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Command line


def _split_list(values: Sequence[str] | None, allowed: Sequence[str], flag: str) -> list[str] | None:
    """Comma-separated and/or repeated flag values, checked against ``allowed`` (``all`` means all of them)."""
    if values is None:
        return None
    out: list[str] = []
    for value in values:
        for item in (x.strip() for x in value.split(",")):
            if not item:
                continue
            new = list(allowed) if item == "all" else [item]
            if item != "all" and item not in allowed:
                raise SystemExit(f"{flag}: unknown value {item!r}; choose from {', '.join(allowed)} (or all)")
            out += [x for x in new if x not in out]
    if not out:
        raise SystemExit(f"{flag}: no value given")
    return out


def _positive(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    shapes = ", ".join(f"{k} (N {n}, D {d}, V {v})" for k, (n, d, v) in SHAPES.items())
    p = argparse.ArgumentParser(
        prog="python -m cce_jax.benchmark",
        description="Time the linear cross-entropy implementations and check them against a float32 reference. "
                    "List flags take comma-separated values and may be repeated.",
    )
    p.add_argument("--shape", action="append", metavar="NAME", help=f"{shapes}; default small unless --n/--d/--v")
    p.add_argument("--n", type=_positive("--n"), help="tokens N of a custom shape (give --n, --d and --v)")
    p.add_argument("--d", type=_positive("--d"), help="hidden size D of a custom shape")
    p.add_argument("--v", type=_positive("--v"), help="vocabulary size V of a custom shape")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="dtype of e and c (default bf16)")
    p.add_argument("--data", action="append", metavar="RECIPE", help="flat, peaked, lm (default: all)")
    p.add_argument("--impl", action="append", metavar="IMPL",
                   help=f"{', '.join(IMPL_REGISTRY)} (default: all; without an accelerator all but the kernel presets)")
    p.add_argument("--kind", action="append", metavar="KIND",
                   help="fw (loss only), fw-bw (value_and_grad w.r.t. e and c) (default: both)")
    p.add_argument("--iters", type=_positive("--iters"), default=10, help="timed calls per row (default 10)")
    p.add_argument("--warmup", type=_positive("--warmup"), default=2,
                   help="untimed calls before the memory-measured call and the timed ones (default 2)")
    p.add_argument("--row-seconds", type=float, default=30.0,
                   help="time budget of a row's timed calls: fewer than --iters (at least 3) are made when one "
                        "call is slower than budget / iters (default 30)")
    p.add_argument("--rounds", type=_positive("--rounds"), default=1,
                   help="timing rounds per data set: each row makes its timed calls once per round, the rows "
                        "interleaved, and reports the median of all of them, so that a GPU whose clock drifts as it "
                        "heats (a power cap) treats every implementation alike (default 1)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--json", metavar="PATH",
                   help="write results and metadata as JSON (rewritten after each shape; meanwhile a shape's rows "
                        "stream to PATH.partial.jsonl)")
    p.add_argument("--csv", metavar="PATH", help="write one CSV line per row (rewritten after each shape)")
    p.add_argument("--markdown", metavar="PATH", help="append a markdown section with the results to PATH")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every shape in this process instead of one child process per shape (peaks of later "
                        "shapes then need ballast for all earlier ones)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    return p


def _resolve(args: argparse.Namespace) -> dict:
    custom = (args.n, args.d, args.v)
    shapes = [[name, *SHAPES[name]] for name in _split_list(args.shape, tuple(SHAPES), "--shape") or []]
    if any(x is not None for x in custom):
        if any(x is None for x in custom):
            raise SystemExit("--n, --d and --v must be given together")
        shapes.append([f"{args.n}x{args.d}x{args.v}", *custom])
    data = _split_list(args.data, DATA_RECIPES, "--data") or list(DATA_RECIPES)
    if any(r in LM_RECIPES for r in data) and any(s[2] < 2 for s in shapes):
        raise SystemExit("--data lm needs D >= 2 (one feature carries the vocabulary prior)")
    return {
        "shapes": shapes or [["small", *SHAPES["small"]]],
        "dtype": args.dtype,
        "data": data,
        "impls": _split_list(args.impl, tuple(IMPL_REGISTRY), "--impl"),
        "kinds": _split_list(args.kind, KINDS, "--kind") or list(KINDS),
        "iters": args.iters,
        "warmup": args.warmup,
        "seed": args.seed,
        "row_seconds": args.row_seconds,
        "rounds": args.rounds,
    }


def _git_commit() -> str:
    """$CCE_BENCH_COMMIT if set (a copied checkout's .git can be stale), else ``git rev-parse --short HEAD`` of
    this checkout, else "unknown"."""
    if os.environ.get("CCE_BENCH_COMMIT"):
        return os.environ["CCE_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _metadata(cfg: dict, argv: Sequence[str], isolate: bool) -> dict:
    import jaxlib  # noqa: PLC0415

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_kind": None,
        "platform": None,
        "device_count": None,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "command": " ".join(["python -m cce_jax.benchmark", shlex.join(argv)]).strip(),
        "dtype": cfg["dtype"],
        "iters": cfg["iters"],
        "rounds": cfg.get("rounds", 1),
        "warmup": cfg["warmup"],
        "seed": cfg["seed"],
        "isolate": isolate,
        "timing": "host wall clock around the compiled call and block_until_ready; median of iters (of iters per "
                  "round over all rounds, the rows of a data set interleaved round by round, with rounds > 1)",
        "memory": "temp_mb: compiled temp_size_in_bytes; peak_mb: device peak above the pre-row bytes in use, "
                  "first call, outputs included (ballast-filled allocator)",
        "reference": "float32 dense computation at Precision.HIGHEST, independent of cce_jax",
        "tolerances": {k: {"loss": v[0], "grad": v[1]} for k, v in TOLERANCES.items()},
        "filter_allowance": FILTER_ALLOWANCE,
    }


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    worker = Worker(spec)
    with open(spec["results"], "a") as out:
        def emit(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        for shape in spec["shapes"]:
            for recipe in spec["data"]:
                worker.run_group(shape, recipe, emit)
    return 0


def _run_child(cfg: dict, shape: list, results: str) -> list[dict]:
    """Runs one shape's groups in a fresh process (fresh device peak counter); returns the records it wrote.

    The records go to ``results`` as they are made, so a run stopped from outside leaves them behind.
    """
    Path(results).write_text("")
    spec = dict(cfg, shapes=[shape], results=results)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # room on the GPU for the ballast
    root = str(Path(__file__).resolve().parents[1])  # the child imports cce_jax from where this file lives
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "cce_jax.benchmark", "--_worker", json.dumps(spec)], env=env,
                          check=False)
    records = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    if proc.returncode != 0 or sum(r["type"] == "group" for r in records) < len(cfg["data"]):
        records.append({"type": "crash", "returncode": proc.returncode})
    return records


def _merge(records: list[dict], cfg: dict, shape: list) -> tuple[list[dict], list[dict]]:
    """(rows, group infos) from a shape's records; a worker that died leaves an error row behind."""
    rows: dict[int, dict] = {}
    groups = []
    for rec in records:
        body = {k: v for k, v in rec.items() if k not in ("type", "index")}
        if rec["type"] == "row":
            rows[rec["index"]] = body
        elif rec["type"] == "check":
            rows[rec["index"]].update(body)
        elif rec["type"] == "group":
            groups.append(body)
        elif rec["type"] == "crash":
            name, n, d, v = shape
            done = {g["data"] for g in groups}
            left = ",".join(r for r in cfg["data"] if r not in done) or "-"
            rows[len(records) + 10**6] = dict(
                _new_row({"shape": name, "n": n, "d": d, "v": v, "dtype": cfg["dtype"], "data": left}, "-", "-"),
                status="error", error=f"worker process ended with status {rec['returncode']} before finishing")
    return [rows[k] for k in sorted(rows)], groups


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark described by ``argv`` (see ``--help``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._worker is not None:
        return _worker_main(args._worker)
    cfg = _resolve(args)
    report = {"metadata": _metadata(cfg, argv, args.isolate), "data": [], "results": []}
    worker = None if args.isolate else Worker(cfg)
    for shape in cfg["shapes"]:
        if worker is None:
            fd, tmp = tempfile.mkstemp(prefix="cce_bench_", suffix=".jsonl")
            os.close(fd)
            results = f"{args.json}.partial.jsonl" if args.json else tmp
            try:
                records = _run_child(cfg, shape, results)
            finally:
                for path in {tmp, results}:
                    Path(path).unlink(missing_ok=True)
        else:
            records = []
            for recipe in cfg["data"]:
                worker.run_group(shape, recipe, records.append)
        rows, groups = _merge(records, cfg, shape)
        for info in groups:
            if report["metadata"]["device_kind"] is None:
                report["metadata"].update({k: info[k] for k in ("device_kind", "platform", "device_count")})
        report["data"] += groups
        report["results"] += rows
        if args.json:
            write_json(args.json, report)
        if args.csv:
            write_csv(args.csv, report)
    rows = report["results"]
    print(format_table(rows))
    print()
    print("\n".join(data_lines(report["data"])))
    failed = sum(1 for r in rows if r.get("ok") is False)
    errors = sum(1 for r in rows if r["status"] != "ok")
    print(f"\n{len(rows)} rows: {len(rows) - failed - errors} within tolerance or unchecked, {failed} outside "
          f"tolerance, {errors} errors")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
