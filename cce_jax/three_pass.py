"""The three-pass training path: loss, dE and dC from one computation of the logits.

A scalar loss (reduction ``"mean"`` or ``"sum"``, with any weights, label smoothing and z-loss) is

    loss = sum_n [a_n lse_n + b_n z_{n,t_n} + s_n sum_v z_nv + q_n lse_n^2]

with per-token coefficients ``(a, b, s, q)`` that the semantics layer computes before any logit exists
(:class:`cce_jax.stats.LossCoefficients`). Its gradient with respect to the logits is known as soon as the
token's lse is:

    dloss/dz_nv = ((a_n + 2 q_n lse_n) p_nv + s_n) cap'_nv + b_n [v == t_n] cap'_nv.

So :func:`scalar_loss`'s ``custom_vjp`` *forward* rule (which JAX runs only when the loss is differentiated)
walks the tokens in chunks (a ``lax.scan``) and, for each chunk,

1. computes the chunk's logits once (matmul 1) into a buffer, with their exact float32 statistics (lse,
   target logit, sum of logits): the kernels store each (block_n, block_v) tile in the input's precision
   relative to its row maxima (so every entry that carries probability keeps nearly full relative precision,
   whatever the logits' magnitude); plain XLA keeps float32 logits;
2. forms the logit gradient G in the input's precision (the kernels write it over the buffer:
   :func:`pallas_kernels.chunk_grad.chunk_grad`);
3. computes the chunk's dE rows ``G c`` (matmul 2) and adds ``G^T e_chunk`` into dC (matmul 3), with dense
   XLA products (dC's added in place by the GEMM) or, for sides that may filter, block-sparse kernels that
   skip tiles whose every ``|p - onehot|`` is below ``filter_eps`` (known from the statistics before G is
   formed); :class:`SparseProducts` says how each side chooses. Where dC's product is dense the first chunk
   runs before the scan and writes dC (no zero-filled dC to initialise and re-read).

With ``SparseProducts.sort_vocab`` the whole walk runs over the vocabulary in :func:`vocab_order` (classifier
gathered once, dC gathered back), so that probable entries share tiles and more tiles are skipped.

No logit is computed twice, and the temporary memory is one chunk of logits, overwritten by its gradient
(``Plan``; 45% of the gradients' bytes at the gemma2 and llama3 shapes on an H200). The backward rule
scales the stored gradients by the incoming scalar cotangent. Per-token cotangents (a differentiated
``return_lse``) cannot be folded in ahead of time; for those the backward adds the implementation's exact
recompute VJP (``TrainingImpl.stats_fn``), only when such a cotangent is actually nonzero.

Evaluation without gradients runs the primal function: the implementation's one-pass forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from cce_jax import logits as logits_lib
from cce_jax.stats import LogitSpec, LossCoefficients, TokenStats
from cce_jax.vma import varying_like

_MIB = 1 << 20
# Default temporary-memory budget: this fraction of the bytes of the gradients the call returns (dE, dC).
DEFAULT_BUDGET_FRACTION = 0.45
MIN_BUDGET_BYTES = 32 * _MIB
# Each extra chunk re-reads and re-writes dC (V x D): about the cost of this many more token rows of the three
# matmul passes on an H200, so the chunking weighs fewer chunks against padded rows.
CHUNK_OVERHEAD_ROWS = 128


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the three-pass path walks the tokens: ``num_chunks`` chunks of ``chunk`` tokens, each starting at a
    multiple of ``align`` rows (the kernels' TMA copies want aligned row blocks).

    When ``chunk * num_chunks > N`` the last chunk ends at row N and overlaps the one before it, its rows already
    covered given zero coefficients (no copy of e); only when N is smaller than a chunk or not a multiple of
    ``align`` are e and the token arrays padded instead.
    """

    chunk: int
    num_chunks: int
    align: int = 1

    def overlaps(self, n: int) -> bool:
        """Whether the last chunk overlaps (True) rather than being padded (False) for N tokens."""
        return n >= self.chunk and n % self.align == 0

    def starts(self, n: int) -> list[int]:
        return [min(i * self.chunk, n - self.chunk) if self.overlaps(n) else i * self.chunk
                for i in range(self.num_chunks)]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_budget(e_shape, c_shape, dtype) -> int:
    """``DEFAULT_BUDGET_FRACTION`` of the gradients' bytes (dE and dC), at least ``MIN_BUDGET_BYTES``."""
    itemsize = jnp.dtype(dtype).itemsize
    grad_bytes = itemsize * (e_shape[0] * e_shape[1] + c_shape[0] * c_shape[1])
    return max(MIN_BUDGET_BYTES, int(DEFAULT_BUDGET_FRACTION * grad_bytes))


