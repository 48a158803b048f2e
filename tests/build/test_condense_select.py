"""mmkit/build/condense_select.py: components, representatives, bands and sample (build.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmkit.build import condense_select as sel
from mmkit.core.seeding import stable_seed
from mmkit.errors import MmkitError


def _chain() -> np.ndarray:
    """a-b 0.9, b-c 0.9, a-c 0.7 (unit vectors)."""
    a = [1.0, 0.0, 0.0]
    b = [0.9, math.sqrt(1 - 0.81), 0.0]
    y = (0.9 - 0.63) / b[1]
    c = [0.7, y, math.sqrt(1 - 0.49 - y * y)]
    return np.array([a, b, c], dtype=np.float32)


def test_chain_is_one_component_not_a_clique():
    x = _chain()
    assert np.allclose(x @ x.T, [[1, 0.9, 0.7], [0.9, 1, 0.9], [0.7, 0.9, 1]], atol=1e-6)
    assert sel.connected_components(x, 0.86).tolist() == [0, 0, 0]
    assert sel.connected_components(x, 0.86, tile=1).tolist() == [0, 0, 0]  # tiles: same components


def test_semdedup_chain_keeps_two():
    x = _chain()
    # order by dist descending: a (row 0), c (row 2), b (row 1)
    dist = np.array([0.9, 0.1, 0.5], dtype=np.float32)
    rows = np.array([0, 1, 2])
    assert sel.semdedup_keep(x, dist, rows, 0.86).tolist() == [0, 2]
    assert sel.semdedup_keep(x, dist, rows, 0.86, tile=1).tolist() == [0, 2]


def test_edge_is_strict():
    t = 0.5  # dot products below are exact binary fractions
    x = np.array([[1.0, 0.0], [0.5, 0.75], [1.0, 0.0], [0.5 + 2 ** -10, 0.0]], dtype=np.float32)
    assert float(x[0] @ x[1]) == t
    assert sel.connected_components(x[:2], t).tolist() == [0, 1]  # equal: not linked
    assert sel.connected_components(x[2:], t).tolist() == [0, 0]  # just above: linked


def test_components_tiles_match_on_random_graph():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = sel.connected_components(x, 0.95, tile=1000)
    assert np.array_equal(full, sel.connected_components(x, 0.95, tile=7))
    # reference: scipy on the dense adjacency
    from scipy.sparse.csgraph import connected_components

    _, lab = connected_components((x @ x.T > 0.95).astype(np.int8), directed=False)
    assert len(np.unique(full)) == len(np.unique(lab))
    assert all(len(np.unique(lab[full == c])) == 1 for c in np.unique(full))


def _component():
    """One component of 5 members: rows, dist and clip score chosen by hand."""
    comp = np.zeros(5, dtype=np.int64)
    rows = np.array([10, 11, 12, 13, 14])
    dist = np.array([0.3, 0.1, 0.5, 0.2, 0.4], dtype=np.float32)  # sorted: rows 11, 13, 10, 14, 12
    clip = np.array([0.2, 0.5, 0.1, 0.5, 0.3], dtype=np.float32)  # max 0.5 twice: rows 11, 13
    return comp, rows, dist, clip


@pytest.mark.parametrize("name, row", [("middle", 10), ("near", 11), ("far", 12), ("clip-max", 11)])
def test_representatives_by_hand(name, row):
    comp, rows, dist, clip = _component()
    kept = sel.REPRESENTATIVES.resolve(name)(comp, None, dist, clip, rows, 1, 0)
    assert rows[kept].tolist() == [row]


def test_middle_even_takes_upper_median_and_ties_by_row():
    comp = np.zeros(4, dtype=np.int64)
    rows = np.array([7, 3, 5, 1])
    dist = np.array([0.2, 0.2, 0.1, 0.3], dtype=np.float32)  # by (dist, row): 5, 3, 7, 1
    assert rows[sel.middle(comp, None, dist, None, rows, 0, 0)].tolist() == [7]


def test_random_representative_is_keyed_by_cluster_and_smallest_row():
    comp, rows, dist, clip = _component()
    pick = sel.random_member(comp, None, dist, clip, rows, 4, 9)
    assert rows[pick].tolist() == [10 + stable_seed(9, "representative", 4, 10) % 5]
    perm = np.array([3, 0, 4, 1, 2])  # another member order: the same choice
    again = sel.random_member(comp, None, dist[perm], clip[perm], rows[perm], 4, 9)
    assert rows[perm][again].tolist() == rows[pick].tolist()


def test_band_by_hand():
    scores = np.arange(10, 20, dtype=np.float32) / 100  # 0.10 .. 0.19
    rows = np.arange(10)
    kept = sel.band_in_memory(scores, rows, 0.4, 0.6)
    assert scores[kept].tolist() == pytest.approx([0.14, 0.15])
    tied = sel.band_in_memory(np.full(4, 0.5, dtype=np.float32), np.array([5, 3, 9, 1]), 0.25, 0.75)
    assert tied.tolist() == [3, 5]  # sorted rows 1, 3, 5, 9: positions 1 and 2
    with pytest.raises(MmkitError, match="clip_band"):
        sel.check_band(0.5, 0.5, "clip_band")


@pytest.mark.parametrize("band", [(0.4, 0.6), (0.15, 0.35), (0.0, 0.3), (0.7, 1.0), (0.0, 1.0)])
def test_histogram_path_equals_memory_path(band):
    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(-0.2, 0.6, 100_000), 2).astype(np.float32)  # many ties
    rows = rng.permutation(100_000).astype(np.int64)

    def chunks():
        for s in range(0, len(rows), 30_000):
            yield scores[s:s + 30_000], rows[s:s + 30_000]

    memory = sel.band_select(chunks, len(rows), *band, max_memory=1 << 30)
    tiny = sel.band_select(chunks, len(rows), *band, max_memory=16)  # forces the histogram path
    assert np.array_equal(memory, tiny)
    assert np.array_equal(memory, sel.band_histogram(chunks, *band))
    assert len(memory) == math.floor(band[1] * 100_000) - math.floor(band[0] * 100_000)


def test_sample_is_deterministic_order_free_and_seeded():
    rows = np.arange(0, 5000, 3)
    chunks = [rows[i:i + 400] for i in range(0, len(rows), 400)]
    kept, seen = sel.sample_rows(chunks, 100, seed=0)
    assert seen == len(rows) and len(kept) == 100
    keys = np.array([stable_seed(0, r) for r in rows.tolist()], dtype=np.uint64)
    assert kept.tolist() == sorted(rows[np.argsort(keys)[:100]].tolist())
    assert np.array_equal(kept, sel.sample_rows(chunks[::-1], 100, seed=0)[0])
    assert not np.array_equal(kept, sel.sample_rows(chunks, 100, seed=1)[0])
    everything, _ = sel.sample_rows(chunks, 10_000, seed=0)
    assert np.array_equal(everything, rows)
