"""Train a small byte-level language model with its vocabulary split over devices, on a (data, vocab) mesh.

    python examples/train_sharded.py                     # 8 virtual CPU devices, mesh 2x4, ~1 minute
    python examples/train_sharded.py --mesh 4x2 --check  # also compare with a single-device dense loss
    python examples/train_sharded.py --steps 2000 --d-model 512 --batch 64 --seq-len 512   # on GPUs

The input embedding and the classifier are (V, D) tables split by vocabulary rows over the ``vocab`` mesh axis;
token batches are split over the ``data`` axis; the small transformer in between is replicated. The loss is
:func:`cce_jax.vocab_parallel.sharded_linear_cross_entropy` inside one ``jax.jit`` train step: no device ever
holds the whole classifier, the logits or their gradient. The vocabulary is the 256 bytes plus a
beginning-of-text id, V = 257, which does not divide by 2, 4 or 8: both tables are stored padded at the end to
a multiple of the vocab axis size and ``vocab_size=257`` keeps the padding out of the softmax.

On a machine without GPUs the script asks XLA for ``--host-devices`` (default 8) virtual CPU devices; on GPUs
it uses the GPUs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__" and "jax" not in sys.modules:
    # The device count of the CPU platform is fixed when jax initialises; it does not affect GPUs.
    _count = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--host-devices=")), None)
    if _count is None and "--host-devices" in sys.argv[:-1]:
        _count = sys.argv[sys.argv.index("--host-devices") + 1]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={int(_count or 8)}"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from cce_jax import linear_cross_entropy  # noqa: E402
from cce_jax.vocab_parallel import sharded_linear_cross_entropy  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "shakespeare_coriolanus.txt"
BOS = 256
VOCAB = 257


# ----------------------------------------------------------------------------------------------------------
# Model: vocab-parallel embedding -> a few pre-norm causal transformer blocks -> hidden states for the loss


def init_params(key, *, vocab_rows: int, d: int, layers: int, mlp: int) -> dict:
    keys = jax.random.split(key, 2 + 4 * layers)
    normal = lambda k, shape, scale: jax.random.normal(k, shape, jnp.float32) * scale  # noqa: E731
    blocks = []
    for i in range(layers):
        k = keys[2 + 4 * i : 6 + 4 * i]
        blocks.append(dict(
            qkv=normal(k[0], (d, 3 * d), d**-0.5), proj=normal(k[1], (d, d), d**-0.5 / layers),
            up=normal(k[2], (d, mlp), d**-0.5), down=normal(k[3], (mlp, d), mlp**-0.5 / layers),
            norm1=jnp.ones((d,)), norm2=jnp.ones((d,)),
        ))
    return dict(
        embed=normal(keys[0], (vocab_rows, d), 1.0),
        classifier=normal(keys[1], (vocab_rows, d), d**-0.5),  # (V, D), logits ~ N(0, 1) at init
        blocks=blocks,
        final_norm=jnp.ones((d,)),
    )


def rms_norm(x, scale):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def causal_block(h, p, heads: int):
    b, t, d = h.shape
    q, k, v = jnp.split(rms_norm(h, p["norm1"]) @ p["qkv"], 3, axis=-1)
    split = lambda x: x.reshape(b, t, heads, d // heads)  # noqa: E731
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), split(v)).reshape(b, t, d)
    h = h + attn @ p["proj"]
    return h + jax.nn.gelu(rms_norm(h, p["norm2"]) @ p["up"]) @ p["down"]


def vocab_parallel_embed(table, tokens, mesh: Mesh):
    """``table[tokens]`` with ``table`` split by rows over "vocab": each device looks up the ids it owns and
    one psum of the (tokens, D) activations assembles the result. The table is never gathered."""

    def local(rows, ids):
        first = lax.axis_index("vocab") * rows.shape[0]
        mine = (ids >= first) & (ids < first + rows.shape[0])
        picked = jnp.take(rows, jnp.clip(ids - first, 0, rows.shape[0] - 1), axis=0)
        return lax.psum(jnp.where(mine[..., None], picked, 0.0), "vocab")

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P("vocab", None), P("data", None)), out_specs=P("data", None, None)
    )(table, tokens)


def hidden_states(params, tokens, mesh: Mesh, heads: int):
    h = vocab_parallel_embed(params["embed"], tokens, mesh)
    for block in params["blocks"]:
        h = causal_block(h, block, heads)
    return rms_norm(h, params["final_norm"])


# ----------------------------------------------------------------------------------------------------------
# Data


def batches(rng: np.random.Generator, data: np.ndarray, batch: int, seq_len: int):
    """Random windows of the corpus; each row starts with BOS so the first byte is predicted too."""
    while True:
        starts = rng.integers(0, len(data) - seq_len, size=batch)
        windows = np.stack([data[s : s + seq_len - 1] for s in starts])
        yield np.concatenate([np.full((batch, 1), BOS, np.int32), windows], axis=1)


# ----------------------------------------------------------------------------------------------------------
# What each device holds


def describe_layout(mesh: Mesh, params, tokens_sharding: NamedSharding, batch: int, vocab_rows: int) -> str:
    rows = vocab_rows // mesh.shape["vocab"]
    per_data = batch // mesh.shape["data"]
    lines = [
        "| device | mesh (data, vocab) | classifier / embedding rows | of which padding | batch rows |",
        "| --- | --- | --- | --- | --- |",
    ]
    shards = {s.device: s for s in params["classifier"].addressable_shards}
    for (i, j), device in np.ndenumerate(mesh.devices):
        shard = shards[device]
        start = shard.index[0].start or 0
        stop = start + shard.data.shape[0]
        padding = max(0, stop - max(start, VOCAB))
        lines.append(
            f"| {device.id} | ({i}, {j}) | [{start}, {stop}) {tuple(shard.data.shape)} | {padding} | "
            f"[{i * per_data}, {(i + 1) * per_data}) |"
        )
    assert rows * mesh.shape["vocab"] == vocab_rows
    lines.append(f"tokens: {tokens_sharding.spec}; transformer blocks: replicated")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="auto", help='"DATAxVOCAB", e.g. 2x4; "auto" splits the devices in two')
    p.add_argument("--host-devices", type=int, default=8, help="virtual CPU devices (CPU platform only)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--impl", default="auto",
                   help='loss implementation ("auto": cce kernels on GPU; on CPU dense logits while they are small, '
                        'else xla)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="compare the first step's loss and classifier gradient with a single-device dense loss")
    return p.parse_args(argv)


def make_mesh(spec: str) -> Mesh:
    devices = jax.devices()
    if spec == "auto":
        vocab = max(1, len(devices) // 2) if len(devices) >= 4 else len(devices)
        data = len(devices) // vocab
    else:
        data, vocab = (int(x) for x in spec.lower().split("x"))
    if data * vocab > len(devices):
        raise SystemExit(f"mesh {data}x{vocab} needs {data * vocab} devices, found {len(devices)}")
    return Mesh(np.array(devices[: data * vocab]).reshape(data, vocab), ("data", "vocab"))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    mesh = make_mesh(args.mesh)
    n_vocab, n_data = mesh.shape["vocab"], mesh.shape["data"]
    if args.batch % n_data:
        raise SystemExit(f"--batch {args.batch} must be divisible by the data axis ({n_data})")
    vocab_rows = -(-VOCAB // n_vocab) * n_vocab  # padded at the end to a multiple of the vocab axis

    # Parameters: the two (V, D) tables split by rows over "vocab" (replicated over "data"), the rest replicated.
    # Initialised by one jitted call straight into their shardings: no device ever builds a whole table.
    init = functools.partial(init_params, vocab_rows=vocab_rows, d=args.d_model, layers=args.layers,
                             mlp=4 * args.d_model)
    table = NamedSharding(mesh, P("vocab", None))
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(init, jax.random.key(0)))
    shardings["embed"] = shardings["classifier"] = table
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(args.seed))
    tokens_sharding = NamedSharding(mesh, P("data", None))

    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 10, max(args.steps, 11)))
    opt_state = jax.jit(optimizer.init)(params)  # optimizer moments follow the parameters' shardings
    # (scalars such as the step count are created on one device; replicate them over the mesh)
    opt_shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt_state
    )
    opt_state = jax.device_put(opt_state, opt_shardings)

    def loss_fn(params, tokens):
        h = hidden_states(params, tokens, mesh, args.heads)
        return sharded_linear_cross_entropy(
            h, params["classifier"], tokens, mesh=mesh, vocab_axis="vocab", batch_axes="data",
            vocab_size=VOCAB, shift=1, impl=args.impl,
        )

    @functools.partial(
        jax.jit, out_shardings=(shardings, opt_shardings, replicated), donate_argnums=(0, 1)
    )
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = np.frombuffer(CORPUS.read_bytes(), np.uint8).astype(np.int32)
    stream = batches(np.random.default_rng(args.seed), data, args.batch, args.seq_len)
    first = jax.device_put(next(stream), tokens_sharding)

    print(f"devices: {len(mesh.devices.flat)} x {mesh.devices.flat[0].platform}, mesh (data, vocab) = "
          f"({n_data}, {n_vocab}); V = {VOCAB} stored as {vocab_rows} rows ({vocab_rows // n_vocab} per device)")
    print(describe_layout(mesh, params, tokens_sharding, args.batch, vocab_rows))

    result: dict = {}
    if args.check:
        result["max_reference_error"] = check_against_dense(params, first, loss_fn, mesh, args)
        print(f"check: sharded vs single-device dense loss and dC agree to {result['max_reference_error']:.2e}")

    losses, start = [], time.perf_counter()
    tokens = first
    for step in range(args.steps):
        params, opt_state, loss = train_step(params, opt_state, tokens)
        losses.append(float(loss))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)")
        tokens = jax.device_put(next(stream), tokens_sharding)
    tail = max(1, min(10, len(losses) // 4))
    result.update(first_loss=losses[0], final_loss=float(np.mean(losses[-tail:])), losses=losses)
    print(f"loss {result['first_loss']:.3f} -> {result['final_loss']:.3f} (mean of the last {tail} steps)")
    return result


def check_against_dense(params, tokens, loss_fn, mesh: Mesh, args) -> float:
    """Loss and classifier gradient of the sharded step versus the same model with a dense loss on one device,
    on the real (unpadded) vocabulary. Returns the largest relative difference."""
    sharded_loss, sharded_grads = jax.jit(jax.value_and_grad(loss_fn))(params, tokens)
    # Gradients come back sharded like the parameters: the classifier's stays split over "vocab".
    table = params["classifier"].sharding
    assert sharded_grads["classifier"].sharding.is_equivalent_to(table, 2), sharded_grads["classifier"].sharding
    local = jax.device_get(params)
    one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "vocab"))

    def dense_loss(classifier, params, tokens):
        h = hidden_states(params, tokens, one, args.heads)
        return linear_cross_entropy(h, classifier, tokens, shift=1, impl="dense")

    with jax.default_device(jax.devices()[0]):
        ref_loss, ref_dc = jax.jit(jax.value_and_grad(dense_loss))(
            local["classifier"][:VOCAB], local, np.asarray(tokens)
        )
    dc = np.asarray(sharded_grads["classifier"])
    if np.any(dc[VOCAB:]):
        raise AssertionError("padding rows of the classifier received a gradient")
    loss_err = abs(float(sharded_loss) - float(ref_loss)) / abs(float(ref_loss))
    dc_err = float(np.abs(dc[:VOCAB] - np.asarray(ref_dc)).max() / np.abs(np.asarray(ref_dc)).max())
    return max(loss_err, dc_err)


if __name__ == "__main__":
    main()