def make_plan(n: int, d: int, v: int, dtype, *, budget_bytes: int, extra_bytes_per_entry: int = 0,
              row_align: int = 8, col_align: int = 1, chunk: int | None = None) -> Plan:
    """Chunks whose buffers fit ``budget_bytes``.

    Per token a chunk holds V logits in the input's precision plus ``extra_bytes_per_entry`` per logit (the
    XLA path's float32 logits), and the float32 dE rows of a block-sparse dE product. Among the chunk counts
    that fit, the cheapest by ``chunk * count + CHUNK_OVERHEAD_ROWS * count`` wins.
    """
    if chunk is not None:
        chunk = _round_up(max(1, chunk), row_align)
        return Plan(chunk=chunk, num_chunks=-(-n // chunk), align=row_align)
    per_row = (jnp.dtype(dtype).itemsize + extra_bytes_per_entry) * _round_up(v, col_align) + 4 * d
    most = max(row_align, budget_bytes // per_row // row_align * row_align)
    fewest = -(-n // most)
    best, best_cost = None, None
    for k in range(fewest, fewest + 16):
        size = _round_up(-(-n // k), row_align)
        cost = (size + CHUNK_OVERHEAD_ROWS) * k
        if size <= most and (best is None or cost < best_cost):
            best, best_cost = Plan(chunk=size, num_chunks=k, align=row_align), cost
    return best


DC_MODES = ("sampled", "per_chunk", "sparse", "dense")


@dataclasses.dataclass(frozen=True)
class SparseProducts:
    """Block-sparse gradient products (Pallas kernels) for the sides that may skip filtered tiles.

    dE: for every chunk its live-tile fraction decides the product: above ``dense_fraction`` XLA's dense
    product, below it the block-sparse kernel that visits only live tiles (dE rows are the scan's per-chunk
    outputs, so the choice costs nothing).

    dC is accumulated in place across chunks (the scan's carry), where a run-time choice per chunk makes XLA
    copy dC. ``dc_mode`` says how dC's product is chosen:

    - ``"sampled"``: once per call, before the scan, from the live-tile fraction of one sampled row block of
      tokens (one ``block_n``-row logits pass, about ``block_n / N`` of a pass): the whole scan then runs with
      the dense or the block-sparse dC product (a ``lax.cond`` around two scans, neither of which copies dC);
    - ``"per_chunk"``: the same choice per chunk (``lax.cond`` inside the scan; XLA may copy dC);
    - ``"sparse"`` / ``"dense"``: always the block-sparse kernel (which leaves rows without live tiles
      untouched) / always XLA's dense product.

    ``mosaic_de``: the tiles of the Mosaic GPU block-sparse dE product
    (:func:`pallas_kernels.mosaic_sparse_de.sparse_de_mosaic`), used instead of the Triton one wherever its
    shape rules hold; None: always Triton.

    ``sort_vocab``: walk the vocabulary in the order :func:`vocab_order` derives from one sampled row block
    (entries by their largest probability over the block, most probable first), so that the entries that carry
    probability share tiles and the others form whole dead tiles. The classifier (and bias) are gathered into
    that order once per call and dC is gathered back: 2 x bytes(dC) of temporary memory on top of the chunk
    budget. dC's product is then chosen from a second sampled row block, in the sorted order (the block the
    order comes from would look sparser than the batch).
    """

    filter_eps: float
    filter_e: bool
    filter_c: bool
    dense_fraction: float
    config: Any  # pallas_kernels.backward.BackwardConfig
    interpret: bool
    dc_mode: str = "sampled"
    sort_vocab: bool = False
    mosaic_de: Any = None  # pallas_kernels.mosaic_sparse_de.MosaicSparseDeConfig: dE's sparse product on Mosaic GPU

    def __post_init__(self):
        if self.dc_mode not in DC_MODES:
            raise ValueError(f"dc_mode must be one of {DC_MODES}, got {self.dc_mode!r}")


def _dot(a, b, contract_a: int, contract_b: int, out_dtype=jnp.float32):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=logits_lib.matmul_precision(a.dtype), preferred_element_type=out_dtype)


@dataclasses.dataclass(frozen=True)
class XlaLogits:
    """Pass 1 in plain XLA: the chunk's float32 logits (one matmul) and their statistics."""

    spec: LogitSpec
    bytes_per_entry: int = 4  # plus the gradient buffer in the input's dtype
    rows = 1  # any number of rows

    def __call__(self, e_k, t_k, c, bias):
        z = logits_lib.logits(e_k, c, bias, self.spec.layout, self.spec.softcap)
        lse = jax.nn.logsumexp(z, axis=1)
        hit = jnp.arange(z.shape[1])[None, :] == t_k[:, None]
        target = jnp.where(hit, z, 0.0).sum(axis=1)
        total = z.sum(axis=1) if self.spec.need_sum else jnp.zeros_like(lse)
        return z, None, lse, target, total

    def log_probs(self, z, m, lse):
        """float32 ``log p`` of the buffer's entries (-inf past V)."""
        del m
        return z - lse[:, None]

    def gradient(self, z, m, lse, t_k, coeffs_k, *, v: int, col_sums: bool, dtype):
        """``(G in dtype, float32 column sums of G or None)`` from the float32 logits ``z``."""
        del m
        a, b, s, q = coeffs_k
        p = jnp.exp(z - lse[:, None])
        onehot = jnp.arange(z.shape[1])[None, :] == t_k[:, None]
        g = (a + 2.0 * q * lse)[:, None] * p + jnp.where(onehot, b[:, None], 0.0)
        if self.spec.need_sum:
            g = g + s[:, None]
        if self.spec.softcap is not None:
            g = g * logits_lib.softcap_grad(z, self.spec.softcap)
        return g.astype(dtype), (g.sum(axis=0)[:v] if col_sums else None)


def _chunk_gradients(e_k, t_k, coeffs_k, c, bias, *, spec: LogitSpec, logits, need: tuple[bool, bool, bool],
                     sparse: SparseProducts | None, dc_mode: str | None, carry, dc_dtype=None):
    """One token chunk: stats, and its dE rows and contributions to dC / dbias added into ``carry``.

    ``need`` says which of (dE, dC, dbias) to form. ``carry = (de_rows, dc, db)``: the chunk's current rows of
    dE (e's dtype), dC and the float32 dbias. With ``dc_dtype`` given (the first chunk, dense dC) ``dc`` and
    ``db`` are not read: the chunk writes its products instead of adding them, so no zero-filled dC is
    initialised and re-read.
    """
    need_de, need_dc, need_db = need
    need_db = need_db and bias is not None
    need_dc = need_dc or need_db
    de_rows, dc, db = carry
    v = spec.vocab_size(c)
    vaxis = 0 if spec.layout == "vd" else 1

    # Pass 1: the chunk's logits, kept in a buffer, and their exact statistics.
    x, m, lse, target, total = logits(e_k, t_k, c, bias)

    # Pass 2: the logit gradient, in the input's precision (in the buffer's place for the kernels).
    g, col_sum = logits.gradient(x, m, lse, t_k, coeffs_k, v=v, col_sums=need_db, dtype=e_k.dtype)
    live = None if sparse is None else _live_tiles(m, lse, t_k, coeffs_k, x.shape[1] // m.shape[1], sparse)

    # Pass 3: the products of the whole chunk.
    if need_de:
        de_rows = _chunk_de(g, c, de_rows, live, v=v, vaxis=vaxis, spec=spec, sparse=sparse)
    if need_dc:
        dc, db = _chunk_dc(g, e_k, dc, db, col_sum, live, v=v, spec=spec, sparse=sparse, mode=dc_mode,
                           dc_dtype=dc_dtype)
    return TokenStats(lse, target, total), (de_rows, dc, db)


def _live_tiles(m, lse, t_k, coeffs_k, tile: int, sparse: SparseProducts):
    """int32 flag per (block_n, block_v) product tile: whether some ``|p - onehot|`` in it may reach
    ``filter_eps``, from each statistics tile's largest probability ``exp(m - lse)``; a tile holding a target
    counts as live (its onehot entry deviates by ``1 - p``). Rows whose coefficients are all zero (ignored
    tokens, the padding of the last chunk) have a zero gradient and keep no tile live. Exact for whole tiles,
    never optimistic."""
    bn, bv = sparse.config.block_n, sparse.config.block_v
    rows, num = m.shape
    active = functools.reduce(jnp.logical_or, (x != 0 for x in coeffs_k))
    live = jnp.exp(m - lse[:, None]) >= sparse.filter_eps
    live = live | (jnp.arange(num)[None, :] == (t_k // tile)[:, None])
    live = live & active[:, None]
    live = jnp.repeat(live, tile // bv, axis=1)
    return live.reshape(rows // bn, bn, -1).any(axis=1).astype(jnp.int32)


def problem(n: int, d: int, v: int, spec: LogitSpec, has_bias: bool = False):
    from pallas_kernels.tiles import Problem  # noqa: PLC0415

    return Problem(n=n, d=d, v=v, layout=spec.layout, softcap=spec.softcap, has_bias=has_bias)


def _live_fraction(live):
    return jnp.mean(live.astype(jnp.float32))


def _chunk_de(g, c, de_rows, live, *, v, vaxis, spec, sparse):
    """``de_rows + G c`` in dE's dtype: XLA's dense product (one GEMM adding into the rows in place), or the
    block-sparse kernel when few tiles are live."""
    d = c.shape[1 - vaxis]

    def dense():
        # In dE's own dtype, added to the rows: one GEMM with float32 arithmetic and one rounding (the rows
        # hold zeros, or an earlier chunk's values where this chunk's coefficients are zero), and no float32
        # (chunk, D) temporary.
        return de_rows + _dot(g[:, :v], c, 1, vaxis, de_rows.dtype)

    if sparse is None or not sparse.filter_e:
        return dense()
    from pallas_kernels import backward as kernels  # noqa: PLC0415

    cfg = dataclasses.replace(sparse.config, chunk_v=g.shape[1])
    layout = spec.layout
    product = _mosaic_de(g, c, live, sparse, layout)
    if product is None:
        cols_of_row, count_of_row, _, _ = kernels.live_lists(live)

        def product():
            zeros = varying_like(jnp.zeros((g.shape[0], d), jnp.float32), g, c)
            return kernels.accumulate_de(g, cols_of_row, count_of_row, c, jnp.zeros((1,), jnp.int32), zeros,
                                         p=problem(g.shape[0], d, v, spec), cfg=cfg, interpret=sparse.interpret)

    def sparse_de():
        return (de_rows.astype(jnp.float32) + product()).astype(de_rows.dtype)

    return lax.cond(_live_fraction(live) > sparse.dense_fraction, dense, sparse_de)


def _mosaic_de(g, c, live, sparse: SparseProducts, layout: str):
    """The Mosaic GPU block-sparse dE product as a thunk, or None where it does not apply (then Triton's)."""
    cfg = sparse.mosaic_de
    # Its outputs carry no varying-axes types, so not inside shard_map axes; its rows are the flags' rows.
    if cfg is None or cfg.block_n != sparse.config.block_n or any(jax.typeof(x).mat.varying for x in (g, c)):
        return None
    from pallas_kernels import mosaic_sparse_de as msd  # noqa: PLC0415

    lists = msd.live_lists(live)
    if not msd.supports(g, c, lists, layout, sparse.config.block_v, cfg):
        return None
    return lambda: msd.sparse_de_mosaic(g, lists, c, layout=layout, tile_v=sparse.config.block_v, cfg=cfg,
                                        interpret=sparse.interpret)


def _chunk_dc(g, e_k, dc, db, col_sum, live, *, v, spec, sparse, mode, dc_dtype=None):
    """``dc + G^T e_chunk`` (and ``db`` + the column sums of G), in place in the scan carry; with ``dc_dtype``
    the dense product alone (the first chunk: ``dc`` and ``db`` are not read)."""

    def dense(dc, db):
        # The product in dC's own dtype, added to dC: XLA runs ``dc + g^T e`` as one GEMM that reads and writes
        # dC in place (beta = 1, float32 arithmetic, one rounding). A float32 product added to a half dC made
        # XLA keep a float32 (V, D) temporary: 2.3 GB and ~0.8 ms per chunk at the gemma2 shape on an H200.
        dtype = dc.dtype if dc_dtype is None else dc_dtype
        update = (_dot(g[:, :v], e_k, 0, 0, dtype) if spec.layout == "vd" else
                  _dot(e_k, g[:, :v], 0, 0, dtype))
        if dc_dtype is not None:
            return update, col_sum
        return dc + update, (None if db is None else db + col_sum)

    if dc_dtype is not None:
        return dense(None, None)
    if sparse is None or not sparse.filter_c:
        return dense(dc, db)
    from pallas_kernels import backward as kernels  # noqa: PLC0415

    cfg = dataclasses.replace(sparse.config, chunk_v=g.shape[1])
    _, _, rows_of_col, count_of_col = kernels.live_lists(live)

    def sparse_dc(dc, db):
        db_in = varying_like(jnp.zeros((1,), jnp.float32), dc) if db is None else db
        dc, db_out = kernels.write_dc(g, rows_of_col, count_of_col, e_k, jnp.zeros((1,), jnp.int32), dc, db_in,
                                      p=problem(g.shape[0], e_k.shape[1], v, spec, db is not None), cfg=cfg,
                                      accumulate=True, interpret=sparse.interpret)
        return dc, (None if db is None else db_out)

    if mode == "sparse":
        return sparse_dc(dc, db)
    if mode == "dense":
        return dense(dc, db)
    return lax.cond(_live_fraction(live) > sparse.dense_fraction, dense, sparse_dc, dc, db)


def _pad_rows(x, rows: int, value):
    if x.shape[0] == rows:
        return x
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=value)


def _sampled_rows(e, targets, coeffs: LossCoefficients, rows: int, block: str):
    """One ``rows``-row block of tokens (the middle one, or the first with ``block="first"``), zero rows padding
    it when N is smaller: ``(e, targets, coeffs)`` of the block."""
    n = e.shape[0]
    start = 0 if block == "first" else max(0, (n - rows) // 2) // rows * rows  # whole blocks: aligned TMA
    take = lambda x, value: _pad_rows(lax.slice_in_dim(x, start, min(n, start + rows)), rows, value)  # noqa: E731
    return take(e, 0), take(targets, -1), LossCoefficients(*(take(x.astype(jnp.float32), 0.0) for x in coeffs))


def _sampled_logits(e, c, bias, targets, coeffs: LossCoefficients, *, logits, sparse: SparseProducts, block: str):
    """One logits pass over a ``block_n``-row block of tokens (see :func:`_sampled_rows`):
    ``(x, m, lse, targets, coeffs)`` of the block."""
    e_s, t_s, coeffs_s = _sampled_rows(e, targets, coeffs, max(sparse.config.block_n, logits.rows), block)
    x, m, lse, _, _ = logits(e_s, t_s, c, bias)
    return x, m, lse, t_s, coeffs_s


def sampled_live_fraction(e, c, bias, targets, coeffs: LossCoefficients, *, logits, sparse: SparseProducts,
                          block: str = "middle"):
    """Live-tile fraction of one ``block_n``-row block of tokens (see :func:`_sampled_rows`), from one logits
    pass over those rows."""
    x, m, lse, t_s, coeffs_s = _sampled_logits(e, c, bias, targets, coeffs, logits=logits, sparse=sparse,
                                               block=block)
    return _live_fraction(_live_tiles(m, lse, t_s, coeffs_s, x.shape[1] // m.shape[1], sparse))


def vocab_order(e, c, bias, targets, coeffs: LossCoefficients, *, logits, sparse: SparseProducts):
    """int32 (V,): the vocabulary ordered by each entry's largest probability over the middle ``block_n`` rows
    of tokens that carry a gradient (one logits pass over them), most probable first; ties (entries no sampled
    token makes probable) keep their natural order, so the order is deterministic."""
    x, m, lse, _, coeffs_s = _sampled_logits(e, c, bias, targets, coeffs, logits=logits, sparse=sparse,
                                             block="middle")
    active = functools.reduce(jnp.logical_or, (w != 0 for w in coeffs_s))
    score = jnp.where(active[:, None], logits.log_probs(x, m, lse), -jnp.inf).max(axis=0)
    return jnp.argsort(-score[:logits.spec.vocab_size(c)], stable=True).astype(jnp.int32)


def gradients(e, c, bias, targets, coeffs: LossCoefficients, *, spec: LogitSpec, plan: Plan, logits,
              need: tuple[bool, bool, bool], accum_c_fp32: bool, sparse: SparseProducts | None = None):
    """Per-token stats and the gradients of ``sum_n [a lse + b z_t + s sum z + q lse^2]`` (unit cotangent).

    ``need`` says which of (dE, dC, dbias) to form; the others come back None. Tokens are walked in
    ``plan.num_chunks`` chunks by a ``lax.scan``; dE (e's dtype), dC (float32 if ``accum_c_fp32``, else c's
    dtype) and the float32 dbias are its carry, so each chunk adds into them in place. Where dC's product is
    dense, the first chunk runs before the scan and writes dC and dbias (rather than adding to zeros). With
    ``sparse.sort_vocab`` the vocabulary is walked in :func:`vocab_order` (see :class:`SparseProducts`).
    """
    kw = dict(spec=spec, plan=plan, logits=logits, need=need, accum_c_fp32=accum_c_fp32, sparse=sparse)
    if sparse is None or not sparse.sort_vocab:
        return _gradients(e, c, bias, targets, coeffs, **kw)
    vaxis = 0 if spec.layout == "vd" else 1
    order = vocab_order(e, c, bias, targets, coeffs, logits=logits, sparse=sparse)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    sorted_targets = jnp.where(targets >= 0, rank[jnp.clip(targets, 0)], targets)
    stats, de, dc, dbias = _gradients(e, jnp.take(c, order, axis=vaxis),
                                      None if bias is None else bias[order], sorted_targets, coeffs, **kw,
                                      sample="first")
    # dC's and dbias' rows go back to their own places (a gather: deterministic).
    dc = None if dc is None else jnp.take(dc, rank, axis=vaxis)
    dbias = None if dbias is None else dbias[rank]
    return stats, de, dc, dbias


def _gradients(e, c, bias, targets, coeffs: LossCoefficients, *, spec: LogitSpec, plan: Plan, logits,
               need: tuple[bool, bool, bool], accum_c_fp32: bool, sparse: SparseProducts | None,
               sample: str = "middle"):
    need_de, need_dc, need_db = need
    need_db = need_db and bias is not None
    need_dc = need_dc or need_db
    n, d = e.shape
    k = plan.chunk
    coeffs_p = LossCoefficients(*(x.astype(jnp.float32) for x in coeffs))
    if plan.overlaps(n):
        rows, e_p, t_p = n, e, targets
    else:
        rows = k * plan.num_chunks
        e_p, t_p = _pad_rows(e, rows, 0), _pad_rows(targets, rows, -1)
        coeffs_p = LossCoefficients(*(_pad_rows(x, rows, 0.0) for x in coeffs_p))
    starts = jnp.asarray(plan.starts(n), jnp.int32)
    dc_dtype = jnp.float32 if accum_c_fp32 else c.dtype
    vary = lambda x: varying_like(x, e, c, bias, targets, *coeffs)  # noqa: E731
    chunk_need = (need_de, need_dc, need_db)

    def step(carry, i, dc_mode, first=False):
        de, dc, db = carry
        start = starts[i]
        rows_k = lambda x: lax.dynamic_slice_in_dim(x, start, k)  # noqa: E731
        # Rows an earlier chunk covered (the overlapping last chunk's first ones) get zero coefficients:
        # their gradient rows are exactly zero, so they add nothing below.
        fresh = start + jnp.arange(k) >= i * k
        coeffs_k = LossCoefficients(*(jnp.where(fresh, rows_k(x), 0.0) for x in coeffs_p))
        stats, (de_k, dc, db) = _chunk_gradients(
            rows_k(e_p), rows_k(t_p), coeffs_k, c, bias, spec=spec, logits=logits, need=chunk_need,
            sparse=sparse, dc_mode=dc_mode, carry=(None if de is None else rows_k(de), dc, db),
            dc_dtype=dc_dtype if first else None,
        )
        if de is not None:
            de = lax.dynamic_update_slice_in_dim(de, de_k, start, axis=0)
        return (de, dc, db), stats

    def scan(dc_mode):
        de0 = vary(jnp.zeros((rows, d), e.dtype)) if need_de else None
        if need_dc and dc_mode in (None, "dense"):
            # Dense dC: chunk 0 writes dC (and dbias), the scan adds the others.
            carry, stats0 = step((de0, None, None), 0, dc_mode, first=True)
            if plan.num_chunks == 1:
                return carry, jax.tree.map(lambda x: x[None], stats0)
            carry, stats = lax.scan(functools.partial(step, dc_mode=dc_mode), carry,
                                    jnp.arange(1, plan.num_chunks))
            return carry, jax.tree.map(lambda x0, x: jnp.concatenate([x0[None], x]), stats0, stats)
        dc0 = vary(jnp.zeros(c.shape, dc_dtype)) if need_dc else None
        db0 = vary(jnp.zeros((spec.vocab_size(c),), jnp.float32)) if need_db else None
        return lax.scan(functools.partial(step, dc_mode=dc_mode), (de0, dc0, db0), jnp.arange(plan.num_chunks))

    if sparse is None or not (sparse.filter_c and need_dc):
        (de, dc, db), stats = scan(None)
    elif sparse.dc_mode != "sampled":
        (de, dc, db), stats = scan(sparse.dc_mode)
    else:
        # dC is created inside each branch, so neither scan copies it.
        dense = sampled_live_fraction(e, c, bias, targets, coeffs, logits=logits, sparse=sparse,
                                      block=sample) > sparse.dense_fraction
        (de, dc, db), stats = lax.cond(dense, lambda: scan("dense"), lambda: scan("sparse"))
    if plan.overlaps(n):
        # The last chunk's rows an earlier chunk covered are dropped from its stats.
        skip = k * plan.num_chunks - n
        unsplit = lambda x: jnp.concatenate([x[:-1].reshape(-1), x[-1, skip:]])  # noqa: E731
    else:
        unsplit = lambda x: x.reshape(-1)[:n]  # noqa: E731
    stats = TokenStats(*map(unsplit, stats))
    de = None if de is None else de[:n]
    if dc is not None:
        dc = dc.astype(c.dtype) if need[1] else None
    dbias = None if db is None else db.astype(bias.dtype)
    return stats, de, dc, dbias


# --------------------------------------------------------------------------------------------------------
# The custom VJP over a scalar loss.


@dataclasses.dataclass(frozen=True)
class TrainingImpl:
    """What an implementation provides to the three-pass path.

    Attributes:
      forward: ``(e, c, bias, targets) -> TokenStats``, the one-pass forward (evaluation).
      gradients: ``(e, c, bias, targets, coeffs, need) -> (stats, de, dc, dbias)``, e.g. :func:`gradients`
        with the implementation's plan and products bound.
      stats_fn: a differentiable ``(e, c, bias, targets) -> TokenStats`` (the recompute path), used only for
        per-token cotangents of the returned stats.
    """

    forward: Callable
    gradients: Callable
    stats_fn: Callable


def total_loss(stats: TokenStats, coeffs: LossCoefficients) -> jax.Array:
    a, b, s, q = coeffs
    lse = stats.lse
    return jnp.sum(a * lse + b * stats.target_logit + s * stats.sum_logits + q * jnp.square(lse))


def _perturbed(x) -> bool:
    return x is not None and x.perturbed


def _value(x):
    return None if x is None else x.value


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def scalar_loss(e, c, bias, targets, coeffs: LossCoefficients, impl: TrainingImpl):
    """``(total_loss(stats, coeffs), stats)``; under differentiation the gradient comes from the three-pass
    forward rule. ``targets`` are local ids with -1 for tokens without a target."""
    stats = impl.forward(e, c, bias, targets)
    return total_loss(stats, coeffs), stats


def _scalar_loss_fwd(e, c, bias, targets, coeffs, impl: TrainingImpl):
    need = (_perturbed(e), _perturbed(c), _perturbed(bias))
    ev, cv, bv, tv = _value(e), _value(c), _value(bias), _value(targets)
    cv_coeffs = LossCoefficients(*(x.value for x in coeffs))
    stats, de, dc, db = impl.gradients(ev, cv, bv, tv, cv_coeffs, need=need)
    residuals = (ev, cv, bv, tv, stats, de, dc, db)
    return (total_loss(stats, cv_coeffs), stats), residuals


def _scale(x, g):
    return None if x is None else (x.astype(jnp.float32) * g).astype(x.dtype)


def _add(x, y):
    if x is None or y is None:
        return y if x is None else x
    return (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)


def _scalar_loss_bwd(impl: TrainingImpl, residuals, cotangents):
    e, c, bias, targets, stats, de, dc, db = residuals
    g_total, g_stats = cotangents
    if isinstance(g_total, SymbolicZero):
        g_total = jnp.zeros((), jnp.float32)
    grads = [_scale(de, g_total), _scale(dc, g_total), _scale(db, g_total)]
    if not all(isinstance(x, SymbolicZero) for x in g_stats):
        per_token = TokenStats(*(jnp.zeros_like(x) if isinstance(x, SymbolicZero) else x for x in g_stats))
        _, vjp = jax.vjp(lambda e_, c_, b_: impl.stats_fn(e_, c_, b_, targets), e, c, bias)
        grads = [_add(x, y) for x, y in zip(grads, vjp(per_token))]
    coeff_cts = LossCoefficients(g_total * stats.lse, g_total * stats.target_logit, g_total * stats.sum_logits,
                                 g_total * jnp.square(stats.lse))
    return (*grads, None, coeff_cts)


scalar_loss.defvjp(_scalar_loss_fwd, _scalar_loss_bwd, symbolic_zeros=True)
