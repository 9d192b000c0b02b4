"""examples/train.py: the CCE loss and dense logits train the same model along the same curve, step by step."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location("cce_example_train", EXAMPLES / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tokenizer_round_trip(train_module):
    text = (EXAMPLES / "data" / "shakespeare_coriolanus.txt").read_text(encoding="utf-8")
    tokenizer = train_module.BytePairTokenizer.train(text[:8000], 300)
    assert tokenizer.vocab_size == 300
    ids = tokenizer.encode(text[8000:12000])
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 300
    assert len(ids) < 4000 * 0.8  # the merges compress held-out text
    assert tokenizer.decode(ids) == text[8000:12000]
    assert tokenizer.decode(tokenizer.encode("Ünïcode ✓ survives")) == "Ünïcode ✓ survives"


def test_cce_and_dense_train_identically(train_module, tmp_path, capsys):
    plot = tmp_path / "curves.png"
    histories = train_module.main([
        "--family", "gemma2", "--d-model", "32", "--layers", "1", "--heads", "2", "--vocab", "300",
        "--steps", "8", "--batch", "4", "--seq-len", "32", "--eval-every", "4", "--lr", "1e-2",
        "--warmup", "2", "--plot", str(plot),
    ])
    cce, dense = histories["cce"], histories["dense"]
    assert len(cce.train_loss) == len(dense.train_loss) == 8
    # Same initial parameters and batches: any difference is float32 rounding, step after step.
    np.testing.assert_allclose(cce.train_loss, dense.train_loss, rtol=1e-5)
    np.testing.assert_allclose(cce.eval_loss, dense.eval_loss, rtol=1e-5)
    assert cce.eval_steps == dense.eval_steps == [4, 8]
    assert cce.train_loss[-1] < cce.train_loss[0] - 0.5  # it does learn
    assert abs(cce.train_loss[0] - math.log(300)) < 1.5  # and starts near chance
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "max |cce - dense| train loss over 8 steps" in out and str(plot) in out
