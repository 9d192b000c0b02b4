"""The Mosaic GPU forward's persistent-grid schedule (pallas_kernels.mosaic_schedule), in plain Python: every
(row block, tile) unit computed exactly once, partial outputs only in the slots the merge reads, the work spread
evenly at the benchmark shapes, and the merge against a float64 log-sum-exp."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_schedule as ms


def _walk(sch: ms.Schedule):
    """Per CTA: its tiles, and the (row block, first, end, slot) of each segment."""
    return [[ms.segment(sch, p, q) for q in range(ms.num_segments(sch, p))] for p in range(sch.grid)]


@pytest.mark.parametrize("ctas", [1, 2, 3, 7, 132])
def test_every_unit_once_and_slots_match_the_merge(ctas):
    for row_blocks, tiles, max_slots in itertools.product([1, 2, 5, 13, 64, 131, 133, 300], [1, 2, 3, 31, 501],
                                                          [1, 2, 16]):
        sch = ms.make(row_blocks, tiles, ctas, max_slots)
        assert sch.grid <= ctas and sch.slots <= max(max_slots, 1)
        cover = np.zeros((row_blocks, tiles), int)
        written = np.zeros((sch.slots, row_blocks), int)
        for segs in _walk(sch):
            for row, first, end, slot in segs:
                assert 0 <= first < end <= tiles, (sch, row, first, end)
                cover[row, first:end] += 1
                written[slot, row] += 1
        np.testing.assert_array_equal(cover, 1, err_msg=str(sch))
        # Each valid slot is written exactly once: a second write would overwrite a partial.
        np.testing.assert_array_equal(written, ms.valid_slots(sch).astype(int), err_msg=str(sch))


@pytest.mark.parametrize("row_blocks,tiles,expect", [
    (64, 501, dict(splits=2, tail=7)),    # llama3, N 8192: 128 main CTAs of 243-244 tiles, 4 spare
    (64, 1000, dict(splits=2, tail=15)),  # gemma2, N 8192
    (512, 501, dict(rounds=3, rem=116)),  # llama3, N 65536
])
def test_balance_at_the_benchmark_shapes(row_blocks, tiles, expect):
    sch = ms.make(row_blocks, tiles, 132, 16)
    for k, v in expect.items():
        assert getattr(sch, k) == v, sch
    busiest = max(sum(end - first for _, first, end, _ in segs) for segs in _walk(sch))
    # The grid of 2 splits ran 251 (llama3) / 500 (gemma2) tiles on its busiest CTA; ideal is row_blocks * tiles
    # / 132 (242.9 / 484.8).
    assert busiest <= row_blocks * tiles / 132 * 1.005 + 1, (sch, busiest)


def test_traced_schedule_matches_python():
    sch = ms.make(64, 501, 132, 16)
    for p in (0, 63, 64, 127, 128, 131):
        assert int(ms.num_segments(sch, jnp.int32(p))) == ms.num_segments(sch, p)
        for q in range(ms.num_segments(sch, p)):
            assert tuple(int(x) for x in ms.segment(sch, jnp.int32(p), jnp.int32(q))) == ms.segment(sch, p, q)


def test_merge_against_float64():
    rng = np.random.default_rng(0)
    sch = ms.make(3, 8, 4, 16)  # three row blocks, one spare CTA with the tails: two slots each
    assert sch.slots == 2
    block_n, n = 4, 10
    lse = rng.standard_normal((2, 12)) * 5
    zt, zs = rng.standard_normal((2, 12)), rng.standard_normal((2, 12))
    garbage = ~np.repeat(ms.valid_slots(sch), block_n, axis=1)
    for x in (lse, zt, zs):
        x[garbage] = np.nan  # slots the kernel never writes must not reach the result
    out = ms.merge(sch, block_n, n, *(jnp.asarray(x, jnp.float32) for x in (lse, zt, zs)))
    np.testing.assert_allclose(np.asarray(out[0]), np.logaddexp(lse[0], lse[1])[:n], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[1]), (zt[0] + zt[1])[:n], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[2]), (zs[0] + zs[1])[:n], rtol=1e-6)
    lse_all_masked = np.full((2, 12), -np.inf)
    m = ms.merge(sch, block_n, n, jnp.asarray(lse_all_masked, jnp.float32), jnp.zeros((2, 12)), None)
    assert np.all(np.asarray(m[0]) == -np.inf) and m[2] is None


def test_make_validates():
    with pytest.raises(ValueError, match="ctas=0"):
        ms.make(4, 4, 0, 4)


@pytest.mark.parametrize("n,cluster,expect", [
    (8192, 1, (64, 132)),  # 64 row blocks of 128 tokens on 132 CTAs
    (8192, 2, (32, 66)),  # clusters of two CTAs: 32 units of two row blocks on 66 clusters
    (1030, 2, (5, 66)),  # 9 row blocks: the fifth unit's second row block is a phantom
])
def test_clusters_schedule_units_of_row_blocks(n, cluster, expect):
    """With clusters the schedule's rows are units of ``cluster`` row blocks and its CTAs are the clusters; the
    partial outputs cover every unit's rows, so the merge (by ``unit_rows``) reads each token's own slots."""
    from pallas_kernels import mosaic_forward as mf  # noqa: PLC0415
    from pallas_kernels.tiles import Problem  # noqa: PLC0415

    cfg = mf.MosaicForwardConfig(block_n=128, block_v=128, block_d=128, stages=2, cluster=cluster, ctas=132)
    sch = mf.make_schedule(Problem(n=n, d=4096, v=128256), cfg)
    assert (sch.row_blocks, sch.ctas) == expect
    assert sch.row_blocks * mf.unit_rows(cfg) >= n > (sch.row_blocks - 1) * mf.unit_rows(cfg)
