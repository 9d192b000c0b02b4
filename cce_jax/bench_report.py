"""Output of the benchmark (``python -m cce_jax.benchmark``): the console table, the markdown section, CSV and
JSON files of a run's report."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from cce_jax.bench_data import LIVE_TILES

def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def fmt_mb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def fmt_err(row: dict) -> str:
    return "-" if row.get("err") is None else f"{row['err']:.1e}"


def fmt_ok(row: dict) -> str:
    return "-" if row.get("ok") is None else ("pass" if row["ok"] else "FAIL")


def fmt_det(row: dict) -> str:
    return "-" if row.get("det") is None else ("yes" if row["det"] else "no")


def row_line(row: dict) -> str:
    head = f"{row['shape']} {row['data']} {row['impl']} {row['kind']}"
    if row["status"] != "ok":
        return f"{head}: error: {row['error']}"
    return (f"{head}: {fmt_ms(row['median_ms'])} ms, temp {fmt_mb(row['temp_mb'])} MB, peak "
            f"{fmt_mb(row['peak_mb'])} MB, loss {row['loss']:.5g}, det {fmt_det(row)}")


TABLE_COLUMNS = ("shape", "data", "impl", "kind", "ms", "temp MB", "peak MB", "loss", "err", "ok", "det")


def _cells(row: dict) -> list[str]:
    head = [row["shape"], row["data"], row["impl"], row["kind"]]
    if row["status"] != "ok":
        return [*head, f"error: {row['error']}"]
    return [*head, fmt_ms(row["median_ms"]), fmt_mb(row["temp_mb"]), fmt_mb(row["peak_mb"]), f"{row['loss']:.5g}",
            fmt_err(row), fmt_ok(row), fmt_det(row)]


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of the results; an error row carries its message in place of the numbers."""
    body = [_cells(row) for row in rows]
    widths = [len(col) for col in TABLE_COLUMNS]
    for cells in body:
        widths = [max(w, len(cell)) for w, cell in zip(widths, cells[:4] if len(cells) < len(widths) else cells)] + \
            widths[4 if len(cells) < len(widths) else len(widths):]
    lines = ["  ".join(col.ljust(w) for col, w in zip(TABLE_COLUMNS, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip() for cells in body]
    return "\n".join(lines)


def data_lines(groups: Sequence[dict]) -> list[str]:
    """One line per (shape, data) group: the softmax statistics and the reference."""
    lines = []
    for g in groups:
        dims = f"{g['n']}x{g['d']}x{g['v']}"
        name = g["shape"] if g["shape"] == dims else f"{g['shape']} ({dims})"
        text = (f"{name} {g['data']}: entropy {g['entropy_mean']:.2f} nats "
                f"(std {g['entropy_std']:.2f}), top prob {g['top_prob_mean']:.3f}, p >= eps {g['frac_p_ge_eps']:.1e}")
        live = [f"{key[5:]} {g[key]:.0%}" for key in (f"live_{r}x{c}" for r, c in LIVE_TILES) if key in g]
        if live:
            text += ", live tiles " + " / ".join(live)
        if g.get("drop_de") is not None:
            text += f", filter drop bound dE {g['drop_de']:.1e} dC {g['drop_dc']:.1e}"
        if g.get("ref_loss") is not None:
            text += f", reference loss {g['ref_loss']:.5g}"
        if g.get("ref_error"):
            text += f", reference failed: {g['ref_error']}"
        lines.append(text)
    return lines


def format_markdown(report: dict) -> str:
    """A section for benchmarks/*.md: heading with date, device, versions and commit, the command, the table."""
    meta = report["metadata"]
    lines = [
        f"### {meta['date']}: {meta['device_kind']}, jax {meta['jax_version']}, commit {meta['git_commit']}, "
        f"{meta['dtype']}",
        "",
        f"`{meta['command']}`",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in report["results"]:
        cells = [cell.replace("|", "/") for cell in _cells(row)]
        cells += [""] * (len(TABLE_COLUMNS) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Data (softmax of the generated logits):", ""]
    lines += [f"- {line}" for line in data_lines(report["data"])]
    return "\n".join(lines) + "\n\n"


CSV_FIELDS = ("shape", "n", "d", "v", "dtype", "data", "impl", "kind", "status", "error", "median_ms", "min_ms",
              "temp_mb", "peak_mb", "loss", "loss_err", "de_err", "dc_err", "err", "tol_loss", "tol_de", "tol_dc",
              "ok", "det")
CSV_META = ("date", "device_kind", "jax_version", "git_commit", "command")


def write_csv(path: str, report: dict) -> None:
    meta = report["metadata"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *CSV_META])
        writer.writeheader()
        for row in report["results"]:
            writer.writerow({**{k: row.get(k) for k in CSV_FIELDS}, **{k: meta.get(k) for k in CSV_META}})


def write_json(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
