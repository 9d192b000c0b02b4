"""Which CTA of the Mosaic GPU forward's persistent grid computes which logits tiles.

The work is a ``row_blocks x tiles`` matrix of units: row block ``i`` (``block_n`` tokens) against CTA tile ``j``
(``compute_wgs * block_v`` vocabulary columns). A CTA holds one SM (its shared memory and registers), so a grid
of one CTA per SM runs as a single wave. The schedule gives each CTA a short list of *segments*: a row block and
a contiguous range of its tiles, folded into one partial (max, sum, target, sum-of-logits) per segment and
written to an output *slot*; XLA merges the slots of each row block (:func:`merge`).

Why not the plain grid ``(row_blocks, splits)``: at N = 8192 (64 row blocks of 128 tokens) two splits fill 128 of
the H200's 132 SMs, so 3% of the GPU idles for the whole kernel (the matmul alone ran 2% slower than cuBLAS's).
Spreading the units evenly over the CTAs in row-major order (stream-K) fixes the balance but not the traffic: a
CTA streams a 2 MB classifier tile from L2 per ~50 us tile step, which works only because the CTAs running at the
same moment read the same tile; staggered starts would make every CTA read its own tiles from DRAM. So:

1. Rounds: with more row blocks than CTAs, CTA ``p`` first takes whole row blocks ``p, p + ctas, ...``
   (``rounds = row_blocks // ctas`` each); every CTA reads the same tile at the same time.
2. The last ``rem = row_blocks % ctas`` row blocks are split ``splits = ctas // rem`` ways along the vocabulary
   (split ``s`` has tiles ``[s * T // splits, (s + 1) * T // splits)``), one *main* CTA per (row block, split),
   CTA ``p = s * rem + i``: the ``rem`` CTAs of a split read the same tiles together.
3. The ``ctas - splits * rem`` CTAs left over (fewer than ``rem``) take the last ``tail`` tiles of every main
   CTA's range, a balanced share of the (row block, split) items each, written to slots ``splits + s``.
   ``tail`` is chosen so that main and spare CTAs finish together (at N 8192 x llama3's 501 tiles: main CTAs 243
   or 244 tiles, spare CTAs 32 items of 7 tiles).

Every function here takes Python ints (tests, the merge) or int32 scalars traced inside the kernel (the CTA
index): :func:`segment` and :func:`num_segments` are the kernel's only view of the schedule.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Estimated cost of ending a segment (the epilogue's merge and store), in tile steps, when choosing ``tail``.
SEGMENT_COST = 0.1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A static assignment of the ``row_blocks x tiles`` units to ``ctas`` CTAs (module docstring)."""

    row_blocks: int
    tiles: int
    ctas: int
    rounds: int
    rem: int
    splits: int
    tail: int

    @property
    def main(self) -> int:
        """CTAs of the last round's (row block, split) items."""
        return self.rem * self.splits

    @property
    def spare(self) -> int:
        """CTAs that take the tails of the main items (0 when ``tail == 0``)."""
        return self.ctas - self.main if self.tail else 0

    @property
    def grid(self) -> int:
        """CTAs launched: all with rounds, else the main ones and the spare ones with work."""
        return self.ctas if self.rounds else self.main + self.spare

    @property
    def slots(self) -> int:
        """Partial outputs per row block."""
        if not self.rem:
            return 1
        return self.splits * (2 if self.tail else 1)

    def split_start(self, s):
        return _div(s * self.tiles, self.splits)

    def items(self, r):
        """The range [first, last) of main items whose tails spare CTA ``r`` takes."""
        return _div(r * self.main, self.spare), _div((r + 1) * self.main, self.spare)


def _div(a, b):
    return lax.div(a, b) if isinstance(a, jax.Array) else a // b


def _rem(a, b):
    return lax.rem(a, b) if isinstance(a, jax.Array) else a % b


def _spare_index(sch: Schedule, p):
    """Spare CTA ``p``'s index among the spare ones (0 for a main CTA, whose value goes unused)."""
    return jnp.maximum(p - sch.main, 0) if isinstance(p, jax.Array) else max(p - sch.main, 0)


