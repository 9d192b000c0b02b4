"""The benchmark command (``python -m cce_jax.benchmark``) on a CPU at tiny, unaligned shapes.

Speed is never asserted. What is checked: the data recipes are what they claim, the float32 reference agrees
with an independent float64 NumPy computation, the command's table / JSON / CSV / markdown carry the promised
fields, the correctness column passes correct implementations and fails wrong ones, and an implementation that
raises becomes an error row without stopping the run.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cce_jax import bench_data, bench_impls, bench_runner, benchmark

# N, D, V: V prime, D not a multiple of any block.
N, D, V = 72, 40, 131
SHAPE_ARGS = ["--n", str(N), "--d", str(D), "--v", str(V)]


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def _softmax64(e, c):
    z = _f64(e) @ _f64(c).T
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return z, p / p.sum(axis=1, keepdims=True)


def test_data_recipes_match_their_description():
    flat = bench_data.make_data("flat", N, D, V, "bf16", seed=1)
    peaked = bench_data.make_data("peaked", N, D, V, "bf16", seed=1)
    lm = bench_data.make_data("lm", N, D, V, "bf16", seed=1)
    for data in (flat, peaked, lm):
        assert data.e.shape == (N, D) and data.c.shape == (V, D)
        assert data.e.dtype == jnp.bfloat16 and data.c.dtype == jnp.bfloat16
        assert data.targets.shape == (N,) and data.targets.dtype == jnp.int32
        t = np.asarray(data.targets)
        assert t.min() >= 0 and t.max() < V
        # The recorded entropy is that of the generated (bf16) data's softmax.
        z, p = _softmax64(data.e, data.c)
        entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
        np.testing.assert_allclose(data.stats["entropy_mean"], entropy.mean(), rtol=1e-4)
        np.testing.assert_allclose(data.stats["top_prob_mean"], p.max(axis=1).mean(), rtol=1e-4)
    # flat: O(1) logits (std ~1 around each row's mean).
    z, _ = _softmax64(flat.e, flat.c)
    assert 0.8 < z.std(axis=1).mean() < 1.2
    # peaked: Apple's c[:N] = e, so row i's largest logit is column i.
    np.testing.assert_array_equal(np.asarray(peaked.c[:N]), np.asarray(peaked.e))
    z, _ = _softmax64(peaked.e, peaked.c)
    np.testing.assert_array_equal(z.argmax(axis=1), np.arange(N))
    # lm: the prior features are constant in e, and the entropy sits far below flat's.
    k = bench_data._lm_prior_features(D)
    np.testing.assert_array_equal(np.asarray(lm.e[:, :k], np.float32), 1.0)
    assert lm.stats["entropy_mean"] < flat.stats["entropy_mean"] - 1.0


def test_lm_targets_follow_the_softmax():
    lm = bench_data.make_data("lm", N, D, V, "bf16", seed=2)
    _, p = _softmax64(lm.e, lm.c)
    nll = -np.log(p[np.arange(N), np.asarray(lm.targets)])
    # Targets drawn from each row's softmax: E[nll_i] = entropy_i and Var[nll_i] = E[log^2 p] - entropy_i^2.
    entropy = -(p * np.log(p)).sum(axis=1)
    var = (p * np.log(p) ** 2).sum(axis=1) - entropy**2
    assert abs(nll.mean() - entropy.mean()) < 4 * np.sqrt(var.sum()) / N
    # Uniform targets would cost far more: the mean of -log p over the vocabulary.
    assert nll.mean() < -np.log(p).mean() - 1.0


def test_reference_matches_float64_numpy(rng):
    e = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((V, D)) / np.sqrt(D), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    eps = 2.0**-8
    loss, (de, dc, (drop_e, drop_c)) = bench_impls.reference(e, c, targets, grads=True, eps=eps)

    z, p = _softmax64(e, c)
    t = np.asarray(targets)
    lse = np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(float(loss), np.mean(lse - z[np.arange(N), t]), rtol=1e-6)
    g = p.copy()
    g[np.arange(N), t] -= 1.0
    np.testing.assert_allclose(_f64(de), g @ _f64(c) / N, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_f64(dc), g.T @ _f64(e) / N, rtol=1e-4, atol=1e-7)
    dropped = np.where(np.abs(g) < eps, g, 0.0)
    want_e = np.linalg.norm(dropped @ _f64(c)) / np.linalg.norm(g @ _f64(c))
    want_c = np.linalg.norm(dropped.T @ _f64(e)) / np.linalg.norm(g.T @ _f64(e))
    assert want_e > 1e-3  # eps chosen so the bound is not trivially zero
    np.testing.assert_allclose([float(drop_e), float(drop_c)], [want_e, want_c], rtol=1e-4)


def test_command_runs_checks_and_writes_results(tmp_path, capsys):
    out_json, out_csv, out_md = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.md"
    argv = [*SHAPE_ARGS, "--impl", "xla,baseline", "--kind", "fw", "--kind", "fw-bw", "--data", "flat,lm",
            "--iters", "3", "--warmup", "1", "--no-isolate",
            "--json", str(out_json), "--csv", str(out_csv), "--markdown", str(out_md)]
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()

    report = json.loads(out_json.read_text())
    meta = report["metadata"]
    for key in ("date", "device_kind", "jax_version", "git_commit", "command", "dtype", "iters", "tolerances"):
        assert meta[key] not in (None, ""), key
    assert meta["device_kind"] == jax.devices()[0].device_kind
    assert meta["jax_version"] == jax.__version__
    assert meta["command"].startswith("python -m cce_jax.benchmark --n 72")

    rows = report["results"]
    combos = {(r["data"], r["impl"], r["kind"]) for r in rows}
    assert combos == {(d, i, k) for d in ("flat", "lm") for i in ("xla", "baseline") for k in ("fw", "fw-bw")}
    groups = {g["data"]: g for g in report["data"]}
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert (r["n"], r["d"], r["v"], r["dtype"]) == (N, D, V, "bf16")
        assert len(r["times_ms"]) == 3 and r["median_ms"] > 0
        assert r["temp_mb"] is not None and r["temp_mb"] >= 0
        assert r["peak_mb"] is None  # no memory statistics on a CPU
        assert r["det"] is True
        assert r["ok"] is True, r
        ref = groups[r["data"]]["ref_loss"]
        # the baseline rounds its logits to bf16 and is judged by the half-logit tolerances
        loss_tol = bench_impls.HALF_LOGIT_TOLERANCES[0] if r["impl"] == "baseline" else 1e-4
        assert abs(r["loss"] - ref) <= loss_tol * abs(ref)
        assert r["loss_err"] <= r["tol_loss"]
        if r["kind"] == "fw-bw":
            assert 0 < r["de_err"] <= r["tol_de"] and 0 < r["dc_err"] <= r["tol_dc"]
            # the baseline does not filter, so it gets no filtering allowance
            if r["impl"] == "baseline":
                assert r["tol_de"] == r["tol_dc"] == bench_impls.HALF_LOGIT_TOLERANCES[1]
        else:
            assert r["de_err"] is None and r["dc_err"] is None
    assert 1.0 < groups["lm"]["entropy_mean"] < groups["flat"]["entropy_mean"]

    # stdout: the table (header + one line per row) and the data lines; stderr: one progress line per row
    table = captured.out.splitlines()
    assert table[0].split() == ["shape", "data", "impl", "kind", "ms", "temp", "MB", "peak", "MB", "loss", "err",
                                "ok", "det"]
    assert sum(" pass " in line for line in table) == len(rows)
    assert sum(line.startswith("[") for line in captured.err.splitlines()) == len(rows)
    assert "entropy" in captured.out

    with open(out_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"median_ms", "temp_mb", "peak_mb", "loss", "err", "ok", "det", "date", "git_commit"} <= set(csv_rows[0])
    md = out_md.read_text()
    assert md.count("\n| 72x40x131 |") == len(rows) and meta["command"] in md


def test_rounds_interleave_the_rows(tmp_path, monkeypatch):
    """``--rounds 3``: every row makes its timed calls once per round, the rows of a data set in turn, and reports
    the median of all of them."""
    order = []
    time_row = bench_runner.Worker._time_row

    def spy(self, run, data):
        order.append(run["row"]["impl"])
        return time_row(self, run, data)

    monkeypatch.setattr(bench_runner.Worker, "_time_row", spy)
    out_json = tmp_path / "r.json"
    argv = [*SHAPE_ARGS, "--impl", "xla,baseline", "--kind", "fw", "--data", "flat", "--iters", "2", "--warmup", "1",
            "--rounds", "3", "--no-isolate", "--json", str(out_json)]
    assert benchmark.main(argv) == 0
    assert order == ["xla", "baseline"] * 3
    report = json.loads(out_json.read_text())
    assert report["metadata"]["rounds"] == 3
    for r in report["results"]:
        assert r["status"] == "ok" and r["ok"] is True and r["det"] is True, r
        assert len(r["times_ms"]) == 6 and r["median_ms"] == np.median(r["times_ms"])


def _wrong_loss(e, c, targets):
    """Right gradient direction, 3% too large, and a loss 1e-3 too high: both must be caught."""
    loss = bench_impls.baseline_f32_loss(e, c, targets)
    return loss + 0.03 * (loss - lax.stop_gradient(loss)) + 1e-3 * lax.stop_gradient(loss)


def test_wrong_and_failing_impls_are_reported(tmp_path, monkeypatch, capsys):
    traced = []

    def raising_loss(e, c, targets):
        traced.append(1)
        raise NotImplementedError("this implementation is missing")

    monkeypatch.setitem(bench_impls.IMPL_REGISTRY, "wrong", bench_impls.Impl(_wrong_loss))
    monkeypatch.setitem(bench_impls.IMPL_REGISTRY, "missing", bench_impls.Impl(raising_loss))
    out_json = tmp_path / "r.json"
    argv = [*SHAPE_ARGS, "--impl", "missing,wrong,dense", "--data", "flat,lm", "--iters", "2", "--warmup", "1",
            "--no-isolate", "--json", str(out_json)]
    assert benchmark.main(argv) == 0
    rows = {(r["data"], r["impl"], r["kind"]): r for r in json.loads(out_json.read_text())["results"]}
    for data in ("flat", "lm"):
        for kind in ("fw", "fw-bw"):
            missing = rows[data, "missing", kind]
            assert missing["status"] == "error" and "NotImplementedError" in missing["error"]
            wrong = rows[data, "wrong", kind]
            assert wrong["status"] == "ok" and wrong["ok"] is False
            np.testing.assert_allclose(wrong["loss_err"], 1e-3, rtol=0.05)
            assert rows[data, "dense", kind]["ok"] is True  # the run went on after the error
        wrong = rows[data, "wrong", "fw-bw"]
        np.testing.assert_allclose([wrong["de_err"], wrong["dc_err"]], 0.03, rtol=0.2)
    assert len(traced) == 2  # a failed compile is remembered per (shape, impl, kind), not retried per data set
    out = capsys.readouterr().out
    assert "FAIL" in out and "error: NotImplementedError" in out


def test_isolated_run_reports_from_child_process(tmp_path):
    out_json = tmp_path / "r.json"
    argv = [*SHAPE_ARGS, "--impl", "baseline_f32", "--kind", "fw", "--data", "peaked", "--iters", "2", "--warmup",
            "1", "--json", str(out_json)]
    assert benchmark.main(argv) == 0
    report = json.loads(out_json.read_text())
    assert report["metadata"]["isolate"] is True
    assert report["metadata"]["device_kind"] == jax.devices()[0].device_kind
    (row,) = report["results"]
    assert row["status"] == "ok" and row["ok"] is True and row["impl"] == "baseline_f32"
    assert report["data"][0]["ref_loss"] == pytest.approx(row["loss"], rel=1e-4)


def test_peak_is_measured_above_the_ballast_once_per_impl_and_kind(monkeypatch):
    # A CPU has no allocator statistics, so script them: 400 B in use and a 1000 B peak before the row; the
    # ballast must be asked for the 600 B gap; the call then lifts the peak 300 B above the ballast.
    mib = 2**20
    script = iter([
        {"bytes_in_use": 400 * mib, "peak_bytes_in_use": 1000 * mib, "bytes_limit": 10**12},  # before
        {"bytes_in_use": 1000 * mib, "peak_bytes_in_use": 1000 * mib, "bytes_limit": 10**12},  # ballast in place
        {"bytes_in_use": 1000 * mib, "peak_bytes_in_use": 1300 * mib, "bytes_limit": 10**12},  # after the call
    ])
    asked = []
    monkeypatch.setattr(bench_runner, "_memory_stats", lambda device: next(script))
    monkeypatch.setattr(bench_runner, "_ballast", lambda device, stats, need: asked.append((stats, need)) or [])
    cfg = {"impls": ["baseline"], "kinds": ["fw-bw"], "dtype": "bf16", "seed": 0, "iters": 1, "warmup": 1}
    worker = bench_runner.Worker(cfg)
    records = []
    worker.run_group(["tiny", N, D, V], "flat", records.append)
    worker.run_group(["tiny", N, D, V], "lm", records.append)  # same executable: peak not measured again
    rows = [r for r in records if r["type"] == "row"]
    assert [r["peak_mb"] for r in rows] == [300.0, 300.0]
    ((stats, need),) = asked
    assert stats["peak_bytes_in_use"] - stats["bytes_in_use"] == 600 * mib
    analysis = worker.compiled[(N, D, V, "bf16", "baseline", "fw-bw")].memory_analysis()
    assert need == analysis.temp_size_in_bytes + analysis.output_size_in_bytes > 0


@pytest.mark.parametrize("gap", [0, 255, 256, 1000, 3 * 2**30 + 2**29 + 2**12 + 300])
def test_ballast_sizes_fill_the_gap(gap):
    sizes = bench_runner.ballast_sizes(gap)
    assert sum(sizes) == gap - gap % 256
    small = [s for s in sizes if s < 2**30]
    assert len(set(small)) == len(small) and all(s & (s - 1) == 0 for s in small)


@pytest.mark.parametrize(
    "argv",
    [["--impl", "nope"], ["--data", "flat,zipf"], ["--n", "8", "--d", "4"], ["--kind", "bw"], ["--iters", "0"],
     ["--rounds", "0"]],
)
def test_bad_arguments_are_rejected(argv):
    with pytest.raises(SystemExit):
        benchmark.main(argv)


def test_peer_script_mirrors_the_benchmark_constants():
    # benchmarks/peers_torch.py runs without jax, so it repeats the shapes, recipe constants and tolerances;
    # read them without importing torch.
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "benchmarks" / "peers_torch.py"
    values = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    assert values["SHAPES"] == benchmark.SHAPES
    assert values["DATA_RECIPES"] == bench_data.DATA_RECIPES and values["KINDS"] == benchmark.KINDS
    assert values["TOLERANCES"] == bench_impls.TOLERANCES
    assert values["FILTER_ALLOWANCE"] == bench_impls.FILTER_ALLOWANCE
    for name in ("LM_ZIPF_EXPONENT", "LM_NOISE_STD", "LM_PRIOR_FEATURES"):
        assert values[name] == getattr(bench_data, name), name


def test_variant_table_makes_the_library_run_the_variant(tmp_path, monkeypatch):
    """benchmarks/variant_table.py writes a tuning table whose entries (this device kind, every half-precision
    shape class) are the built-in config with the overrides, which ``default_config`` then returns; a malformed
    override names itself."""
    import importlib.util
    from pathlib import Path

    import jax.numpy as jnp

    from cce_jax import cce

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "variant_table.py"
    spec = importlib.util.spec_from_file_location("cce_variant_table", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    table = tmp_path / "variant.json"
    assert tool.main([str(table), "mosaic.cluster=2", "mosaic_chunk.stages=4"]) == 0
    monkeypatch.delenv(cce.TUNING_FILE_ENV, raising=False)
    built_ins = {d: cce.default_config(d, jnp.bfloat16) for d in (512, 2304, 4096)}
    monkeypatch.setenv(cce.TUNING_FILE_ENV, str(table))
    for d, built_in in built_ins.items():
        got = cce.default_config(d, jnp.bfloat16)
        assert got.mosaic == dataclasses.replace(built_in.mosaic, cluster=2)
        assert got.mosaic_chunk == dataclasses.replace(built_in.mosaic_chunk, stages=4)
        assert got.forward == built_in.forward and got.backward == built_in.backward
    for bad in ("mosaic.cluster", "cluster=2", "nothing.cluster=2"):
        with pytest.raises(ValueError, match="FIELD.ATTR=VALUE"):
            tool.override(cce.DEFAULT, [bad])

    # --best-of: the config of a mosaic_gpu_check run with the lowest time summed over its shapes; debug entries
    # and configs missing a shape (or failing there) do not count.
    from pallas_kernels.mosaic_forward import MosaicForwardConfig

    fast = MosaicForwardConfig(block_n=128, block_v=256, block_d=96, stages=3, wg_split="n", async_wgmma=True)
    configs = {"default": dataclasses.asdict(cce.DEFAULT.mosaic), "fast": dataclasses.asdict(fast),
               "partial": dataclasses.asdict(MosaicForwardConfig(cluster=2))}
    timing = [dict(shape=s, impl=f"mosaic {k}", ms=ms) for s, k, ms in (
        ("gemma2", "default", 15.0), ("llama3", "default", 13.0), ("gemma2", "fast", 14.9), ("llama3", "fast", 12.9),
        ("gemma2", "default-matmul-only", 9.0), ("llama3", "default-matmul-only", 9.0), ("gemma2", "partial", 1.0))]
    timing.append(dict(shape="llama3", impl="mosaic partial", error="failed"))
    run = tmp_path / "mosaic.json"
    run.write_text(json.dumps({"configs": configs, "timing": timing}))
    name, overrides = tool.best_of(str(run))
    assert name == "fast"
    best_table = tmp_path / "best.json"
    assert tool.main([str(best_table), "--best-of", str(run), "mosaic_chunk.stages=4"]) == 0
    monkeypatch.setenv(cce.TUNING_FILE_ENV, str(best_table))
    for d in (512, 4096):
        got = cce.default_config(d, jnp.bfloat16)
        assert got.mosaic == fast and got.mosaic_chunk.stages == 4


def test_kernel_breakdown_times_blocked_and_pipelined_calls(tmp_path):
    """benchmarks/kernel_breakdown.py: the ``kernel`` variant is the sum of the forward kernel's lse (against
    float64 NumPy at an unaligned shape), and every row carries blocked and pipelined wall times per call (on a
    CPU the trace has no GPU kernels, which the row reports as its error)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_breakdown.py"
    spec = importlib.util.spec_from_file_location("cce_kernel_breakdown", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    rng = np.random.default_rng(3)
    e = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    c = jnp.asarray(rng.standard_normal((V, D)) / np.sqrt(D), jnp.bfloat16)
    t = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    z, _ = _softmax64(e, c)  # rows shifted by their max
    want = (_f64(e) @ _f64(c).T).max(axis=1) + np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(float(tool.forward_kernel_loss(e, c, t)), want.sum(), rtol=1e-5)

    out = tmp_path / "breakdown.json"
    assert tool.main(["--shape", "small", "--data", "flat", "--variant", "baseline,kernel", "--kind", "fw",
                      "--iters", "2", "--trace-calls", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "kernel"]
    for r in rows:
        assert r["ms"] > 0 and r["pipelined_ms"] > 0, r
    assert tool.main(["--shape", "small", "--data", "flat", "--variant", "kernel", "--kind", "fw-bw",
                      "--json", str(out)]) == 0
    assert "use --kind fw" in json.loads(out.read_text())["rows"][0]["error"]
