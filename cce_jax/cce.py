"""impl="cce" and its presets: the Pallas kernels behind ``jax.custom_vjp``.

Forward (evaluation, and the recompute path's forward): :func:`pallas_kernels.lse_forward.lse_forward`
(Triton; on Hopper GPUs the Mosaic GPU kernel :func:`pallas_kernels.mosaic_forward.lse_forward_mosaic` where it
applies, see :func:`use_mosaic_forward`) gives per-token ``(lse, target_logit, sum_logits)``.

Training a scalar loss (:func:`training_impl`, the default): the three-pass path of :mod:`cce_jax.three_pass`
with :class:`ChunkLogits` computing each token chunk's logits once (the Mosaic GPU kernel
:func:`pallas_kernels.mosaic_logits_chunk.logits_chunk_mosaic` on Hopper GPUs where it applies, see
:func:`use_mosaic_logits`; :func:`pallas_kernels.logits_chunk.logits_chunk` on Triton elsewhere) and writing
the logit gradient over them (:func:`pallas_kernels.chunk_grad.chunk_grad`), then XLA's dense products and,
for sides that may filter, the block-sparse products :func:`~pallas_kernels.backward.accumulate_de` and
:func:`~pallas_kernels.backward.write_dc` (``accumulate=True``), chosen as
:class:`cce_jax.three_pass.SparseProducts` describes.

Recompute path (per-token cotangents): only ``lse`` is saved; the backward loops over vocabulary chunks, each
chunk's logit gradient formed by :func:`pallas_kernels.backward.logit_grad` (with per-tile filter flags) and
consumed by the block-sparse products; a side that may not skip tiles multiplies the same buffer with XLA's
dense matmul. Its temporary memory is the (N, chunk_v) gradient buffer (``KernelConfig.grad_buffer_bytes``)
plus, with ``accum_e_fp32``, a float32 copy of dE. On a CPU the same kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import options as options_lib
from cce_jax import three_pass
from cce_jax.options import BackwardOptions
from cce_jax.stats import LogitSpec, TokenStats, TokenStatsFn
from cce_jax.vma import varying_like
from pallas_kernels import tiles
from pallas_kernels.backward import BackwardConfig, accumulate_de, expand_live, live_lists, logit_grad, write_dc
from pallas_kernels.lse_forward import ForwardConfig, lse_forward
from pallas_kernels.mosaic_forward import MosaicForwardConfig
from pallas_kernels.mosaic_sparse_de import MosaicSparseDeConfig
from pallas_kernels.tiles import Problem


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block configuration of the kernels; pass as ``impl=KernelConfig(...)`` to pin it (preset "cce").

    Attributes:
      forward: tiles, warps and stages of the forward kernel.
      backward: tiles, warps and stages of the backward kernels; its ``chunk_v`` is an upper bound.
      grad_buffer_bytes: budget for the (N, chunk_v) gradient buffer; ``chunk_v`` shrinks to fit it.
      dense_fraction: a chunk in which more than this fraction of gradient tiles survives filtering is
        multiplied by XLA's dense matmul instead of the block-sparse kernels. 1.0 (the default) turns the
        fallback off. On LM-like data 0.25 was faster on an H200 (gemma2 shape: 79 ms instead of 106 ms), but the
        run-time choice makes XLA copy dC once (+1.2 GB temporary at that shape) and slowed flat data
        (benchmarks/results.md). Applies to the recompute path.
      chunk_tokens: tokens per chunk of the three-pass training path (:mod:`cce_jax.three_pass`); None sizes
        chunks from the memory budget. Its logits kernel uses the ``forward`` tiles.
      chunk_dense_fraction: on the three-pass path, a token chunk whose fraction of live gradient tiles exceeds
        this computes dE with XLA's dense product; below it the block-sparse kernel skips dead tiles. dC's
        choice (``chunk_dc``) uses the same threshold.
      chunk_dc: how the three-pass path chooses dC's product on a side that may filter
        (:class:`cce_jax.three_pass.SparseProducts`): ``"sampled"`` (once per call from one sampled row block of
        tokens against ``chunk_dense_fraction``), ``"per_chunk"``, ``"sparse"`` or ``"dense"``.
      sort_vocab: on the three-pass path, when a side filters, walk the vocabulary sorted by each entry's
        largest probability over one sampled row block (:func:`cce_jax.three_pass.vocab_order`), so that the
        probable entries share tiles and more tiles are skipped; costs a gathered copy of the classifier and of
        dC (2 x bytes(c) of temporary memory beyond the chunk budget) and two sampled logits passes. Like
        filtering it does not apply with label smoothing (whose gradient reaches every entry). Off by
        default: on the benchmark's LM-like data 99-100% of 128x128 tiles stay live in any order
        (benchmarks/results.md), so it only pays where sorting leaves whole tiles dead.
      forward_backend: ``"auto"`` (the Mosaic GPU forward on Hopper GPUs where it applies, see
        :func:`use_mosaic_forward`; the Triton forward elsewhere), ``"triton"`` or ``"mosaic"``. ``"mosaic"``
        here or in ``sparse_de_backend`` in interpret mode runs Mosaic GPU's interpreter, whose warpgroups block
        threads of XLA's CPU pool: with fewer than 8 cores set ``PJRT_NPROC=8`` before JAX starts, or it can
        deadlock (a ``RuntimeWarning`` says so; tests/conftest.py).
      mosaic: tiles of the Mosaic GPU forward: 128 x 128 per compute warpgroup, block_d 128 in a 2-stage ring
        (on an H200, 2026-12-03, six interleaved rounds on the persistent grid: 15.34 / 13.74 ms at the gemma2 /
        llama3 shape against 15.89 / 13.91 with block_d 64 and 3 stages), the target logit from XLA's gathered
        product (``target_gather``: 15.17 / 13.76 ms against 15.23 / 13.86 in the epilogue, interleaved rounds of
        one lease; benchmarks/results.md). Clusters of two CTAs (``cluster=2``) and row-split warpgroups
        (``wg_split="n"``, 64 x 256 each) are autotune candidates (each within 1.5%); the overlapped epilogue
        (``overlap_epilogue``, on 128 x 128 CTA tiles) was 8-14% slower.
      mosaic_chunk: tiles of the Mosaic GPU logits-chunk kernel of the three-pass path (its tile stores take
        shared memory, hence fewer pipeline stages).
      sparse_de_backend: the block-sparse dE product of the three-pass path (a chunk with few live tiles):
        ``"triton"`` (the default: on an H200 the Mosaic kernel was 7% slower to 8% faster at 5-52% live tiles,
        benchmarks/results.md), ``"auto"`` (the Mosaic GPU kernel
        :func:`pallas_kernels.mosaic_sparse_de.sparse_de_mosaic` where :func:`use_mosaic_sparse_de` says so, the
        Triton one elsewhere) or ``"mosaic"`` (where its shape rules hold; Triton otherwise).
      mosaic_sparse_de: tiles of that Mosaic GPU kernel (its ``block_n`` must be ``backward.block_n``, the rows
        of the filter flags).
    """

    forward: ForwardConfig = ForwardConfig()
    backward: BackwardConfig = BackwardConfig()
    grad_buffer_bytes: int = 128 * 2**20
    dense_fraction: float = 1.0
    chunk_tokens: int | None = None
    chunk_dense_fraction: float = 0.6
    chunk_dc: str = "sampled"
    sort_vocab: bool = False
    forward_backend: str = "auto"
    mosaic: MosaicForwardConfig = MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=2,
                                                      compute_wgs=2, target_gather=True)
    mosaic_chunk: MosaicForwardConfig = MosaicForwardConfig(block_n=128, block_v=128, block_d=64, stages=3,
                                                            compute_wgs=2)
    sparse_de_backend: str = "triton"
    mosaic_sparse_de: MosaicSparseDeConfig = MosaicSparseDeConfig()

    def __post_init__(self):
        if self.chunk_dc not in three_pass.DC_MODES:
            raise ValueError(f"KernelConfig.chunk_dc must be one of {three_pass.DC_MODES}, got {self.chunk_dc!r}")
        if not isinstance(self.sort_vocab, bool):
            raise TypeError(f"KernelConfig.sort_vocab must be a bool, got {self.sort_vocab!r}")
        if self.sparse_de_backend not in ("auto", "triton", "mosaic"):
            raise ValueError('KernelConfig.sparse_de_backend must be "auto", "triton" or "mosaic", got '
                             f"{self.sparse_de_backend!r}")
        if self.forward_backend not in ("auto", "triton", "mosaic"):
            raise ValueError(
                f'KernelConfig.forward_backend must be "auto", "triton" or "mosaic", got {self.forward_backend!r}'
            )
        for name, block in (
            ("forward.block_n", self.forward.block_n), ("forward.block_v", self.forward.block_v),
            ("forward.block_d", self.forward.block_d), ("backward.block_n", self.backward.block_n),
            ("backward.block_v", self.backward.block_v), ("backward.block_d", self.backward.block_d),
            ("backward.block_dout", self.backward.block_dout), ("backward.block_vout", self.backward.vout),
        ):
            if block < 16 or block & (block - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {block}")
        if self.backward.vout > self.backward.block_v:
            raise ValueError(
                f"KernelConfig.backward.block_vout ({self.backward.block_vout}) must divide backward.block_v "
                f"({self.backward.block_v})"
            )
        if self.forward.block_v % self.backward.block_v:
            raise ValueError(
                f"KernelConfig.forward.block_v ({self.forward.block_v}) must be a multiple of backward.block_v "
                f"({self.backward.block_v}): the three-pass path's product tiles subdivide its logits tiles"
            )
        if self.backward.chunk_v % self.backward.block_v:
            raise ValueError(
                f"KernelConfig.backward.chunk_v ({self.backward.chunk_v}) must be a multiple of "
                f"backward.block_v ({self.backward.block_v})"
            )


# Measured with ``python -m cce_jax.autotune`` on an H200 (2026-11-29, jax 0.11.2; benchmarks/autotune-h200.md).
# Keys are (substring of the device kind, shape class); H100s share the H200's SM and shared memory.
_HOPPER_MID_D = KernelConfig(
    forward=ForwardConfig(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=4),
    backward=BackwardConfig(block_n=128, block_v=128, block_d=64, block_dout=128, grad_warps=8, grad_stages=4,
                            product_warps=8, product_stages=3),
)
_HOPPER_LARGE_D = KernelConfig(
    forward=ForwardConfig(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=4),
    backward=BackwardConfig(block_n=64, block_v=128, block_d=64, block_dout=128, grad_warps=4, grad_stages=4,
                            product_warps=4, product_stages=3),
)
TUNED: dict[tuple[str, str], KernelConfig] = {
    (gpu, cls): cfg
    for gpu in ("H200", "H100")
    for cls, cfg in (("half-d<=1024", _HOPPER_MID_D), ("half-d<=3072", _HOPPER_MID_D),
                     ("half-d>3072", _HOPPER_LARGE_D))
}
# Unknown GPUs: tiles whose pipelined operands fit in ~72 KB of shared memory.
DEFAULT = KernelConfig(
    forward=ForwardConfig(block_n=64, block_v=128, block_d=64, num_warps=4, num_stages=3),
    backward=BackwardConfig(block_n=64, block_v=128, block_d=64, block_dout=64),
)


def shape_class(d: int, dtype) -> str:
    """The table's shape classes: operand width (half or f32) and hidden size."""
    width = "half" if jnp.dtype(dtype).itemsize == 2 else "f32"
    size = "d<=1024" if d <= 1024 else "d<=3072" if d <= 3072 else "d>3072"
    return f"{width}-{size}"


TUNING_FILE_ENV = "CCE_JAX_TUNING_FILE"


def config_from_dict(entry: dict) -> KernelConfig:
    """A :class:`KernelConfig` from its ``dataclasses.asdict`` form (nested configs as dicts)."""
    nested = {"forward": ForwardConfig, "backward": BackwardConfig, "mosaic": MosaicForwardConfig,
              "mosaic_chunk": MosaicForwardConfig, "mosaic_sparse_de": MosaicSparseDeConfig}

    def build(cls, fields: dict):
        if cls is MosaicForwardConfig:
            # Tables saved before the persistent grid name its vocabulary splits, now chosen per problem.
            fields = {k: v for k, v in fields.items() if k != "v_splits"}
        return cls(**fields)

    return KernelConfig(**{k: (build(nested[k], v) if k in nested and isinstance(v, dict) else v)
                           for k, v in entry.items()})


def _tuning_file(path: str) -> dict[tuple[str, str], KernelConfig]:
    """The table at ``path``, read again whenever the file changes (an autotune run rewriting it in place)."""
    st = os.stat(path)
    return _read_tuning_file(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _read_tuning_file(path: str, mtime_ns: int, size: int) -> dict[tuple[str, str], KernelConfig]:
    del mtime_ns, size  # cache key only
    with open(path) as f:
        entries = json.load(f)["entries"]
    return {(x["device_kind"], x["shape_class"]): config_from_dict(x["config"]) for x in entries}


def default_config(d: int, dtype) -> KernelConfig:
    """The block config for this GPU and shape class.

    Looks first in the table written by ``python -m cce_jax.autotune --save PATH`` when the environment variable
    ``CCE_JAX_TUNING_FILE`` names one, then in :data:`TUNED`, else returns :data:`DEFAULT`.
    """
    kind = jax.devices()[0].device_kind
    cls = shape_class(d, dtype)
    path = os.environ.get(TUNING_FILE_ENV)
    if path:
        tuned = _tuning_file(path).get((kind, cls))
        if tuned is not None:
            return tuned
    for (gpu, table_cls), cfg in TUNED.items():
        if gpu in kind and table_cls == cls:
            return cfg
    return DEFAULT


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret=None`` means Pallas interpret mode exactly when no GPU is present."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def kernels_preferred(dtype, interpret: bool | None) -> bool:
    """``impl="auto"`` runs the kernels on GPUs (compiled) for the dtypes they support."""
    return (
        jax.default_backend() == "gpu"
        and not resolve_interpret(interpret)
        and jnp.dtype(dtype) in options_lib.SUPPORTED_DTYPES
    )


def _chunk(cfg: KernelConfig, p: Problem, itemsize: int) -> BackwardConfig:
    bwd = cfg.backward
    by_budget = cfg.grad_buffer_bytes // max(1, p.n * itemsize)
    chunk = min(bwd.chunk_v, by_budget, tiles.cdiv(p.v, bwd.block_v) * bwd.block_v)
    chunk = max(bwd.block_v, chunk // bwd.block_v * bwd.block_v)
    return dataclasses.replace(bwd, chunk_v=chunk)


def _problem(e, c, bias, spec: LogitSpec) -> Problem:
    return Problem(
        n=e.shape[0], d=e.shape[1], v=spec.vocab_size(c), layout=spec.layout, softcap=spec.softcap,
        has_bias=bias is not None,
    )


HOPPER_KINDS = ("H100", "H200", "H800", "GH200")


def _on_hopper() -> bool:
    return jax.default_backend() == "gpu" and any(k in jax.devices()[0].device_kind for k in HOPPER_KINDS)


def _varies(*xs) -> bool:
    return any(x is not None and jax.typeof(x).mat.varying for x in xs)


def _mosaic_eligible(e, c, bias, interpret: bool) -> bool:
    """What ``forward_backend="auto"`` requires of either Mosaic GPU kernel before its shape rules: compiled on a
    Hopper GPU, half-precision inputs, outside ``shard_map`` axes (its outputs carry no varying-axes types)."""
    return not interpret and jnp.dtype(e.dtype).itemsize == 2 and not _varies(e, c, bias) and _on_hopper()


def use_mosaic_forward(e, c, bias, p: Problem, config: KernelConfig, interpret: bool) -> bool:
    """Whether the forward runs the Mosaic GPU kernel (:mod:`pallas_kernels.mosaic_forward`).

    ``config.forward_backend="auto"``: on Hopper GPUs (compiled, not interpret mode), for half-precision inputs
    and shapes its bulk copies support, outside ``shard_map`` axes it would have to declare (its outputs carry
    no varying-axes types); everywhere else the Triton forward. ``"mosaic"`` requires it (and raises where it
    cannot run), ``"triton"`` never uses it.
    """
    backend = config.forward_backend
    if backend == "triton":
        return False
    from pallas_kernels import mosaic_forward  # noqa: PLC0415

    if backend == "mosaic":
        mosaic_forward.check_supported(e, c, p, config.mosaic)
        return True
    return _mosaic_eligible(e, c, bias, interpret) and mosaic_forward.supports(e, c, p, config.mosaic)


def use_mosaic_logits(e, c, bias, p: Problem, config: KernelConfig, interpret: bool) -> bool:
    """Whether the three-pass path's logits chunk runs the Mosaic GPU kernel
    (:func:`pallas_kernels.mosaic_logits_chunk.logits_chunk_mosaic`): the rules of :func:`use_mosaic_forward` for
    the chunk's problem, plus whole row blocks and product tiles that subdivide the Mosaic tiles."""
    cfg = config.mosaic_chunk
    if config.forward_backend == "triton" or cfg.block_v % config.backward.block_v:
        return False
    from pallas_kernels import mosaic_forward  # noqa: PLC0415

    if config.forward_backend == "mosaic":
        mosaic_forward.check_supported(e, c, p, cfg, store=True)
        return True
    return _mosaic_eligible(e, c, bias, interpret) and mosaic_forward.supports(e, c, p, cfg, store=True)


def use_mosaic_sparse_de(dtype, config: KernelConfig, interpret: bool) -> bool:
    """Whether the three-pass path may run its block-sparse dE product on the Mosaic GPU kernel (then per chunk
    where its shape rules hold, outside ``shard_map`` axes; :func:`cce_jax.three_pass._mosaic_de`).
    ``"auto"``: compiled on a Hopper GPU and half-precision inputs; ``"mosaic"``: half-precision inputs (in
    interpret mode: the Mosaic GPU interpreter). The kernel's rows must also be the filter flags' rows, which
    :func:`cce_jax.three_pass._mosaic_de` checks with the shape rules."""
    backend = config.sparse_de_backend
    if backend == "triton":
        return False
    if jnp.dtype(dtype).itemsize != 2:
        return False
    return backend == "mosaic" or (not interpret and _on_hopper())


@dataclasses.dataclass(frozen=True)
class ChunkLogits:
    """Pass 1 and 2 of the three-pass path on the kernels.

    Pass 1 stores the chunk's logits once in the input's precision, each tile relative to its row maxima, with
    exact float32 statistics: :func:`pallas_kernels.logits_chunk.logits_chunk` (Triton) or, where
    :func:`use_mosaic_logits` says so, :func:`pallas_kernels.mosaic_logits_chunk.logits_chunk_mosaic`. Pass 2
    (:func:`pallas_kernels.chunk_grad.chunk_grad`) writes the logit gradient over that buffer. The tile width
    follows from the shapes the pass returns, so either kernel may serve a chunk.
    """

    spec: LogitSpec
    config: KernelConfig
    interpret: bool

    @property
    def rows(self) -> int:
        """Chunks are multiples of this many rows (the Mosaic kernel stores whole row blocks)."""
        backend = self.config.forward_backend
        if backend == "mosaic" or (backend == "auto" and not self.interpret and _on_hopper()):
            return max(self.config.forward.block_n, self.config.mosaic_chunk.block_n)
        return self.config.forward.block_n

    def __call__(self, e_k, t_k, c, bias):
        from pallas_kernels.logits_chunk import logits_chunk  # noqa: PLC0415
        from pallas_kernels.mosaic_logits_chunk import logits_chunk_mosaic  # noqa: PLC0415

        p = three_pass.problem(e_k.shape[0], e_k.shape[1], self.spec.vocab_size(c), self.spec, bias is not None)
        if use_mosaic_logits(e_k, c, bias, p, self.config, self.interpret):
            return logits_chunk_mosaic(e_k, c, bias, t_k, p=p, cfg=self.config.mosaic_chunk,
                                       need_sum=self.spec.need_sum, interpret=self.interpret)
        return logits_chunk(e_k, c, bias, t_k, p=p, cfg=self.config.forward, need_sum=self.spec.need_sum,
                            interpret=self.interpret)

    def log_probs(self, x, m, lse):
        """float32 ``log p`` of the buffer's entries (-inf past V): each tile's values plus their row maxima."""
        tile = x.shape[1] // m.shape[1]
        return x.astype(jnp.float32) + jnp.repeat(m, tile, axis=1) - lse[:, None]

    def gradient(self, x, m, lse, t_k, coeffs_k, *, v: int, col_sums: bool, dtype):
        """G written over the buffer ``x`` and its float32 column sums (or None)."""
        from pallas_kernels.chunk_grad import chunk_grad  # noqa: PLC0415

        del dtype  # the buffer's, which is the input's
        g, col = chunk_grad(x, m, lse, t_k, *coeffs_k, v=v, tile=x.shape[1] // m.shape[1],
                            softcap=self.spec.softcap, need_sum=self.spec.need_sum, col_sums=col_sums,
                            interpret=self.interpret)
        return g, (None if col is None else col[:v])


def _forward(e, c, bias, targets, spec, config, interpret):
    p = _problem(e, c, bias, spec)
    if use_mosaic_forward(e, c, bias, p, config, interpret):
        from pallas_kernels.mosaic_forward import lse_forward_mosaic  # noqa: PLC0415

        stats = lse_forward_mosaic(e, c, bias, targets, p=p, cfg=config.mosaic, need_sum=spec.need_sum,
                                   interpret=interpret)
    else:
        stats = lse_forward(e, c, bias, targets, p=p, cfg=config.forward, need_sum=spec.need_sum,
                            interpret=interpret)
    return TokenStats(*stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _token_stats(e, c, bias, targets, spec, bwd, config, interpret):
    return _forward(e, c, bias, targets, spec, config, interpret)


def _token_stats_fwd(e, c, bias, targets, spec, bwd, config, interpret):
    stats = _forward(e, c, bias, targets, spec, config, interpret)
    return stats, (e, c, bias, targets, stats.lse)


def _xla_dot(a, b, contract_a: int, contract_b: int, out_dtype):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=out_dtype)


def _token_stats_bwd(spec: LogitSpec, bwd: BackwardOptions, config: KernelConfig, interpret: bool, res,
                     cotangents):
    """Walks the vocabulary in chunks. A side (dE or dC) that may skip filtered tiles uses the block-sparse
    Pallas product, unless more than ``dense_fraction`` of the chunk's tiles are live; otherwise, and for a side
    that may not skip, XLA's dense matmul multiplies the same gradient buffer (faster when little is skipped)."""
    e, c, bias, targets, lse = res
    g_lse, g_target, g_sum = cotangents
    p = _problem(e, c, bias, spec)
    cfg = _chunk(config, p, jnp.dtype(e.dtype).itemsize)
    vaxis = 0 if p.layout == "vd" else 1
    de_dtype = jnp.float32 if bwd.accum_e_fp32 else e.dtype
    db_shape = (p.v,) if bias is not None else (1,)
    filters = bwd.filter_eps if (bwd.filters_e or bwd.filters_c) else None

    def dense_de(g_w, c_w, de):
        return (de.astype(jnp.float32) + _xla_dot(g_w, c_w, 1, vaxis, jnp.float32)).astype(de.dtype)

    def dense_dc(g_w, start, dc, db):
        block = _xla_dot(g_w, e, 0, 0, dc.dtype) if p.layout == "vd" else _xla_dot(e, g_w, 0, 0, dc.dtype)
        dc = lax.dynamic_update_slice_in_dim(dc, block, start, axis=vaxis)
        if bias is not None:
            db = lax.dynamic_update_slice_in_dim(db, g_w.astype(jnp.float32).sum(axis=0), start, axis=0)
        return dc, db

    def chunk_step(start, width, carry):
        """Processes vocabulary columns [start, start + width); ``width`` is static."""
        de, dc, db = carry
        v_start = jnp.asarray(start, jnp.int32).reshape(1)
        sparse = filters is not None and bwd.filters_e and bwd.filters_c
        g, live = logit_grad(e, c, bias, targets, lse, g_lse, g_target, g_sum, v_start, p=p, cfg=cfg,
                             need_sum=spec.need_sum, filter_eps=filters, store_all=not sparse,
                             interpret=interpret)
        c_w = lax.dynamic_slice_in_dim(c, start, width, axis=vaxis)

        def dense_input():
            # Tiles a sparse-only buffer left unwritten hold garbage; the dense products read zeros there.
            g_w = g[:, :width]
            return jnp.where(expand_live(live, cfg, p.n)[:, :width], g_w, 0) if sparse else g_w

        if filters is None:
            g_w = dense_input()
            return dense_de(g_w, c_w, de), *dense_dc(g_w, start, dc, db)
        cols_of_row, count_of_row, rows_of_col, count_of_col = live_lists(live)
        if config.dense_fraction >= 1.0:
            # No conditional at all: a cond whose branch updates dC in place makes XLA copy dC (V x D).
            dense = None
        else:
            dense = jnp.mean(live.astype(jnp.float32)) > config.dense_fraction

        def sparse_de(de):
            return accumulate_de(g, cols_of_row, count_of_row, c, v_start, de, p=p, cfg=cfg, interpret=interpret)

        def sparse_dc(dc, db):
            return write_dc(g, rows_of_col, count_of_col, e, v_start, dc, db, p=p, cfg=cfg, interpret=interpret)

        if not bwd.filters_e:
            de = dense_de(dense_input(), c_w, de)
        elif dense is None:
            de = sparse_de(de)
        else:
            de = lax.cond(dense, lambda de: dense_de(dense_input(), c_w, de), sparse_de, de)
        if not bwd.filters_c:
            dc, db = dense_dc(dense_input(), start, dc, db)
        elif dense is None:
            dc, db = sparse_dc(dc, db)
        else:
            dc, db = lax.cond(dense, lambda dc, db: dense_dc(dense_input(), start, dc, db), sparse_dc, dc, db)
        return de, dc, db

    vary = lambda x: varying_like(x, e, c, bias, targets, lse, g_lse, g_target, g_sum)  # noqa: E731
    carry = (vary(jnp.zeros(e.shape, de_dtype)), vary(jnp.zeros(c.shape, c.dtype)),
             vary(jnp.zeros(db_shape, jnp.float32)))
    full_chunks, tail = divmod(p.v, cfg.chunk_v)
    if full_chunks:
        carry = lax.fori_loop(
            0, full_chunks, lambda k, carry: chunk_step(k * cfg.chunk_v, cfg.chunk_v, carry), carry
        )
    if tail:
        carry = chunk_step(full_chunks * cfg.chunk_v, tail, carry)
    de, dc, db = carry
    dbias = None if bias is None else db.astype(bias.dtype)
    return de.astype(e.dtype), dc, dbias, None


_token_stats.defvjp(_token_stats_fwd, _token_stats_bwd)


def token_stats(
    e: jax.Array,
    c: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    *,
    spec: LogitSpec,
    backward: BackwardOptions,
    config: KernelConfig | None = None,
    interpret: bool | None = None,
) -> TokenStats:
    if config is None:
        config = default_config(e.shape[1], e.dtype)
    return _token_stats(e, c, bias, targets, spec, backward, config, resolve_interpret(interpret))


def chunk_plan(n: int, d: int, v: int, dtype, logits: ChunkLogits, budget_bytes: int) -> three_pass.Plan:
    """The three-pass plan for the kernels: chunks aligned to the logits kernels' and the products' row blocks,
    buffers as wide as either logits kernel writes them."""
    config = logits.config
    return three_pass.make_plan(n, d, v, dtype, budget_bytes=budget_bytes, chunk=config.chunk_tokens,
                                row_align=max(logits.rows, config.backward.block_n),
                                col_align=max(config.forward.block_v, config.mosaic_chunk.tile_v))


def training_impl(
    n: int,
    d: int,
    v: int,
    dtype,
    *,
    spec: LogitSpec,
    backward: BackwardOptions,
    config: KernelConfig | None,
    interpret: bool | None,
    budget_bytes: int,
    stats_fn: TokenStatsFn,
) -> three_pass.TrainingImpl:
    """The three-pass path with the kernels: the Pallas one-pass forward for evaluation; for training, dense
    XLA products on sides that may not filter and, on sides that may, a per-chunk choice between XLA's dense
    products and the block-sparse Pallas products. ``stats_fn`` is :func:`token_stats` with these options bound
    (the recompute path)."""
    if config is None:
        config = default_config(d, dtype)
    interpret = resolve_interpret(interpret)
    sparse = None
    if backward.filters_e or backward.filters_c:
        sparse = three_pass.SparseProducts(
            filter_eps=backward.filter_eps, filter_e=backward.filters_e, filter_c=backward.filters_c,
            dense_fraction=config.chunk_dense_fraction, config=config.backward, interpret=interpret,
            dc_mode=config.chunk_dc, sort_vocab=config.sort_vocab,
            mosaic_de=config.mosaic_sparse_de if use_mosaic_sparse_de(dtype, config, interpret) else None,
        )
    logits = ChunkLogits(spec, config, interpret)
    plan = chunk_plan(n, d, v, dtype, logits, budget_bytes)
    return three_pass.TrainingImpl(
        forward=functools.partial(_forward, spec=spec, config=config, interpret=interpret),
        gradients=functools.partial(three_pass.gradients, spec=spec, plan=plan, logits=logits,
                                    accum_c_fp32=backward.accum_c_fp32, sparse=sparse),
        stats_fn=stats_fn,
    )