def _select(pred, a, b):
    if isinstance(pred, jax.Array):
        return lax.select(pred, jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
    return a if pred else b


def make(row_blocks: int, tiles: int, ctas: int, max_slots: int) -> Schedule:
    """The schedule of ``row_blocks x tiles`` units on ``ctas`` CTAs, with at most ``max_slots`` partial outputs
    per row block (the XLA merge's temporary memory)."""
    if min(row_blocks, tiles, ctas, max_slots) < 1:
        raise ValueError(f"row_blocks={row_blocks}, tiles={tiles}, ctas={ctas}, max_slots={max_slots} must be >= 1")
    rounds, rem = divmod(row_blocks, ctas)
    if not rem:
        return Schedule(row_blocks, tiles, ctas, rounds, 0, 1, 0)
    splits = max(1, min(ctas // rem, tiles, max_slots))
    spare = ctas - rem * splits
    tail = 0
    shortest = tiles // splits  # tiles of the shortest split
    if 0 < spare < rem * splits and 2 * splits <= max_slots and shortest > 1:
        per_spare = math.ceil(rem * splits / spare)  # items of the busiest spare CTA
        cost = lambda t: max(math.ceil(tiles / splits) - t, per_spare * (t + SEGMENT_COST))  # noqa: E731
        tail = min(range(shortest), key=cost)
    return Schedule(row_blocks, tiles, ctas, rounds, rem, splits, tail)


def num_segments(sch: Schedule, p):
    """Segments of CTA ``p``."""
    if not sch.rem:
        return sch.rounds
    if not sch.spare:
        return sch.rounds + _select(p < sch.main, 1, 0)
    first, last = sch.items(_spare_index(sch, p))
    return sch.rounds + _select(p < sch.main, 1, last - first)


def segment(sch: Schedule, p, q):
    """Segment ``q`` of CTA ``p``: ``(row_block, first_tile, end_tile, slot)``."""
    if not sch.rem:
        return q * sch.ctas + p, 0, sch.tiles, 0
    is_main = p < sch.main
    if sch.spare:
        item = _select(is_main, p, sch.items(_spare_index(sch, p))[0] + q - sch.rounds)
    else:
        item = p
    i, s = _rem(item, sch.rem), _div(item, sch.rem)
    start, end = sch.split_start(s), sch.split_start(s + 1)
    first = _select(is_main, start, end - sch.tail)
    last = _select(is_main, end - sch.tail, end)
    slot = _select(is_main, s, sch.splits + s)
    row = sch.rounds * sch.ctas + i
    if not sch.rounds:
        return row, first, last, slot
    in_rounds = q < sch.rounds
    return (_select(in_rounds, q * sch.ctas + p, row), _select(in_rounds, 0, first),
            _select(in_rounds, sch.tiles, last), _select(in_rounds, 0, slot))


def valid_slots(sch: Schedule) -> np.ndarray:
    """(slots, row_blocks) bool: which partial outputs the kernel writes (the others hold garbage)."""
    valid = np.zeros((sch.slots, sch.row_blocks), bool)
    valid[0, :sch.rounds * sch.ctas] = True
    last = slice(sch.rounds * sch.ctas, sch.row_blocks)
    valid[:sch.splits, last] = True
    if sch.tail:
        valid[sch.splits:, last] = True
    return valid


def merge(sch: Schedule, block_n: int, n: int, lse, zt, zs=None, row_max: bool = False):
    """(n,) outputs from the (slots, row_blocks * block_n) partials: log-sum-exp (or, with ``row_max``, the max)
    of the lse partials, sums of the others, over the slots each row block has."""
    if sch.slots == 1:
        return tuple(None if x is None else x[0, :n] for x in (lse, zt, zs))
    slots, blocks = sch.slots, sch.row_blocks
    valid = jnp.broadcast_to(jnp.asarray(valid_slots(sch))[:, :, None], (slots, blocks, block_n))
    valid = valid.reshape(slots, blocks * block_n)[:, :n]
    lse = jnp.where(valid, lse[:, :n], -jnp.inf)
    m = lse.max(axis=0)
    if not row_max:
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        m = m_safe + jnp.log(jnp.exp(lse - m_safe[None]).sum(axis=0))
    sums = tuple(None if x is None else jnp.where(valid, x[:, :n], 0.0).sum(axis=0) for x in (zt, zs))
    return (m, *sums)
