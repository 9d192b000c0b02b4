#!/usr/bin/env python3
"""Time the PyTorch peers of cce-jax on the same shapes and data recipes as ``python -m cce_jax.benchmark``.

Standalone: needs torch (and triton for the fused kernels), not jax or cce_jax. Peers (``--impl``):

- ``cce``, ``cce_kahan_full_c_full_e``, ``torch_compile``: Apple's ``cut_cross_entropy.linear_cross_entropy``
  with that ``impl`` (the Kahan presets exist in its GitHub tree, 25.6.x, not in PyPI's 25.1.1; a version
  without them reports an error row);
- ``liger``: Liger-Kernel's fused linear cross-entropy (``liger_fused_linear_cross_entropy``);
- ``baseline``: ``logits = e @ c.T`` then ``F.cross_entropy(logits.float(), targets)``.

Kinds: ``fw`` runs the loss under ``torch.no_grad()`` on inputs that do not require gradients (loss only, as
the JAX command's ``fw``; Liger then skips its in-forward gradient work); ``fw-bw`` runs the loss and
``.backward()`` into fresh ``e.grad`` / ``c.grad``. Time: CUDA events around the call (and the backward),
median of ``--iters`` calls (fewer, at least 3, if they would exceed ``--row-seconds``) made after
``--warmup`` calls and one memory-measured call. Memory: ``torch.cuda.max_memory_allocated()`` minus the
memory allocated before the measured call, with the peak reset first (so ``fw-bw`` includes the gradients
dE and dC themselves, unlike the JAX command's temp MB). ``det``: whether the measured and the last timed
call gave bit-identical outputs. ``err``/``ok``: relative errors against a float32 reference computed here,
in row chunks (loss from the log-sum-exp, gradients as ``(softmax - onehot) @ c / N`` and its transpose),
with the tolerances of ``cce_jax.benchmark`` plus two allowances the reference measures: gradient filtering
(Apple's ``cce`` filters both gradients at ``eps(dtype) / 32``) and, for the peers that compute
``e @ c.T`` in the input dtype before a float32 softmax (``torch_compile``, ``liger``, ``baseline``), the
change that rounding the logits to that dtype makes. Both are reported per data set.

Data recipes mirror ``cce_jax.benchmark`` (same distributions, not the same numbers: the RNGs differ):
``flat`` logits ~N(0, 1); ``peaked`` = Apple's recipe (``e, c ~ N(0, 1) / D**0.25``, ``c[:N] = e``,
uniform targets); ``lm`` = Zipf prior over a randomly permuted vocabulary folded into 16 features plus
N(0, 25) per-token noise, targets sampled from the softmax (mean entropy ~3 nats at V 128k-256k).

Without CUDA the script still runs on the CPU (wall-clock timing, no memory numbers) so its plumbing can be
checked; the Triton peers then report error rows. Each row is guarded: one peer failing does not stop the rest.

    python3 benchmarks/peers_torch.py --shape gemma2,llama3 --json peers.json --markdown peers.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# These mirror cce_jax/benchmark.py, bench_data.py and bench_impls.py (tests/test_benchmark.py checks that they agree).
SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "small": (512, 256, 4099),
    "llama3-65k": (65536, 4096, 128256),
}
DATA_RECIPES = ("flat", "peaked", "lm", "lm-loose", "lm-sorted")
LM_RECIPES = ("lm", "lm-loose", "lm-sorted")
LM_LOOSE_ORDER_NOISE = 2.0
KINDS = ("fw", "fw-bw")
TOLERANCES = {
    "bf16": (1e-4, 1e-2),
    "fp16": (1e-4, 5e-3),
    "fp32": (1e-3, 2e-3),
}
FILTER_ALLOWANCE = 1.5
LM_ZIPF_EXPONENT = 1.0
LM_NOISE_STD = 5.0
LM_PRIOR_FEATURES = 16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("cce", "cce_kahan_full_c_full_e", "torch_compile", "liger", "baseline")
# Which gradients each peer may filter (drop tiles of tiny softmax entries), and which peers round the logits
# to the input dtype before their float32 softmax: both earn an allowance on top of the tolerances.
FILTERS = {"cce": (True, True)}
ROUNDS_LOGITS = ("torch_compile", "liger", "baseline")
_MIB = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Peers


def _apple(impl: str):
    from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415

    def loss(e, c, targets):
        return linear_cross_entropy(e, c, targets, impl=impl)

    return loss


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: PLC0415

    def loss(e, c, targets):
        return liger_fused_linear_cross_entropy(e, c, targets)

    return loss


def baseline_loss(e, c, targets):
    return F.cross_entropy((e @ c.T).float(), targets)


def make_loss(impl: str):
    if impl == "baseline":
        return baseline_loss
    if impl == "liger":
        return _liger()
    return _apple(impl)


# --------------------------------------------------------------------------------------------------------------
# Data


def lm_prior_features(d: int) -> int:
    return max(1, min(LM_PRIOR_FEATURES, d // 4))


def _row_chunks(n: int, v: int):
    step = max(1, min(n, (1 << 26) // v))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def make_data(recipe: str, n: int, d: int, v: int, dtype: torch.dtype, seed: int, device: torch.device):
    """(e, c, targets, stats) for one recipe; stats describe the softmax of the generated (rounded) data."""
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + DATA_RECIPES.index(recipe))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    if recipe == "flat":
        e, c = randn(n, d), randn(v, d) * d**-0.5
    elif recipe == "peaked":
        e, c = randn(n, d) * d**-0.25, randn(v, d) * d**-0.25
        m = min(n, v)
        c[:m] = e[:m]
    elif recipe in LM_RECIPES:
        k = lm_prior_features(d)
        e = randn(n, d)
        e[:, :k] = 1.0
        c = randn(v, d) * (LM_NOISE_STD / math.sqrt(d - k))
        if recipe == "lm":
            ranks = torch.randperm(v, generator=gen, device=device).float() + 1.0
        elif recipe == "lm-sorted":
            ranks = torch.arange(1, v + 1, device=device).float()
        else:
            key = torch.log1p(torch.arange(v, device=device).float()) + LM_LOOSE_ORDER_NOISE * randn(v)
            ranks = torch.argsort(torch.argsort(key)).float() + 1.0
        c[:, :k] = (-LM_ZIPF_EXPONENT * torch.log(ranks) / k)[:, None]
    else:
        raise ValueError(f"unknown data recipe {recipe!r}")
    e, c = e.to(dtype), c.to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    eps = torch.finfo(dtype).eps / 32
    entropy, top, dense = [], [], 0.0
    c32 = c.float()
    for i, j in _row_chunks(n, v):
        z = e[i:j].float() @ c32.T
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        entropy.append(-(p * logp).sum(-1))
        top.append(p.max(-1).values)
        dense += float((p >= eps).sum())
        if recipe in LM_RECIPES:  # Gumbel-max: a draw from each row's softmax
            u = torch.rand(z.shape, generator=gen, device=device).clamp_(min=1e-30)
            targets[i:j] = torch.argmax(z - torch.log(-torch.log(u)), dim=-1)
        del z, logp, p
    entropy, top = torch.cat(entropy).double(), torch.cat(top).double()
    stats = {"entropy_mean": float(entropy.mean()), "entropy_std": float(entropy.std()),
             "top_prob_mean": float(top.mean()), "frac_p_ge_eps": dense / (n * v), "filter_eps": eps}
    return e, c, targets, stats


def reference(e, c, targets, eps: float):
    """float32 loss and mean-loss gradients of the given inputs, computed in row chunks, and two allowances.

    Returns ``(loss, de, dc, drops, rounding)``. ``drops`` = relative size of the dE and dC parts coming from
    entries with ``|softmax - onehot| < eps`` (the most an element-wise gradient filter changes them);
    ``rounding`` = relative change of (loss, dE, dC) when the logits are first rounded to the input dtype, which
    is what peers computing ``e @ c.T`` in that dtype do before their float32 softmax.
    """
    n = e.shape[0]
    e32, c32 = e.float(), c.float()
    de, de_r = torch.empty_like(e32), torch.empty_like(e32)
    dc, dc_r, dc_drop = torch.zeros_like(c32), torch.zeros_like(c32), torch.zeros_like(c32)
    loss, loss_r, de_drop_sq = 0.0, 0.0, 0.0
    for i, j in _row_chunks(n, c.shape[0]):
        rows = torch.arange(j - i, device=e.device)
        z = e32[i:j] @ c32.T
        for rounded in (False, True):
            zz = z.to(e.dtype).float() if rounded else z
            lse = torch.logsumexp(zz, dim=-1)
            chunk_loss = float((lse - zz[rows, targets[i:j]]).double().sum())
            g = torch.exp(zz - lse[:, None])
            g[rows, targets[i:j]] -= 1.0
            if rounded:
                loss_r += chunk_loss
                de_r[i:j] = g @ c32 / n
                dc_r += g.T @ e32[i:j] / n
            else:
                loss += chunk_loss
                de[i:j] = g @ c32 / n
                dc += g.T @ e32[i:j] / n
                dropped = torch.where(g.abs() < eps, g, torch.zeros_like(g))
                de_drop_sq += float(((dropped @ c32 / n).double() ** 2).sum())
                dc_drop += dropped.T @ e32[i:j] / n
                del dropped
            del zz, g
        del z
    norm = lambda x: float(torch.linalg.norm(x.double()))  # noqa: E731
    drops = (math.sqrt(de_drop_sq) / norm(de), norm(dc_drop) / norm(dc))
    rounding = (abs(loss_r - loss) / max(abs(loss), 1e-30), rel_err(de_r, de), rel_err(dc_r, dc))
    del dc_drop, dc_r, de_r
    return loss / n, de, dc, drops, rounding


def rel_err(x, ref) -> float:
    return float(torch.linalg.norm((x.float() - ref).double()) / torch.linalg.norm(ref.double()))


# --------------------------------------------------------------------------------------------------------------
# Timing


class Clock:
    """CUDA events on a GPU; on a CPU the host clock (there is nothing asynchronous to wait for)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def _error_text(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}"[:300] if lines else type(exc).__name__


