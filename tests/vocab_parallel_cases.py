"""Vocabulary parallelism on 8 virtual CPU devices, against the float64 reference.

Run by ``tests/test_vocab_parallel.py`` in a subprocess with ``--xla_force_host_platform_device_count=8`` (the
flag only works before jax is imported, and other test files import jax first). Also runnable directly:
``python -m pytest tests/vocab_parallel_cases.py``.

What is checked, for impl "xla" (small blocks) and "cce" (the Pallas kernels, interpret mode, small blocks):

- inside ``jax.shard_map`` on meshes (8,), (2, 4) and (4, 2), with even, balanced-uneven, padded-at-end and
  traced (per-device array) vocabulary splits, one with an empty shard: loss, lse, dE, dC, dbias equal the
  float64 single-device reference; lse is bitwise identical on every device of the vocabulary axis; padded
  classifier rows (filled with garbage, so an unmasked row would show) get exactly zero gradient;
- every option meets vocabulary parallelism somewhere: shift, ignore_index (also inside the vocabulary, and a
  data shard whose tokens are all ignored), weights, the three reductions, label smoothing with and without a
  softcap, softcap, bias, both classifier layouts, differentiable lse (random cotangents) and a z-loss;
- ``sharded_linear_cross_entropy`` under ``jax.jit`` with NamedSharding inputs (Auto and Explicit mesh axes):
  same values, gradients sharded like their inputs, and the compiled HLO moves no classifier-sized data across
  the vocabulary axis and gathers nothing;
- errors for misuse, and ``examples/train_sharded.py`` running a few steps.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import cce_jax  # noqa: E402
from cce_jax import vocab_parallel as vp  # noqa: E402
from cce_jax.cce import KernelConfig  # noqa: E402
from pallas_kernels.backward import BackwardConfig  # noqa: E402
from pallas_kernels.lse_forward import ForwardConfig  # noqa: E402
from reference import (  # noqa: E402
    assert_close, make_inputs, reference_grads, reference_loss, reference_z_loss, reference_z_loss_lse_grad,
)

if jax.device_count() < 8:
    raise RuntimeError(
        f"vocab_parallel_cases needs 8 devices, found {jax.device_count()}: run it through "
        "tests/test_vocab_parallel.py or with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )

F32 = jnp.float32
XLA = cce_jax.XlaConfig(block_n=8, block_v=8)
CCE = KernelConfig(
    forward=ForwardConfig(block_n=16, block_v=16, block_d=16),
    backward=BackwardConfig(block_n=16, block_v=16, block_d=16, block_dout=16, chunk_v=32),
)
# check_vma: the xla implementation tracks varying mesh axes, so it runs with JAX's default (and minimal backward
# communication); Pallas calls in interpret mode do not, so the kernels run with check_vma=False.
IMPLS = [pytest.param((XLA, True), id="xla"), pytest.param((CCE, False), id="cce")]
B, T, D = 4, 7, 37


def make_mesh(shape, names) -> Mesh:
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def entry(axes):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary splits, laid out with NumPy (independently of the library's pad helpers, tested separately)
# --------------------------------------------------------------------------------------------------------------


def partition_for(kind: str, vocab: int, n: int):
    """``(start, stop)`` per device for a split kind; None for the even split (no start/stop given)."""
    if kind == "even":
        assert vocab % n == 0
        return None
    if kind == "balanced":
        return vp.vocab_partition(vocab, n)
    if kind == "end":
        length = -(-vocab // n)
        return tuple((min(k * length, vocab), min((k + 1) * length, vocab)) for k in range(n))
    if kind == "traced":  # uneven, with an empty shard, device k not holding the k-th range
        sizes = [9, 9, 9, 0, 9, 9, 9, vocab - 54]
        assert n == 8 and 0 < sizes[-1] <= 9
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = tuple((int(bounds[k]), int(bounds[k + 1])) for k in range(n))
        return parts[4:] + parts[:4]
    raise ValueError(kind)


def padded_layout(parts):
    """Row r of the padded layout holds vocabulary row ``source[r]`` when ``live[r]``, else padding."""
    length = max(b - a for a, b in parts)
    source = np.full(len(parts) * length, -1)
    for k, (a, b) in enumerate(parts):
        source[k * length : k * length + b - a] = np.arange(a, b)
    return source, source >= 0


def pad(x, parts, axis, rng):
    """Shard k gets rows [start_k, stop_k) of x, then random garbage: a leaked padded row would show."""
    x = np.moveaxis(np.asarray(x), axis, 0)
    source, live = padded_layout(parts)
    out = rng.standard_normal((len(source), *x.shape[1:])).astype(x.dtype)
    out[live] = x[source[live]]
    return np.moveaxis(out, 0, axis)


def unpad(x, parts, axis):
    """(real rows in vocabulary order, padded rows)."""
    x = np.moveaxis(np.asarray(x), axis, 0)
    source, live = padded_layout(parts)
    real = np.empty((live.sum(), *x.shape[1:]), x.dtype)
    real[source[live]] = x[live]
    return np.moveaxis(real, 0, axis), x[~live]


def grads_close(de, dc, db, ref_grads, scales, parts, layout, what):
    """dE, dC, dbias against the reference; padded rows of dC/dbias must be exactly zero."""
    ref_de, ref_dc, ref_db = ref_grads
    vdim = 0 if layout == "vd" else 1
    assert_close(de, ref_de, F32, "grad", f"{what} dE", scale=scales[0])
    if parts is not None:
        dc, dc_pad = unpad(dc, parts, vdim)
        assert not np.any(dc_pad), f"{what}: padded classifier rows got a gradient"
    assert_close(dc, ref_dc, F32, "grad", f"{what} dC", scale=scales[1])
    if ref_db is not None:
        if parts is not None:
            db, db_pad = unpad(db, parts, 0)
            assert not np.any(db_pad), f"{what}: padded bias entries got a gradient"
        assert_close(db, ref_db, F32, "grad", f"{what} dbias", scale=scales[2])


# --------------------------------------------------------------------------------------------------------------
# shard_map cases
# --------------------------------------------------------------------------------------------------------------

# id, mesh shape, mesh axis names, vocab axes, batch axes, V, split, input flags, loss options, check_vma override
SHARD_MAP_CASES = [
    ("v8-even-mean-shift-weights-bias", (8,), ("v",), ("v",), (), 72, "even",
     dict(bias=True, weights=True), dict(reduction="mean", shift=1)),
    ("v8-balanced-none-softcap-smoothing-bias", (8,), ("v",), ("v",), (), 61, "balanced",
     dict(bias=True, logit_scale=3.0), dict(reduction="none", softcap=2.5, label_smoothing=0.2)),
    ("d2v4-balanced-sum-smoothing-weights-dv", (2, 4), ("d", "v"), ("v",), ("d",), 61, "balanced",
     dict(bias=True, weights=True, layout="dv"), dict(reduction="sum", label_smoothing=0.1, shift=1)),
    ("d4v2-end-none-softcap-all-ignored-shard", (4, 2), ("d", "v"), ("v",), ("d",), 61, "end",
     dict(logit_scale=3.0, ignore_row0=True), dict(reduction="none", softcap=2.0, shift=2)),
    ("d2v4-vocab-over-both-axes-no-check-vma", (2, 4), ("d", "v"), ("d", "v"), (), 61, "balanced",
     dict(bias=True), dict(reduction="mean"), False),
    ("v8-traced-empty-shard-softcap-smoothing", (8,), ("v",), ("v",), (), 61, "traced",
     dict(bias=True, weights=True, ignore_index=5, ignore_frac=0.3),
     dict(reduction="none", softcap=3.0, label_smoothing=0.3)),
]


@pytest.mark.parametrize("impl", ["dense", "auto"])
@pytest.mark.parametrize("case", [SHARD_MAP_CASES[0], SHARD_MAP_CASES[5]], ids=lambda case: case[0])
def test_shard_map_dense_and_auto(case, impl, rng):
    """impl="dense" meets the same stats contract inside shard_map (check_vma=True); "auto" picks it on a CPU at
    these sizes (the logits are far below AUTO_DENSE_MAX_LOGIT_BYTES)."""
    name, mesh_shape, names, vaxes, baxes, vocab, split, flags, options, *override = case
    run_shard_map(rng, impl, True, mesh_shape, names, vaxes, baxes, vocab, split, flags, options)


def run_shard_map(rng, impl, check_vma, mesh_shape, names, vaxes, baxes, vocab, split, flags, options):
    mesh = make_mesh(mesh_shape, names)
    n_vocab = int(np.prod([mesh.shape[a] for a in vaxes]))
    flags = dict(flags)
    ignore_row0 = flags.pop("ignore_row0", False)
    inputs = make_inputs(rng, (B, T), D, vocab, **flags)
    targets = np.array(inputs.targets)
    if ignore_row0:  # batch row 0 alone on data shard 0: every token of that shard is ignored
        targets[0] = inputs.ignore_index
    layout, vdim = inputs.layout, 0 if inputs.layout == "vd" else 1
    parts = partition_for(split, vocab, n_vocab)
    c_in, b_in = np.asarray(inputs.c), None if inputs.bias is None else np.asarray(inputs.bias)
    if parts is not None:
        c_in = pad(c_in, parts, vdim, rng)
        b_in = None if b_in is None else pad(b_in, parts, 0, rng)
    reduction = options["reduction"]
    assert reduction != "mean" or not baxes, "a local mean is not the global mean; test mean without batch axes"

    ventry, bentry = entry(vaxes), entry(baxes)
    tok = P(bentry, None)
    c_spec = P(ventry, None) if layout == "vd" else P(None, ventry)
    bounds = np.asarray(parts if split == "traced" else [(0, 0)] * n_vocab, np.int32)

    def local(e, c, t, b, w, bound):
        if split == "even":
            opts = cce_jax.VocabParallelOptions(ventry)
        elif split == "traced":  # this device's (start, stop), arriving as a (1, 2) slice of a sharded array
            opts = cce_jax.VocabParallelOptions(ventry, start=bound[0, 0], stop=bound[0, 1])
        else:
            opts = vp.vocab_parallel_options(ventry, parts)
        loss, lse = cce_jax.linear_cross_entropy(
            e, c, t, b, weights=w, ignore_index=inputs.ignore_index, classifier_layout=layout, impl=impl,
            vocab_parallel=opts, return_lse=True, **options,
        )
        if reduction == "sum" and baxes:
            loss = lax.psum(loss, baxes)
        copies = lse[None]  # one copy per vocabulary device, to check they agree bit for bit
        if check_vma:
            copies = lax.pcast(copies, tuple(vaxes), to="varying")
        return loss, lse, copies

    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(P(bentry, None, None), c_spec, tok, P(ventry), tok, P(ventry, None)),
        out_specs=(tok if reduction == "none" else P(), tok, P(ventry, bentry, None)), check_vma=check_vma,
    )

    @jax.jit
    def go(e, c, b, t, w, bound, g):
        out, vjp = jax.vjp(lambda e, c, b: fn(e, c, t, b, w, bound), e, c, b)
        return out, vjp(g)

    ref = reference_loss(inputs.e, inputs.c, targets, **inputs.kwargs(), **options)
    g_loss = rng.standard_normal(ref.loss.shape) if reduction == "none" else rng.uniform(0.5, 2.0)
    g_lse = rng.standard_normal(ref.lse.shape)
    ref_grads, scales = reference_grads(
        inputs.e, inputs.c, targets, g_loss=g_loss, g_lse=g_lse, with_scales=True, **inputs.kwargs(), **options
    )
    cot = (np.asarray(g_loss, np.float32), g_lse.astype(np.float32), np.zeros((n_vocab, *ref.lse.shape), np.float32))
    (loss, lse, copies), (de, dc, db) = go(inputs.e, c_in, b_in, targets, inputs.weights, bounds, cot)

    what = f"impl={impl!r} check_vma={check_vma}"
    assert_close(loss, ref.loss, F32, "loss", f"{what} loss", scale=ref.loss_scale)
    assert_close(lse, ref.lse, F32, "loss", f"{what} lse", scale=ref.lse_scale)
    copies = np.asarray(copies)
    for k in range(n_vocab):
        assert np.array_equal(copies[k], copies[0]), f"{what}: lse differs between vocabulary devices 0 and {k}"
    # Each device holds only its shard's dC rows, laid out like c.
    assert dc.sharding.is_equivalent_to(NamedSharding(mesh, c_spec), dc.ndim), f"{what}: dC sharding {dc.sharding}"
    grads_close(de, dc, db, ref_grads, scales, parts, layout, what)


@pytest.mark.parametrize("impl_vma", IMPLS)
@pytest.mark.parametrize("case", SHARD_MAP_CASES, ids=[c[0] for c in SHARD_MAP_CASES])
def test_shard_map_matches_reference(case, impl_vma, rng):
    name, mesh_shape, names, vaxes, baxes, vocab, split, flags, options, *override = case
    impl, check_vma = impl_vma
    if override:
        check_vma = override[0]
    run_shard_map(rng, impl, check_vma, mesh_shape, names, vaxes, baxes, vocab, split, flags, options)


# --------------------------------------------------------------------------------------------------------------
# sharded_linear_cross_entropy under jax.jit
# --------------------------------------------------------------------------------------------------------------

Z_LOSS = 1e-2
JIT_V = 44  # 11 rows per vocabulary device on a (2, 4) mesh


@functools.lru_cache(maxsize=None)
def compiled_train_loss(impl_id: str):
    """A jitted value-and-grad of ``loss + Z_LOSS * z_loss`` on a (2, 4) (data, vocab) mesh, compiled once.

    Returns ``(mesh, compiled, args)`` with the arguments already placed: e and targets sharded over data, c and
    bias over the vocabulary (replicated over data).
    """
    impl = XLA if impl_id == "xla" else CCE
    mesh = make_mesh((2, 4), ("data", "vocab"))
    inputs = make_inputs(np.random.default_rng(11), (B, T), D, JIT_V, bias=True, weights=True)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(inputs.e, P("data")), put(inputs.c, P("vocab")), put(inputs.bias, P("vocab")),
            put(inputs.targets, P("data")), put(inputs.weights, P("data")))

    def objective(e, c, bias, targets, weights):
        loss, lse = vp.sharded_linear_cross_entropy(
            e, c, targets, bias, mesh=mesh, vocab_axis="vocab", batch_axes="data", weights=weights, shift=1,
            label_smoothing=0.1, return_lse=True, impl=impl,
        )
        return loss + Z_LOSS * cce_jax.compute_z_loss(lse, targets, shift=1)

    compiled = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2))).lower(*args).compile()
    return mesh, compiled, args, inputs


@pytest.mark.parametrize("impl_id", ["xla", "cce"])
def test_jit_helper_matches_reference_and_keeps_gradients_sharded(impl_id):
    mesh, compiled, args, inputs = compiled_train_loss(impl_id)
    value, (de, dc, db) = compiled(*args)
    sem = dict(shift=1, label_smoothing=0.1)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    z = reference_z_loss(ref.lse, inputs.targets, shift=1)
    assert_close(value, ref.loss + Z_LOSS * z, F32, "loss", "loss + z-loss", scale=ref.loss_scale + Z_LOSS * z)
    g_lse = Z_LOSS * reference_z_loss_lse_grad(ref.lse, inputs.targets, shift=1)
    ref_grads, scales = reference_grads(
        inputs.e, inputs.c, inputs.targets, g_loss=1.0, g_lse=g_lse, with_scales=True, **inputs.kwargs(), **sem
    )
    grads_close(de, dc, db, ref_grads, scales, None, "vd", f"impl={impl_id}")
    for name, grad, arg in (("dE", de, args[0]), ("dC", dc, args[1]), ("dbias", db, args[2])):
        assert grad.sharding.is_equivalent_to(arg.sharding, grad.ndim), f"{name} sharding {grad.sharding}"
        assert grad.addressable_shards[0].data.shape == arg.addressable_shards[0].data.shape


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[0-9,]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|all-to-all|ragged-all-to-all|collective-permute|collective-broadcast|"
    r"reduce-scatter)(?:-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def _first_group(rest: str, num_devices: int) -> list[int]:
    """The first device group of a collective, from any of XLA's three spellings of replica_groups."""
    iota = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", rest)
    if iota:  # [groups, size]<=[dims]T(perm): iota(dims), transposed by perm, reshaped to (groups, size)
        shape = [int(x) for x in iota[1].split(",")]
        dims = [int(x) for x in iota[2].split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota[3]:
            ids = ids.transpose([int(x) for x in iota[3].split(",")])
        return ids.reshape(shape[0], -1)[0].tolist()
    listed = re.search(r"replica_groups=\{(\{[0-9,]*\})?", rest)
    assert listed, f"cannot read the device groups of: {rest[:300]}"
    if not listed[1] or listed[1] == "{}":
        return list(range(num_devices))  # one group of everybody
    return [int(x) for x in listed[1].strip("{}").split(",")]


def collectives(hlo: str, mesh: Mesh):
    """``(op, [element counts of its operands], frozenset of mesh axes it spans)`` for every collective."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        sizes = [int(np.prod([int(x) for x in dims.split(",") if x])) for dims in _ARRAY.findall(m["shape"])]
        named = re.search(r"replica_groups=\S*mesh\[([^\]]*)\]\s*\{([^}]*)\}", m["rest"])
        if named:  # mesh['a'=2,'b'=4] {'b'}: XLA's axis names may differ from ours, their order does not
            hlo_axes = [a.split("=")[0].strip(" '\"") for a in named[1].split(",")]
            assert len(hlo_axes) == ids.ndim, f"collective over another mesh: {line.strip()[:300]}"
            axes = frozenset(mesh.axis_names[hlo_axes.index(a.strip(" '\""))] for a in named[2].split(",") if a.strip())
        else:  # explicit device groups: the mesh axes whose coordinate changes within a group
            coords = np.array([np.argwhere(ids == d)[0] for d in _first_group(m["rest"], ids.size)])
            axes = frozenset(mesh.axis_names[i] for i in range(ids.ndim) if len(set(coords[:, i])) > 1)
        found.append((m["op"], sizes, axes))
    return found


def test_jit_helper_hlo_never_gathers_the_classifier():
    """The compiled train step moves per-token scalars and one dE over the vocabulary axis, nothing else."""
    mesh, compiled, args, _ = compiled_train_loss("xla")
    found = collectives(compiled.as_text(), mesh)
    n_local = (B // 2) * T  # tokens per data shard
    v_local = JIT_V // 4
    assert found, "no collectives at all: the test would prove nothing"
    moving = [(op, axes) for op, _, axes in found if op != "all-reduce"]
    assert not moving, f"gathers/permutes in the compiled step: {moving}"
    over_vocab = [s for _, sizes, axes in found if axes == {"vocab"} for s in sizes]
    over_data = [s for _, sizes, axes in found if axes == {"data"} for s in sizes]
    other = [(sizes, axes) for _, sizes, axes in found if axes not in ({"vocab"}, {"data"})]
    # Forward: pmax of the local lse (N) and one psum of (exp-sum, target logit, logit sum) (3N). Backward: dE.
    assert sorted(over_vocab) == sorted([n_local, 3 * n_local, n_local * D]), (over_vocab, n_local, D)
    # Over data: the loss numerator/denominator and the z-loss scalars, and dC/dbias of the data-replicated
    # classifier (the data-parallel gradient sum; never across the vocabulary axis).
    assert all(s <= 2 for s in over_data if s not in (v_local * D, v_local)), over_data
    assert over_data.count(v_local * D) == 1 and over_data.count(v_local) == 1, over_data
    assert all(s <= 2 for sizes, _ in other for s in sizes), f"unexpected collectives {other}"


def test_jit_helper_explicit_axes_padded_vocabulary_dv_layout(rng):
    """jax.make_mesh (Explicit axes) + jax.set_mesh, c stored (D, V) padded at the end, vocab_size= the real V."""
    vocab, padded = 61, 62  # 31 columns per vocabulary device; the last device has one padding column
    mesh = jax.make_mesh((4, 2), ("data", "vocab"))
    inputs = make_inputs(rng, (B, T), D, vocab, layout="dv", bias=True, logit_scale=3.0)
    c_pad = np.concatenate([np.asarray(inputs.c), rng.standard_normal((D, padded - vocab)).astype(np.float32)], 1)
    b_pad = np.concatenate([np.asarray(inputs.bias), rng.standard_normal(padded - vocab).astype(np.float32)])
    sem = dict(reduction="none", softcap=2.0, label_smoothing=0.1)
    ref = reference_loss(inputs.e, inputs.c, inputs.targets, **inputs.kwargs(), **sem)
    g_loss, g_lse = rng.standard_normal(ref.loss.shape), rng.standard_normal(ref.lse.shape)
    ref_grads, scales = reference_grads(
        inputs.e, inputs.c, inputs.targets, g_loss=g_loss, g_lse=g_lse, with_scales=True, **inputs.kwargs(), **sem
    )
    with jax.set_mesh(mesh):
        c = jax.device_put(c_pad, P(None, "vocab"))
        bias = jax.device_put(b_pad, P("vocab"))
        e = jax.device_put(np.asarray(inputs.e), P("data"))
        targets = np.asarray(inputs.targets)  # not placed: the helper reshards it to the data axis

        @jax.jit
        def go(e, c, bias, g):
            def f(e, c, bias):
                return vp.sharded_linear_cross_entropy(
                    e, c, targets, bias, vocab_axis="vocab", batch_axes="data", vocab_size=vocab,
                    classifier_layout="dv", return_lse=True, impl=XLA, **sem,
                )

            out, vjp = jax.vjp(f, e, c, bias)
            return out, vjp(g)

        (loss, lse), (de, dc, db) = go(e, c, bias, (g_loss.astype(np.float32), g_lse.astype(np.float32)))
    assert_close(loss, ref.loss, F32, "loss", "loss", scale=ref.loss_scale)
    assert_close(lse, ref.lse, F32, "loss", "lse", scale=ref.lse_scale)
    parts = ((0, 31), (31, 61))
    grads_close(de, dc, db, ref_grads, scales, parts, "dv", "explicit-axes")
    assert dc.sharding.is_equivalent_to(c.sharding, 2) and db.sharding.is_equivalent_to(bias.sharding, 1)


# --------------------------------------------------------------------------------------------------------------
# Misuse
# --------------------------------------------------------------------------------------------------------------


def _trace_in_shard_map(options, vocab=16):
    mesh = make_mesh((8,), ("v",))
    f = jax.shard_map(
        lambda e, c, t: cce_jax.linear_cross_entropy(e, c, t, vocab_parallel=options, impl=XLA),
        mesh=mesh, in_specs=(P(), P("v"), P()), out_specs=P(),
    )
    jax.eval_shape(f, jnp.zeros((3, D)), jnp.zeros((vocab, D)), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize(
    "options, match",
    [
        (cce_jax.VocabParallelOptions("v", start=0, stop=2), "same on all 8 devices"),
        (cce_jax.VocabParallelOptions("v", start=(0, 2)), "both start and stop"),
        (cce_jax.VocabParallelOptions("v", start=(0, 2), stop=(2, 4)), "one entry per device"),
        (cce_jax.VocabParallelOptions("v", start=tuple(range(0, 24, 3)), stop=tuple(range(3, 27, 3))),
         "c holds only 2"),
        (cce_jax.VocabParallelOptions("v", start=(0,) * 8, stop=(2,) * 8), "contiguous"),
    ],
)
def test_bad_vocab_parallel_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        _trace_in_shard_map(options)


def test_out_of_range_target_is_nan_not_a_plausible_loss():
    """A target id >= V gives a NaN token loss under vocabulary parallelism too (every shard disowns it)."""
    mesh = make_mesh((8,), ("v",))
    inputs = make_inputs(np.random.default_rng(5), (5,), D, 16, ignore_frac=0.0)
    targets = np.array(inputs.targets)
    targets[2] = 16
    f = jax.jit(jax.shard_map(
        lambda e, c, t: cce_jax.linear_cross_entropy(
            e, c, t, vocab_parallel=cce_jax.VocabParallelOptions("v"), impl=XLA, reduction="none"),
        mesh=mesh, in_specs=(P(), P("v"), P()), out_specs=P(),
    ))
    loss = np.asarray(f(inputs.e, inputs.c, targets))
    assert np.isnan(loss[2]) and np.isfinite(np.delete(loss, 2)).all(), loss


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_axis="vocab", batch_axes="vocab"), "must be different"),
        (dict(vocab_axis="model"), "not among the mesh axes"),
        (dict(vocab_axis="vocab", vocab_size=100), "exceeds"),
        (dict(vocab_axis="vocab", vocab_parallel=None), "sets vocab_parallel itself"),
    ],
)
def test_jit_helper_rejects_misuse(kwargs, match):
    mesh = make_mesh((2, 4), ("data", "vocab"))
    with pytest.raises((ValueError, TypeError), match=match):
        vp.sharded_linear_cross_entropy(
            jnp.zeros((4, 3, D)), jnp.zeros((44, D)), jnp.zeros((4, 3), jnp.int32), mesh=mesh, **kwargs
        )


def test_jit_helper_rejects_indivisible_vocabulary_and_batch():
    mesh = make_mesh((2, 4), ("data", "vocab"))
    e, t = jnp.zeros((4, 3, D)), jnp.zeros((4, 3), jnp.int32)
    with pytest.raises(ValueError, match="vocab_size=<real V>"):
        vp.sharded_linear_cross_entropy(e, jnp.zeros((43, D)), t, mesh=mesh, vocab_axis="vocab")
    with pytest.raises(ValueError, match=r"targets.shape\[0\] must be divisible"):
        vp.sharded_linear_cross_entropy(
            e[:3], jnp.zeros((44, D)), t[:3], mesh=mesh, vocab_axis="vocab", batch_axes="data"
        )
    with pytest.raises(ValueError, match="sharded batch axis"):
        vp.sharded_linear_cross_entropy(
            e[:, 0], jnp.zeros((44, D)), t[:, 0], mesh=mesh, vocab_axis="vocab", batch_axes="data", shift=1
        )


# --------------------------------------------------------------------------------------------------------------
# The example
# --------------------------------------------------------------------------------------------------------------


def test_train_sharded_example_runs_and_learns():
    path = Path(__file__).resolve().parent.parent / "examples" / "train_sharded.py"
    sys.path.insert(0, str(path.parent))
    try:
        import train_sharded  # noqa: PLC0415
    finally:
        sys.path.remove(str(path.parent))
    result = train_sharded.main(["--steps", "12", "--mesh", "2x4", "--check"])
    assert result["max_reference_error"] < 1e-4, result
    assert result["final_loss"] < result["first_loss"] - 0.1, result
