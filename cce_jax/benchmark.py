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
- ``ok``: every error within its tolerance (:data:`cce_jax.bench_impls.TOLERANCES`). Half-precision gradients are
  rounded to 8 (bf16) or 11 (fp16) mantissa bits, which alone costs ~1e-3 relative, hence the 1e-2 / 5e-3
  gradient tolerances; float32 rows allow 2e-3 because XLA's default float32 matmul precision on GPUs is TF32,
  which the baseline uses. Gradient filtering (skipping tiles where every ``|softmax - onehot| < filter_eps``)
  changes the result by design, so implementations that filter dE or dC get, on top of the tolerance, 1.5x the
  relative size of everything an element-wise filter at that eps would drop (computed by the reference, reported
  per data set as the filter drop bound; at V 128k-256k in bf16 it is 2e-2 to 4e-2 for dE and 2e-3 to 5e-3 for dC
  on ``flat`` and ``lm`` data, ~0 on ``peaked``).
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

This module is the command: its flags, the metadata, and one child process per shape. The rest lives beside it:
:mod:`cce_jax.bench_data` (data recipes), :mod:`cce_jax.bench_impls` (implementations, reference, check),
:mod:`cce_jax.bench_runner` (the timing worker) and :mod:`cce_jax.bench_report` (table and files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from cce_jax.bench_data import DATA_RECIPES, DTYPES, LM_RECIPES
from cce_jax.bench_impls import FILTER_ALLOWANCE, IMPL_REGISTRY, TOLERANCES
from cce_jax.bench_report import data_lines, format_markdown, format_table, write_csv, write_json
from cce_jax.bench_runner import Worker, new_row

SHAPES: dict[str, tuple[int, int, int]] = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
    "small": (512, 256, 4099),
    "llama3-65k": (65536, 4096, 128256),
}
KINDS = ("fw", "fw-bw")


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
                new_row({"shape": name, "n": n, "d": d, "v": v, "dtype": cfg["dtype"], "data": left}, "-", "-"),
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