def run_row(base: dict, impl: str, kind: str, e, c, targets, ref, cfg: dict, clock: Clock) -> dict:
    """Warm up, measure the memory of one call, time ``iters`` calls, check the measured call's outputs."""
    row = dict(base, impl=impl, kind=kind, status="ok", error=None, median_ms=None, min_ms=None, times_ms=None,
               peak_mb=None, loss=None, loss_err=None, de_err=None, dc_err=None, err=None, tol_loss=None,
               tol_de=None, tol_dc=None, ok=None, det=None)
    leaves: list[torch.Tensor] = []
    first = last = None
    try:
        loss_fn = make_loss(impl)
        if kind == "fw":
            def call():
                with torch.no_grad():
                    return (loss_fn(e, c, targets),)
        else:
            leaves += [e.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)]

            def call():
                for leaf in leaves:
                    leaf.grad = None  # fresh gradient buffers each call, as in a training step
                loss = loss_fn(*leaves, targets)
                loss.backward()
                return loss.detach(), leaves[0].grad, leaves[1].grad

        # Warm-up first: Apple's kernels autotune and torch.compile compiles inside their first calls.
        for _ in range(cfg["warmup"]):
            call()
        for leaf in leaves:
            leaf.grad = None
        gc.collect()
        clock.sync()
        if clock.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        first = call()
        clock.sync()
        once = time.perf_counter() - started
        if clock.cuda:
            row["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / _MIB
        # Fewer timed calls (at least 3) when one call is slower than the row's budget allows.
        iters = max(min(cfg["iters"], int(cfg["row_seconds"] / max(once, 1e-9))), min(3, cfg["iters"]))
        marks = []
        for _ in range(iters):
            last = None
            start = clock.mark()
            last = call()
            marks.append((start, clock.mark()))
        clock.sync()
        row["times_ms"] = [clock.elapsed_ms(a, b) for a, b in marks]
        row["median_ms"] = statistics.median(row["times_ms"])
        row["min_ms"] = min(row["times_ms"])
        row["det"] = all(torch.equal(a, b) for a, b in zip(first, last))
        row["loss"] = float(first[0])
        ref_loss, ref_de, ref_dc, drops, rounding = ref
        tol_loss, tol_grad = TOLERANCES[base["dtype"]]
        if impl not in ROUNDS_LOGITS:
            rounding = (0.0, 0.0, 0.0)
        row["loss_err"] = abs(row["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
        row["tol_loss"] = tol_loss + FILTER_ALLOWANCE * rounding[0]
        verdicts = [row["loss_err"] <= row["tol_loss"]]
        if kind == "fw-bw":
            row["de_err"], row["dc_err"] = rel_err(first[1], ref_de), rel_err(first[2], ref_dc)
            filters_e, filters_c = FILTERS.get(impl, (False, False))
            row["tol_de"] = tol_grad + FILTER_ALLOWANCE * ((drops[0] if filters_e else 0.0) + rounding[1])
            row["tol_dc"] = tol_grad + FILTER_ALLOWANCE * ((drops[1] if filters_c else 0.0) + rounding[2])
            verdicts += [row["de_err"] <= row["tol_de"], row["dc_err"] <= row["tol_dc"]]
        errs = [x for x in (row["loss_err"], row["de_err"], row["dc_err"]) if x is not None]
        row["err"] = math.nan if any(math.isnan(x) for x in errs) else max(errs)
        row["ok"] = all(verdicts)
    except Exception as exc:  # noqa: BLE001  (one failing peer must not stop the others)
        row.update(status="error", error=_error_text(exc))
    finally:
        leaves.clear()
        first = last = None
        gc.collect()
        if clock.cuda:
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


COLUMNS = ("shape", "data", "impl", "kind", "ms", "peak MB", "loss", "err", "ok", "det")


def _cells(r: dict) -> list[str]:
    head = [r["shape"], r["data"], r["impl"], r["kind"]]
    if r["status"] != "ok":
        return [*head, f"error: {r['error']}"]
    ok = "-" if r["ok"] is None else ("pass" if r["ok"] else "FAIL")
    det = "-" if r["det"] is None else ("yes" if r["det"] else "no")
    return [*head, _fmt(r["median_ms"], ".2f"), _fmt(r["peak_mb"], ".0f"), _fmt(r["loss"], ".5g"),
            _fmt(r["err"], ".1e"), ok, det]


def format_table(rows: list[dict]) -> str:
    body = [_cells(r) for r in rows]
    widths = [max([len(col)] + [len(b[i]) for b in body if len(b) == len(COLUMNS)]) for i, col in enumerate(COLUMNS)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def data_line(g: dict) -> str:
    return (f"{g['shape']} {g['data']}: entropy {g['entropy_mean']:.2f} nats (std {g['entropy_std']:.2f}), top prob "
            f"{g['top_prob_mean']:.3f}, p >= eps {g['frac_p_ge_eps']:.1e}, filter drop bound dE {g['drop_de']:.1e} "
            f"dC {g['drop_dc']:.1e}, logit rounding changes loss {g['round_loss']:.1e} dE {g['round_de']:.1e} "
            f"dC {g['round_dc']:.1e}, reference loss {g['ref_loss']:.5g}")


def format_markdown(report: dict) -> str:
    m = report["metadata"]
    lines = [f"### {m['date']}: {m['device']}, torch {m['torch_version']}, cut-cross-entropy {m['cut_cross_entropy']}, "
             f"liger-kernel {m['liger_kernel']}, commit {m['git_commit']}, {m['dtype']}", "", f"`{m['command']}`", "",
             "| " + " | ".join(COLUMNS) + " |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in report["results"]:
        cells = [x.replace("|", "/") for x in _cells(r)]
        lines.append("| " + " | ".join(cells + [""] * (len(COLUMNS) - len(cells))) + " |")
    lines += ["", "Data (softmax of the generated logits):", ""] + [f"- {data_line(g)}" for g in report["data"]]
    return "\n".join(lines) + "\n\n"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version(module)
    except Exception:  # noqa: BLE001
        return "not installed"


def _git_commit() -> str:
    """$CCE_BENCH_COMMIT if set (a copied checkout's .git can be stale), else ``git rev-parse``."""
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


# --------------------------------------------------------------------------------------------------------------
# Command line


def _split(values, allowed, flag):
    if not values:
        return list(allowed)
    out = []
    for value in values:
        for item in (x.strip() for x in value.split(",")):
            if item == "all":
                out += [x for x in allowed if x not in out]
            elif item not in allowed:
                raise SystemExit(f"{flag}: unknown value {item!r}; choose from {', '.join(allowed)}")
            elif item not in out:
                out.append(item)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help=f"{', '.join(SHAPES)} (comma-separated; default small)")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--data", action="append", help="flat, peaked, lm (default: all)")
    p.add_argument("--impl", action="append", help=f"{', '.join(IMPLS)} (default: all)")
    p.add_argument("--kind", action="append", help="fw, fw-bw (default: both)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--row-seconds", type=float, default=30.0, help="budget of a row's timed calls (min 3 calls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        raise SystemExit("--iters and --warmup must be at least 1")
    shapes = [(s, *SHAPES[s]) for s in _split(args.shape, tuple(SHAPES), "--shape")] if args.shape else []
    if any(x is not None for x in (args.n, args.d, args.v)):
        if any(x is None or x < 1 for x in (args.n, args.d, args.v)):
            raise SystemExit("--n, --d and --v must be given together, positive")
        shapes.append((f"{args.n}x{args.d}x{args.v}", args.n, args.d, args.v))
    shapes = shapes or [("small", *SHAPES["small"])]
    recipes = _split(args.data, DATA_RECIPES, "--data")
    impls = _split(args.impl, IMPLS, "--impl")
    kinds = _split(args.kind, KINDS, "--kind")
    cfg = {"iters": args.iters, "warmup": args.warmup, "row_seconds": args.row_seconds}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("note: no CUDA device; running on the CPU (wall-clock timing, no memory numbers)", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference and statistics are float32, not TF32
    clock = Clock(device)
    report = {"metadata": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__, "triton_version": _version("triton"),
        "cut_cross_entropy": _version("cut-cross-entropy"), "liger_kernel": _version("liger-kernel"),
        "git_commit": _git_commit(), "command": " ".join(["python3 benchmarks/peers_torch.py", shlex.join(argv)]),
        "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
        "timing": "CUDA events around the call (and backward); median of iters",
        "memory": "max_memory_allocated minus memory allocated before the call (fw-bw includes dE and dC)",
        "tolerances": {k: {"loss": a, "grad": b} for k, (a, b) in TOLERANCES.items()},
    }, "data": [], "results": []}

    for name, n, d, v in shapes:
        for recipe in recipes:
            base = {"shape": name, "n": n, "d": d, "v": v, "dtype": args.dtype, "data": recipe}
            try:
                e, c, targets, stats = make_data(recipe, n, d, v, DTYPES[args.dtype], args.seed, device)
                ref = reference(e, c, targets, stats["filter_eps"])
            except Exception as exc:  # noqa: BLE001
                print(f"{name} {recipe}: data/reference failed: {_error_text(exc)}", file=sys.stderr, flush=True)
                report["results"] += [dict(base, impl=i, kind=k, status="error", error=_error_text(exc))
                                      for i in impls for k in kinds]
                continue
            group = dict(base, **stats, ref_loss=ref[0], drop_de=ref[3][0], drop_dc=ref[3][1], round_loss=ref[4][0],
                         round_de=ref[4][1], round_dc=ref[4][2])
            report["data"].append(group)
            print(data_line(group), file=sys.stderr, flush=True)
            for impl in impls:
                for kind in kinds:
                    row = run_row(base, impl, kind, e, c, targets, ref, cfg, clock)
                    report["results"].append(row)
                    print(" | ".join(_cells(row)), file=sys.stderr, flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
            del e, c, targets, ref
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report["results"]))
    print()
    print("\n".join(data_line(g) for g in report["data"]))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
