"""What a new user meets first: impl="auto" off a GPU, the kernels on a CPU, check_targets errors, negative
weights, traced static options, the autotune CLI without a GPU, and the flax modules without flax."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import api, autotune, checks
from cce_jax import dense as dense_lib
from cce_jax import xla as xla_lib
from reference import check_against_reference, make_inputs, reference_loss

ROOT = Path(__file__).resolve().parent.parent
N, D, V = 23, 19, 37
BLOCKS = cce_jax.XlaConfig(block_n=8, block_v=16)


# --------------------------------------------------------------------------------------------------------------
# impl="auto"
# --------------------------------------------------------------------------------------------------------------


def test_auto_threshold_off_gpu():
    limit = cce_jax.AUTO_DENSE_MAX_LOGIT_BYTES // 4  # float32 logit entries that still go dense
    assert api._resolve_impl("auto", jnp.float32, None, num_logits=limit) == ("dense", None)
    assert api._resolve_impl("auto", jnp.float32, None, num_logits=limit + 1) == ("xla", None)
    assert api._resolve_impl("auto", jnp.bfloat16, None, num_logits=512 * 5003) == ("dense", None)
    assert api._resolve_impl("auto", jnp.float32, None) == ("xla", None)  # size unknown: the bounded path


def test_auto_on_gpu_keeps_kernels(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert api._resolve_impl("auto", jnp.bfloat16, None, num_logits=10) == ("cce", None)
    # float64 (no kernels) and interpret=True stay on the blockwise XLA path on a GPU, whatever the size.
    assert api._resolve_impl("auto", jnp.float64, None, num_logits=10) == ("xla", None)
    assert api._resolve_impl("auto", jnp.float32, True, num_logits=10) == ("xla", None)


@pytest.fixture
def spy_impls(monkeypatch):
    """Records which implementation's token_stats ran."""
    ran = []
    for name, lib, entry in (("dense", dense_lib, "token_stats"), ("xla", xla_lib, "token_stats"),
                             ("xla", xla_lib, "training_impl")):
        original = getattr(lib, entry)

        def spy(*args, _original=original, _name=name, **kwargs):
            ran.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(lib, entry, spy)
    return ran


@pytest.mark.parametrize("limit_entries, expected", [(N * V, "dense"), (N * V - 1, "xla")])
def test_auto_runs_the_chosen_impl_and_matches_reference(rng, monkeypatch, spy_impls, limit_entries, expected):
    """At the threshold "auto" runs dense, one entry below it xla; both match the float64 reference."""
    monkeypatch.setattr(checks, "AUTO_DENSE_MAX_LOGIT_BYTES", 4 * limit_entries)
    inputs = make_inputs(rng, (N,), D, V, jnp.float32, bias=True, weights=True)
    check_against_reference(inputs, rng, impl="auto", softcap=3.0, label_smoothing=0.1, what=f"auto={expected}")
    assert set(spy_impls) == {expected}


# --------------------------------------------------------------------------------------------------------------
# The kernels off a GPU
# --------------------------------------------------------------------------------------------------------------

E = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
C = jnp.asarray(np.random.default_rng(1).standard_normal((V, 16)) / 4, jnp.float32)
T = jnp.arange(8, dtype=jnp.int32)


@pytest.mark.parametrize("impl", ["cce", "cce_exact", cce_jax.KernelConfig()], ids=["cce", "cce_exact", "config"])
def test_interpret_false_needs_a_gpu(impl):
    with pytest.raises(ValueError, match=r"^interpret=False needs a GPU: the default backend is 'cpu'"):
        cce_jax.linear_cross_entropy(E, C, T, impl=impl, interpret=False)
    with pytest.raises(ValueError, match=r"interpret=False needs a GPU"):  # at trace time, under jit too
        jax.jit(lambda e: cce_jax.linear_cross_entropy(e, C, T, impl=impl, interpret=False)).trace(E)


def test_interpret_false_ignored_by_pure_jax_impls():
    for impl in ("auto", "xla", "dense"):
        assert np.isfinite(float(cce_jax.linear_cross_entropy(E, C, T, impl=impl, interpret=False)))


def test_interpret_mode_warns_once(monkeypatch):
    monkeypatch.setattr(checks, "_interpret_warned", False)
    f = jax.jit(lambda e: cce_jax.linear_cross_entropy(e, C, T, impl="cce"))
    with pytest.warns(UserWarning, match=r"impl='cce' on the 'cpu' backend runs the Pallas kernels in interpret "
                                         r"mode.*use impl=\"xla\" or \"auto\""):
        expected = float(f(E))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = float(jax.jit(lambda e: cce_jax.linear_cross_entropy(e, C, T, impl="cce_exact"))(E))
    assert not [w for w in caught if "interpret mode" in str(w.message)], "warned twice"
    assert loss == pytest.approx(expected, rel=1e-5)


