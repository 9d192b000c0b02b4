"""The README's examples run: every ```python block in order in one namespace, the ```python multi-device
blocks (vocabulary parallelism on a (2, 4) mesh) in a subprocess with 8 virtual CPU devices, and the
```python tunix blocks (each in its own namespace) when tunix is importable."""

import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(tag: str = ""):
    text = README.read_text()
    return re.findall(rf"^```python{re.escape(tag)}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_examples():
    assert len(_blocks()) >= 4
    assert len(_blocks(" multi-device")) >= 2


def test_readme_examples_run():
    namespace: dict = {}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as err:  # name the block: a README example that fails is a documentation bug
            raise AssertionError(f"README python block {i} failed: {err!r}\n{block}") from err


def test_readme_tunix_examples_run():
    pytest.importorskip("tunix.models.gemma.model", exc_type=ImportError)
    blocks = _blocks(" tunix")
    assert blocks
    for i, block in enumerate(blocks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Tunix 0.1.7 on flax 0.12 / jax 0.11
            try:
                exec(compile(block, f"README.md tunix block {i}", "exec"), {})
            except Exception as err:
                raise AssertionError(f"README python tunix block {i} failed: {err!r}\n{block}") from err


def test_readme_multi_device_examples_run():
    first, second = _blocks(" multi-device")[:2]
    # Each block's loss against the single-device loss of the same tokens and classifier rows.
    code = first + """
import numpy as _np
jit_loss = float(loss)
jit_ref = float(cce_jax.linear_cross_entropy(_np.asarray(e), _np.asarray(c)[:V], _np.asarray(tokens), shift=1))
""" + second + """
print("RESULT", jit_loss, jit_ref, float(loss_fn(e, c, tokens)),
      float(cce_jax.linear_cross_entropy(_np.asarray(e), c_full, _np.asarray(tokens), shift=1)))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    words = proc.stdout.split()
    jit_loss, jit_ref, shard_map_loss, shard_map_ref = (float(x) for x in words[words.index("RESULT") + 1:][:4])
    assert abs(jit_loss - jit_ref) <= 1e-5 * abs(jit_ref)
    assert abs(shard_map_loss - shard_map_ref) <= 1e-5 * abs(shard_map_ref)
