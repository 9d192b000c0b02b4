"""Train a small decoder on bundled Shakespeare twice, with the CCE loss and with dense logits, and compare.

    python examples/train.py                      # the demo: both losses, ~2 minutes on a 2-core CPU
    python examples/train.py --loss cce --family gemma2 --size base --steps 2000 --batch 32 \
        --seq-len 512 --vocab 2048 --dtype bfloat16    # on a GPU

Both runs start from the same parameters and see the same batches, so their loss curves should coincide
(the CCE paper's convergence claim): the summary prints the largest step-wise difference and the plot shows
both curves and the difference. The tokenizer is a byte-level BPE trained at start-up on the corpus, so nothing
is downloaded. The model is :class:`cce_jax.models.Decoder`; its loss goes through
:class:`cce_jax.nnx.LinearCrossEntropyHead` (``--loss cce``) or through the same head's logits and
``optax.softmax_cross_entropy_with_integer_labels`` (``--loss dense``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cce_jax import cce as cce_lib
from cce_jax.models import FAMILIES, Decoder, family_config

CORPUS = Path(__file__).resolve().parent / "data" / "shakespeare_coriolanus.txt"
SIZES = {  # d_model, layers, heads
    "tiny": (64, 2, 4),
    "small": (128, 4, 4),
    "base": (512, 8, 8),
    "large": (1024, 16, 16),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the corpus at start-up.

_PRETOKEN = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def _merge_word(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class BytePairTokenizer:
    """Byte-level BPE: ids 0..255 are bytes, each later id merges a pair; merges never cross pre-tokens."""

    def __init__(self, merges: Sequence[tuple[int, int]]):
        self.merges = list(merges)
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self.pieces = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BytePairTokenizer":
        """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: the smallest pair)."""
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        counts = collections.Counter(_PRETOKEN.findall(text))
        words = {tuple(w.encode("utf-8")): n for w, n in counts.items()}
        merges: list[tuple[int, int]] = []
        while 256 + len(merges) < vocab_size:
            pairs: collections.Counter = collections.Counter()
            for word, n in words.items():
                for pair in zip(word, word[1:]):
                    pairs[pair] += n
            if not pairs:
                break
            best = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
            new_id = 256 + len(merges)
            merges.append(best)
            words = {(_merge_word(w, best, new_id) if best[0] in w else w): n for w, n in words.items()}
        return cls(merges)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(word.encode("utf-8"))
            while len(ids) > 1:
                ranked = [(self.ranks.get(p, math.inf), p) for p in zip(ids, ids[1:])]
                rank, pair = min(ranked)
                if rank == math.inf:
                    break
                ids = _merge_word(ids, pair, int(rank))
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        return np.array([i for w in _PRETOKEN.findall(text) for i in self._encode_word(w)], np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.pieces[int(i)] for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    family: str = "llama3"
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    vocab: int = 512
    steps: int = 200
    batch: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 20
    impl: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    eval_every: int = 50
    seed: int = 0
    corpus: str = str(CORPUS)


@dataclasses.dataclass
class History:
    loss: str
    train_loss: list[float] = dataclasses.field(default_factory=list)
    eval_steps: list[int] = dataclasses.field(default_factory=list)
    eval_loss: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s: float = 0.0


def load_data(cfg: TrainConfig) -> tuple[BytePairTokenizer, np.ndarray, np.ndarray]:
    """Tokenizer trained on the first 90% of the corpus, and the token ids of both splits."""
    text = Path(cfg.corpus).read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    tokenizer = BytePairTokenizer.train(text[:split], cfg.vocab)
    return tokenizer, tokenizer.encode(text[:split]), tokenizer.encode(text[split:])


def train_batches(tokens: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """(steps, batch, seq_len) random windows, fixed by the seed so every run sees the same data."""
    if len(tokens) <= cfg.seq_len:
        raise ValueError(f"the training split has {len(tokens)} tokens, fewer than --seq-len {cfg.seq_len}")
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, len(tokens) - cfg.seq_len + 1, size=(cfg.steps, cfg.batch))
    return tokens[starts[..., None] + np.arange(cfg.seq_len)]


def eval_batches(tokens: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """Consecutive non-overlapping windows of the held-out split, grouped into batches of at most ``batch``."""
    seq = min(cfg.seq_len, len(tokens))
    windows = tokens[: len(tokens) // seq * seq].reshape(-1, seq)
    n = max(1, len(windows) // cfg.batch) * min(cfg.batch, len(windows))
    return windows[:n].reshape(-1, min(cfg.batch, len(windows)), seq)


def make_model(cfg: TrainConfig, vocab_size: int) -> Decoder:
    dcfg = family_config(
        cfg.family, vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
        dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
    )
    return Decoder(dcfg, rngs=nnx.Rngs(cfg.seed))


def token_losses(model: Decoder, tokens: jax.Array, loss: str, impl: str) -> jax.Array:
    """Per-token next-token losses (B, T - 1): through the CCE head, or dense logits and optax."""
    if loss == "cce":
        return model(tokens, tokens, reduction="none", impl=impl)
    logits = model(tokens)  # the same head, asked for its (B, T, V) float32 logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])


def mean_loss(model: Decoder, tokens: jax.Array, loss: str, impl: str) -> jax.Array:
    if loss == "cce":
        return model(tokens, tokens, impl=impl)
    return token_losses(model, tokens, loss, impl).mean()


def train(
    cfg: TrainConfig,
    loss: str,
    batches: np.ndarray,
    eval_data: np.ndarray,
    vocab_size: int,
    progress: Callable[[int, float, float, float | None], None] | None = None,
) -> History:
    """Trains a fresh model for ``len(batches)`` steps with ``loss`` ("cce" or "dense"); returns its history."""
    if loss not in ("cce", "dense"):
        raise ValueError(f'loss must be "cce" or "dense", got {loss!r}')
    model = make_model(cfg, vocab_size)
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(1, min(cfg.warmup, len(batches) - 1)), max(2, len(batches)), cfg.lr * 0.1
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)

    def objective(params, tokens):
        return mean_loss(nnx.merge(graphdef, params), tokens, loss, cfg.impl)

    @jax.jit
    def train_step(params, opt_state, tokens):
        value, grads = jax.value_and_grad(objective)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @jax.jit
    def eval_step(params, tokens):
        per_token = token_losses(nnx.merge(graphdef, params), tokens, loss, cfg.impl)
        return per_token.sum(), per_token.size

    def evaluate(params) -> float:
        total, count = 0.0, 0
        for tokens in eval_data:
            s, n = eval_step(params, tokens)
            total, count = total + float(s), count + int(n)
        return total / count

    history = History(loss)
    start = time.perf_counter()
    timed_tokens, timed_start = 0, None
    for step, tokens in enumerate(batches, 1):
        params, opt_state, value = train_step(params, opt_state, tokens)
        history.train_loss.append(float(value))
        if step == 1:
            timed_start = time.perf_counter()  # tokens/s excludes the first step, which compiles
        else:
            timed_tokens += tokens.size
        eval_loss = None
        if step % cfg.eval_every == 0 or step == len(batches):
            eval_loss = evaluate(params)
            history.eval_steps.append(step)
            history.eval_loss.append(eval_loss)
        elapsed = time.perf_counter() - timed_start
        history.tokens_per_s = timed_tokens / elapsed if timed_tokens else 0.0
        if progress is not None:
            progress(step, history.train_loss[-1], history.tokens_per_s, eval_loss)
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------------------------------------
# Command line: progress bar, summary, plot.


class ProgressBar:
    """One line redrawn in place on a terminal; a line every ~10% of the steps otherwise (logs, CI)."""

    def __init__(self, label: str, total: int, stream=sys.stdout, width: int = 24):
        self.label, self.total, self.stream, self.width = label, total, stream, width
        self.tty = stream.isatty()
        self.last_eval: float | None = None

    def __call__(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None) -> None:
        if eval_loss is not None:
            self.last_eval = eval_loss
        done = int(self.width * step / self.total)
        bar = "#" * done + "-" * (self.width - done)
        ppl = f"  eval ppl {math.exp(self.last_eval):7.2f}" if self.last_eval is not None else ""
        line = f"{self.label:<5} [{bar}] {step:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}" \
               f"  {tokens_per_s:>9,.0f} tok/s{ppl}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step == self.total or step % max(1, self.total // 10) == 0:
            print(line, file=self.stream, flush=True)


def plot(histories: dict[str, History], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415  (only the command line needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    both = "cce" in histories and "dense" in histories
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(12 if both else 6.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    styles = {"cce": dict(color="tab:blue", lw=2.2), "dense": dict(color="tab:orange", lw=1.2, ls="--")}
    for name, h in histories.items():
        steps = np.arange(1, len(h.train_loss) + 1)
        ax.plot(steps, h.train_loss, label=f"{name} train", **styles[name])
        marker = dict(marker="o", mfc="none", mew=2) if name == "cce" else dict(marker="x", mew=2)
        ax.plot(h.eval_steps, h.eval_loss, ls="none", color=styles[name]["color"], ms=8, label=f"{name} eval",
                **marker)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if both:
        diff = np.abs(np.array(histories["cce"].train_loss) - np.array(histories["dense"].train_loss))
        steps = np.arange(1, len(diff) + 1)
        ax = axes[0, 1]
        nonzero = diff > 0
        ax.semilogy(steps[nonzero], diff[nonzero], ".", color="tab:red", label="|loss_cce - loss_dense|")
        # float32 machine epsilon times the loss: differences of this size are rounding, not drift.
        eps = np.array(histories["dense"].train_loss) * 2.0**-23
        ax.semilogy(steps, eps, color="gray", lw=1, ls=":", label="float32 eps x loss")
        ax.set(xlabel="step", ylabel="absolute difference",
               title=f"difference: max {diff.max():.2e}, {int((~nonzero).sum())}/{len(diff)} steps identical")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper right", framealpha=0.9)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, list[str], Path]:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loss", choices=("cce", "dense", "both"), default="both")
    p.add_argument("--family", choices=tuple(FAMILIES), default=d.family)
    p.add_argument("--size", choices=tuple(SIZES), default="small", help="d_model/layers/heads preset")
    p.add_argument("--d-model", type=int, help="override the size preset's width")
    p.add_argument("--layers", type=int, help="override the size preset's depth")
    p.add_argument("--heads", type=int, help="override the size preset's head count")
    p.add_argument("--vocab", type=int, default=d.vocab, help="BPE vocabulary size (>= 256)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--impl", default=d.impl,
                   help='impl for --loss cce ("auto": cce kernels on a GPU, else xla: the demo compares the '
                        'blockwise loss with dense logits, so it does not let the library\'s "auto" pick dense '
                        'logits on a CPU)')
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype, help="compute dtype")
    p.add_argument("--param-dtype", choices=tuple(DTYPES), default=d.param_dtype)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--corpus", default=d.corpus, help="a UTF-8 text file")
    p.add_argument("--plot", default="out/train_loss.png", help="where to write the PNG")
    a = p.parse_args(argv)
    width, depth, heads = SIZES[a.size]
    for name in ("steps", "batch", "seq_len", "eval_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    cfg = TrainConfig(
        family=a.family, d_model=a.d_model or width, layers=a.layers or depth, heads=a.heads or heads,
        vocab=a.vocab, steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, warmup=a.warmup, impl=a.impl,
        dtype=a.dtype, param_dtype=a.param_dtype, eval_every=a.eval_every, seed=a.seed, corpus=a.corpus,
    )
    losses = ["cce", "dense"] if a.loss == "both" else [a.loss]
    return cfg, losses, Path(a.plot)


def main(argv: Sequence[str] | None = None) -> dict[str, History]:
    cfg, losses, plot_path = parse_args(argv)
    t0 = time.perf_counter()
    tokenizer, train_tokens, val_tokens = load_data(cfg)
    batches, evals = train_batches(train_tokens, cfg), eval_batches(val_tokens, cfg)
    abstract = nnx.eval_shape(lambda: make_model(cfg, tokenizer.vocab_size))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    print(f"corpus {Path(cfg.corpus).name}: {len(train_tokens):,} train / {len(val_tokens):,} eval tokens, "
          f"BPE vocab {tokenizer.vocab_size} (trained in {time.perf_counter() - t0:.1f}s)")
    impl = cfg.impl
    if impl == "auto":
        # The library's "auto" would compute dense logits off a GPU at this size; the demo is about the
        # blockwise loss, so it pins the kernels (GPU) or the XLA blockwise path.
        cfg = dataclasses.replace(cfg, impl="cce" if cce_lib.kernels_preferred(DTYPES[cfg.dtype], None) else "xla")
        impl += " -> " + cfg.impl
    print(f"model {cfg.family}: d_model {cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads, "
          f"{n_params:,} params, {cfg.dtype} compute / {cfg.param_dtype} params; backend {jax.default_backend()}, "
          f"impl {impl}; {cfg.steps} steps of {cfg.batch} x {cfg.seq_len} tokens")
    histories = {}
    for loss in losses:
        histories[loss] = train(cfg, loss, batches, evals, tokenizer.vocab_size, ProgressBar(loss, cfg.steps))

    print("\nsummary")
    print(f"  {'loss':<6}{'first':>9}{'final':>9}{'eval loss':>11}{'eval ppl':>10}{'tok/s':>11}{'time':>8}")
    for name, h in histories.items():
        print(f"  {name:<6}{h.train_loss[0]:>9.4f}{h.train_loss[-1]:>9.4f}{h.eval_loss[-1]:>11.4f}"
              f"{math.exp(h.eval_loss[-1]):>10.2f}{h.tokens_per_s:>11,.0f}{h.seconds:>7.1f}s")
    title = f"{cfg.family} d{cfg.d_model} L{cfg.layers}, vocab {tokenizer.vocab_size}, {cfg.batch}x{cfg.seq_len}"
    if len(histories) == 2:
        diff = np.abs(np.array(histories["cce"].train_loss) - np.array(histories["dense"].train_loss))
        eval_diff = np.abs(np.array(histories["cce"].eval_loss) - np.array(histories["dense"].eval_loss))
        print(f"  max |cce - dense| train loss over {len(diff)} steps: {diff.max():.3e} (step {diff.argmax() + 1}); "
              f"eval loss: {eval_diff.max():.3e}")
    plot(histories, plot_path, title)
    print(f"  plot: {plot_path.resolve() if not plot_path.is_absolute() else plot_path}")
    print(f"  total time {time.perf_counter() - t0:.1f}s")
    return histories


if __name__ == "__main__":
    main()