def test_explicit_interpret_does_not_warn(monkeypatch):
    monkeypatch.setattr(checks, "_interpret_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cce_jax.linear_cross_entropy(E, C, T, impl="cce", interpret=True)


# --------------------------------------------------------------------------------------------------------------
# check_targets
# --------------------------------------------------------------------------------------------------------------

BAD = T.at[3].set(12345)
MESSAGE = r"targets: 1 target id\(s\) outside \[0, 37\) that are not ignore_index; first offending value 12345"


def _checked(e, c, t):
    return cce_jax.linear_cross_entropy(e, c, t, check_targets=True)


def test_check_targets_eager_raises_our_error(caplog, capfd):
    with caplog.at_level(logging.WARNING):
        with pytest.raises(cce_jax.TargetsOutOfRangeError, match="^" + MESSAGE + "$") as info:
            _checked(E, C, BAD)
        # concrete targets under grad (not jit) are checked the same way
        with pytest.raises(cce_jax.TargetsOutOfRangeError, match="^" + MESSAGE):
            jax.grad(_checked)(E, C, BAD)
    assert isinstance(info.value, ValueError)
    assert not [r for r in caplog.records if r.name.startswith("jax")], caplog.records
    assert "callback failed" not in capfd.readouterr().err


def test_check_targets_jit_message_and_no_log_noise(caplog, capfd):
    with caplog.at_level(logging.WARNING):
        with pytest.raises(jax.errors.JaxRuntimeError) as info:
            jax.block_until_ready(jax.jit(_checked)(E, C, BAD))
    text = str(info.value)
    assert text.rstrip().splitlines()[-1].endswith("TargetsOutOfRangeError: " + MESSAGE.replace("\\", "")), text
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert "callback failed" not in capfd.readouterr().err
    # in-range and ignored targets pass under jit
    good = T.at[2].set(-100)
    loss = jax.jit(_checked)(E, C, good)
    assert float(loss) == pytest.approx(float(reference_loss(E, C, good).loss), rel=1e-5)


def test_other_callback_failures_are_still_logged(caplog):
    def fail(x):
        raise RuntimeError("some other callback")

    with caplog.at_level(logging.ERROR):
        with pytest.raises(Exception, match="some other callback"):
            jax.block_until_ready(jax.jit(lambda x: (jax.debug.callback(fail, x), x)[1])(jnp.int32(1)))
    assert any("callback failed" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# weights >= 0
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_concrete_negative_weights_rejected(kind):
    w = np.ones(8, np.float32)
    w[[2, 5]] = [-0.5, -2.0]
    w = jnp.asarray(w) if kind == "jax" else w
    with pytest.raises(ValueError, match=r"^weights must be >= 0, got 2 negative value\(s\) \(smallest -2.0\)"):
        cce_jax.linear_cross_entropy(E, C, T, weights=w)
    with pytest.raises(ValueError, match=r"^weights must be >= 0"):  # a constant captured by a jitted function
        jax.jit(lambda e: cce_jax.linear_cross_entropy(e, C, T, weights=w))(E)


def test_traced_negative_weights_used_as_given(rng):
    """Under jit a negative weight just scales its token's loss: sum(w * nll) and sum(w * nll) / sum(w)."""
    inputs = make_inputs(rng, (N,), D, V, jnp.float32, ignore_frac=0.0)
    w = rng.uniform(0.5, 2.0, N).astype(np.float32)
    w[[1, 4]] = [-0.75, -1.5]
    for reduction in ("sum", "mean", "none"):
        loss = jax.jit(lambda e, c, t, w, r=reduction: cce_jax.linear_cross_entropy(
            e, c, t, weights=w, reduction=r, impl=BLOCKS))(inputs.e, inputs.c, inputs.targets, w)
        ref = reference_loss(inputs.e, inputs.c, inputs.targets, weights=w, reduction=reduction)
        np.testing.assert_allclose(np.asarray(loss), ref.loss, rtol=2e-5, atol=1e-5, err_msg=reduction)


# --------------------------------------------------------------------------------------------------------------
# Static options given traced values
# --------------------------------------------------------------------------------------------------------------

STATIC = [("softcap", 30.0, "float or None"), ("label_smoothing", 0.1, "float"), ("ignore_index", -100, "int"),
          ("shift", 1, "int or bool"), ("filter_eps", 1e-3, r'float, "auto" or None'), ("return_lse", True, "bool"),
          ("check_targets", True, "bool")]
TRACED_ONLY = [("reduction", r'str \("mean", "sum" or "none"\)'), ("classifier_layout", r'str \("vd" or "dv"\)')]


@pytest.mark.parametrize("name, value, expected", STATIC, ids=[s[0] for s in STATIC])
def test_traced_static_option_says_static(name, value, expected):
    f = jax.jit(lambda x: cce_jax.linear_cross_entropy(E, C, T, **{name: x}))
    with pytest.raises(TypeError, match=rf"^{name} must be a static Python {expected}, not a traced value"):
        f(value)
    # and the same value as a constant is accepted
    jax.jit(lambda e: cce_jax.linear_cross_entropy(e, C, T, **{name: value}))(E)


@pytest.mark.parametrize("name, expected", TRACED_ONLY, ids=[s[0] for s in TRACED_ONLY])
def test_traced_string_option_says_static(name, expected):
    with pytest.raises(TypeError, match=rf"^{name} must be a static Python {expected}, not a traced value"):
        jax.jit(lambda x: cce_jax.linear_cross_entropy(E, C, T, **{name: x}))(1)


# --------------------------------------------------------------------------------------------------------------
# python -m cce_jax.autotune
# --------------------------------------------------------------------------------------------------------------


def test_autotune_without_gpu_stops(capsys):
    with pytest.raises(SystemExit) as info:
        autotune.main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no GPU (the default JAX backend is 'cpu')" in err and "--interpret" in err


def test_autotune_runs_off_gpu_with_a_shape_or_interpret(monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "tune", lambda n, d, v, dtype, iters, log, kernels: calls.append(
        (n, d, v, kernels)) or {"best": {}, "entry": None})
    autotune.main(["--n", "64", "--d", "32", "--v", "100"])
    autotune.main(["--interpret", "--kernels", "mosaic"])
    assert calls == [(64, 32, 100, "all"), (8192, 2304, 256000, "mosaic")]


def test_autotune_mosaic_off_hopper_keeps_the_table_config(tmp_path):
    """--kernels mosaic without a Hopper GPU times nothing, says so, and its table entry is the current config
    (every block config, Mosaic ones included), which the tuning-file reader turns back into that config."""
    from cce_jax import cce

    logged = []
    results = autotune.tune(64, 32, 100, jnp.bfloat16, iters=1, log=logged.append, kernels="mosaic")
    assert any("mosaic: skipped" in line for line in logged), logged
    entry = results["entry"]
    assert set(entry["config"]) == {"forward", "backward", "mosaic", "mosaic_chunk", "mosaic_sparse_de"}
    path = tmp_path / "table.json"
    autotune.save_entry(str(path), entry)
    assert cce._tuning_file(str(path))[(entry["device_kind"], entry["shape_class"])] == cce.default_config(
        32, jnp.bfloat16)
    with pytest.raises(ValueError, match="kernels must be one of"):
        autotune.tune(64, 32, 100, jnp.bfloat16, kernels="cuda")


def test_autotune_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        autotune.main(["--help"])
    out = capsys.readouterr().out
    for flag, default in [("--n", "8192"), ("--d", "2304"), ("--v", "256000"), ("--dtype", "bf16"),
                          ("--iters", "5"), ("--json", "None"), ("--per-kernel", "False"), ("--save", "None"),
                          ("--interpret", "False"), ("--kernels", "all")]:
        line = out[out.index(f"  {flag} "):]
        assert f"(default: {default})" in " ".join(line.split("\n  -")[0].split()), (flag, line[:200])


# --------------------------------------------------------------------------------------------------------------
# The flax modules without flax
# --------------------------------------------------------------------------------------------------------------


def test_flax_modules_name_the_extra_without_flax():
    code = """
import sys
sys.modules["flax"] = None  # as if flax were not installed
import cce_jax
assert cce_jax.linear_cross_entropy is not None
for name in ("cce_jax.nnx", "cce_jax.linen", "cce_jax.models"):
    try:
        __import__(name)
    except ImportError as err:
        assert type(err) is ImportError, type(err)
        assert str(err).startswith(name + ' needs flax') and 'pip install "cce-jax[flax]"' in str(err), err
    else:
        raise AssertionError(name + " imported without flax")
print("OK")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
