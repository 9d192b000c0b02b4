"""The timing worker of the benchmark (``python -m cce_jax.benchmark``): for one (shape, data recipe) it compiles,
warms up, measures the memory of and times every (implementation, kind) row, then checks the rows against the
reference (:mod:`cce_jax.bench_impls`). :mod:`cce_jax.benchmark`'s docstring describes what a row reports and how
the peak memory is measured above the ballast.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cce_jax.bench_data import Data, make_data
from cce_jax.bench_impls import IMPL_REGISTRY, IMPLS, KERNEL_IMPLS, check, reference
from cce_jax.bench_report import fmt_err, fmt_ok, row_line

_GIB = 1 << 30
_MIB = 1 << 20


@jax.jit
def _bits_equal(a, b):
    def same(x, y):
        if jnp.issubdtype(x.dtype, jnp.floating):
            uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
            x, y = lax.bitcast_convert_type(x, uint), lax.bitcast_convert_type(y, uint)
        return jnp.array_equal(x, y)

    return jnp.stack([same(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]).all()


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


def new_row(base: dict, impl: str, kind: str) -> dict:
    """A row with every result field, so that error rows (also the command's crash rows) carry the same keys."""
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
        row = new_row(base, impl, kind)
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
