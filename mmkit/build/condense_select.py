"""The selection maths of ``condense`` (build.md §2), as small pure numpy functions.

- :func:`connected_components`: exact components of the graph "cosine > threshold", over
  square tiles of the upper triangle (memory O(tile² + m·d));
- :data:`REPRESENTATIVES`: the rule picking one member per component (``middle`` = Bunny);
- :func:`semdedup_keep`: SemDeDup's order-based rule (no graph);
- :func:`band_positions` / :func:`band_select`: the half-open rank band [floor(lo·M), floor(hi·M))
  counted from the highest score, in memory or by a two-pass histogram (identical results);
- :func:`sample_rows`: the T rows with the smallest ``stable_seed(seed, row)``, streamed.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import numpy as np

from mmkit.core.seeding import stable_seed
from mmkit.errors import MmkitError
from mmkit.registry import Registry

HIST_BINS = 65_536  # the histogram path's equal bins over [-1, 1] (build.md §2, Bands)
BAND_BYTES_PER_ROW = 12  # float32 score + int64 row: the in-memory band path's cost per survivor


# --------------------------------------------------------------------------- dedup graph


def connected_components(x: np.ndarray, threshold: float, tile: int = 8192) -> np.ndarray:
    """Component label of each row of ``x`` [m, d] (float32) in the graph with an edge iff
    ``x_i · x_j > threshold`` (strict); the label is the smallest member index.

    The upper triangle is visited in ``tile`` x ``tile`` blocks; each block's edges are merged
    into a union-find forest whose roots are always the smallest index of their tree.
    """
    m = len(x)
    parent = np.arange(m, dtype=np.int64)
    for i0 in range(0, m, tile):
        block = x[i0:i0 + tile]
        for j0 in range(i0, m, tile):
            ii, jj = np.nonzero(block @ x[j0:j0 + tile].T > threshold)
            if i0 == j0:
                upper = ii < jj
                ii, jj = ii[upper], jj[upper]
            if ii.size:
                _union(parent, ii + i0, jj + j0)
    return _roots(parent, np.arange(m))


def _roots(parent: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The root of each index (pointer jumping)."""
    r = parent[idx]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the trees of each edge (a_k, b_k): every root involved points at the smallest root
    of its merged group (groups found with scipy's connected components on the roots)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    ra, rb = _roots(parent, a), _roots(parent, b)
    cross = ra != rb
    if not cross.any():
        return
    nodes, inv = np.unique(np.concatenate([ra[cross], rb[cross]]), return_inverse=True)
    half = int(cross.sum())
    graph = coo_matrix((np.ones(half, dtype=np.int8), (inv[:half], inv[half:])), shape=(len(nodes),) * 2)
    _, group = cc(graph, directed=False)
    smallest = np.full(group.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, group, nodes)
    parent[nodes] = smallest[group]


# --------------------------------------------------------------------------- representatives


#: name -> fn(comp, x, dist, clip, rows, cluster, seed) -> member indices kept (one per component)
REPRESENTATIVES: Registry = Registry("representative")


def _groups(comp: np.ndarray, *keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Members ordered by (component, *keys) (``np.lexsort`` order: last key first); the start
    and size of each component's run in that order."""
    order = np.lexsort((*reversed(keys), comp))
    _, start, size = np.unique(comp[order], return_index=True, return_counts=True)
    return order, start, size


def _median_by(comp: np.ndarray, key: np.ndarray, rows: np.ndarray) -> np.ndarray:
    order, start, size = _groups(comp, key, rows)
    return order[start + size // 2]


@REPRESENTATIVES.register("middle")
def middle(comp, x, dist, clip, rows, cluster, seed):
    """Bunny's rule (§8.1): members by ``dist`` to the cluster centroid ascending, ties by row;
    keep 0-based position floor(m/2) (the upper median for even m)."""
    return _median_by(comp, dist, rows)


@REPRESENTATIVES.register("near")
def near(comp, x, dist, clip, rows, cluster, seed):
    """The member nearest the cluster centroid (ties: smallest row)."""
    order, start, _ = _groups(comp, dist, rows)
    return order[start]


@REPRESENTATIVES.register("far")
def far(comp, x, dist, clip, rows, cluster, seed):
    """The member farthest from the cluster centroid (ties: smallest row)."""
    order, start, _ = _groups(comp, -dist, rows)
    return order[start]


@REPRESENTATIVES.register("inner-middle")
def inner_middle(comp, x, dist, clip, rows, cluster, seed):
    """Like ``middle``, with distances to the mean of the component's own members."""
    labels, inv = np.unique(comp, return_inverse=True)
    sums = np.zeros((len(labels), x.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, x)
    means = (sums / np.bincount(inv)[:, None]).astype(np.float32)
    return _median_by(comp, np.linalg.norm(x - means[inv], axis=1), rows)


@REPRESENTATIVES.register("clip-max")
def clip_max(comp, x, dist, clip, rows, cluster, seed):
    """The member with the highest clip score (ties: smallest row)."""
    order, start, _ = _groups(comp, -clip, rows)
    return order[start]


@REPRESENTATIVES.register("random")
def random_member(comp, x, dist, clip, rows, cluster, seed):
    """A member chosen by ``stable_seed(seed, cluster, smallest row) mod m`` (order-free)."""
    order, start, size = _groups(comp, rows)
    pick = [s + (stable_seed(seed, "representative", cluster, int(rows[order[s]])) % n if n > 1 else 0)
            for s, n in zip(start.tolist(), size.tolist())]
    return order[np.asarray(pick, dtype=np.int64)]


def semdedup_keep(x: np.ndarray, dist: np.ndarray, rows: np.ndarray, threshold: float,
                  tile: int = 8192) -> np.ndarray:
    """SemDeDup's rule: order by ``dist`` descending (ties by row); keep an item iff its
    similarity to every earlier item, kept or not, is <= ``threshold``. Returns kept indices."""
    order = np.lexsort((rows, -dist))
    xs = x[order]
    m = len(xs)
    best = np.full(m, -np.inf, dtype=np.float32)  # max similarity to an earlier item
    for i0 in range(0, m, tile):
        block = xs[i0:i0 + tile]
        for j0 in range(i0, m, tile):
            sim = block @ xs[j0:j0 + tile].T  # rows earlier (i), columns later (j)
            if i0 == j0:
                sim[np.tril_indices(len(block), 0, sim.shape[1])] = -np.inf
            best[j0:j0 + tile] = np.maximum(best[j0:j0 + tile], sim.max(axis=0))
    return np.sort(order[best <= threshold])


def dedup_cluster(x: np.ndarray, dist: np.ndarray, clip: np.ndarray, rows: np.ndarray, cluster: int, *,
                  threshold: float, representative: str, seed: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicate one (sub-)cluster whose members are ordered by row: ``(kept member indices
    ascending, component size of each kept member)``."""
    comp = connected_components(x, threshold, tile)
    sizes = np.bincount(comp, minlength=len(x))
    if representative == "semdedup":
        kept = semdedup_keep(x, dist, rows, threshold, tile)
    else:
        kept = np.sort(REPRESENTATIVES.resolve(representative, field="representative")(
            comp, x, dist, clip, rows, cluster, seed))
    return kept, sizes[comp[kept]]


# --------------------------------------------------------------------------- bands


def check_band(lo: float, hi: float, name: str) -> None:
    """0 <= lo < hi <= 1, else a one-line error naming the flag."""
    if not 0.0 <= lo < hi <= 1.0:
        raise MmkitError(f"expected 0 <= LO < HI <= 1, got {lo} {hi}", field=name)


def band_positions(m: int, lo: float, hi: float) -> tuple[int, int]:
    """The kept rank positions [floor(lo·M), floor(hi·M)) (§8.2), ranks counted from the top."""
    return math.floor(lo * m), math.floor(hi * m)


def band_in_memory(scores: np.ndarray, rows: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Rows ranked [floor(lo·M), floor(hi·M)) by score descending, ties by row ascending; sorted."""
    a, b = band_positions(len(rows), lo, hi)
    order = np.lexsort((rows, -scores.astype(np.float32)))
    return np.sort(rows[order[a:b]])


def _bins(scores: np.ndarray) -> np.ndarray:
    """Histogram bin of each score: HIST_BINS equal bins over [-1, 1], monotone in the score."""
    b = np.floor((scores.astype(np.float64) + 1.0) * (HIST_BINS / 2.0))
    return np.clip(b, 0, HIST_BINS - 1).astype(np.int64)


def band_histogram(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], lo: float,
                   hi: float) -> np.ndarray:
    """The same rows as :func:`band_in_memory`, in two passes over ``chunks()`` (score, row) pairs:
    a histogram finds the bins holding the cut positions; only those bins' values are sorted."""
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    for scores, _ in chunks():
        counts += np.bincount(_bins(scores), minlength=HIST_BINS)
    m = int(counts.sum())
    a, b = band_positions(m, lo, hi)
    above = np.concatenate([[0], np.cumsum(counts[::-1])[:-1]])[::-1]  # items in higher bins
    whole = (above >= a) & (above + counts <= b) & (counts > 0)
    partial = ~whole & (above < b) & (above + counts > a)
    kept, edge_scores, edge_rows = [], [], []
    for scores, rows in chunks():
        bins = _bins(scores)
        kept.append(rows[whole[bins]])
        edge = partial[bins]
        edge_scores.append(scores[edge].astype(np.float32))
        edge_rows.append(rows[edge])
    if edge_rows:
        es, er = np.concatenate(edge_scores), np.concatenate(edge_rows)
        eb = _bins(es)
        order = np.lexsort((er, -es))  # bins are monotone, so this is also bin-descending order
        es, er, eb = es[order], er[order], eb[order]
        first = np.searchsorted(-eb, -eb, side="left")  # first position of each bin's run
        rank = above[eb] + np.arange(len(er)) - first
        kept.append(er[(rank >= a) & (rank < b)])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def band_select(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], m: int, lo: float, hi: float,
                max_memory: int) -> np.ndarray:
    """The band's kept rows: sorted in memory when M x 12 bytes fit ``max_memory``, else by the
    histogram path. ``chunks()`` yields (score, row) arrays and may be called twice."""
    if (lo, hi) == (0.0, 1.0):
        parts = [rows for _, rows in chunks()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    if m * BAND_BYTES_PER_ROW <= max_memory:
        parts = list(chunks())
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return band_in_memory(np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts]), lo, hi)
    return band_histogram(chunks, lo, hi)


# --------------------------------------------------------------------------- sample


def row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """``stable_seed(seed, row)`` of each row, as uint64."""
    return np.fromiter((stable_seed(seed, r) for r in rows.tolist()), dtype=np.uint64, count=len(rows))


def sample_rows(chunks: Iterable[np.ndarray], target: int, seed: int) -> tuple[np.ndarray, int]:
    """The ``target`` rows with the smallest ``stable_seed(seed, row)`` (ties by row), kept in a
    bounded buffer while streaming; ``(rows sorted ascending, rows seen)``. Order-free."""
    keys = np.zeros(0, dtype=np.uint64)
    best = np.zeros(0, dtype=np.int64)
    seen = 0
    for rows in chunks:
        rows = np.asarray(rows, dtype=np.int64)
        seen += len(rows)
        keys = np.concatenate([keys, row_keys(rows, seed)])
        best = np.concatenate([best, rows])
        if len(best) > target:
            order = np.lexsort((best, keys))[:target]
            keys, best = keys[order], best[order]
    return np.sort(best), seen


def iter_chunks(rows: np.ndarray, size: int = 1 << 20) -> Iterator[np.ndarray]:
    """``rows`` in consecutive slices of ``size``."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size]
