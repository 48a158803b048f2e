"""k-means shared by cluster-instructions and build-dataset (design.md section 1, cluster.md 3.2).

``kmeans(x, k, ...)`` trains on all rows (or a seeded sample), then assigns every row to its
nearest centroid and recomputes the inertia itself: faiss's last objective is taken before the
final centroid update, so it is not comparable across backends. Backends live in
:data:`BACKENDS`; faiss and scikit-learn are imported lazily, and torch never is.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmkit.core.seeding import stable_rng
from mmkit.errors import MmkitError, suggest

log = logging.getLogger("mmkit")

INITS = ("kmeans++", "random", "auto")
AUTO_KMEANSPP_MAX_K = 4096  # init="auto": k-means++ up to this k, random sampling above
KMEANSPP_MAX_POINTS = 100_000  # k-means++ fallback (faiss without native k-means++) sample
_BLOCK_ELEMENTS = 1 << 22  # rows x d per block in memory-bounded passes (32 MB of float64)


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Centroids, one assignment per input row, and the inertia over all rows."""

    centroids: np.ndarray  # float32[k, d]
    assignments: np.ndarray  # int64[N]
    inertia: float  # sum_i ||x_i - c(y_i)||^2 over all N rows, accumulated in float64
    backend: str  # "faiss" | "sklearn"
    init: str  # "kmeans++" | "random" | "init_centroids"
    objective_per_iter: list[float]  # faiss's per-iteration objective; [] for sklearn


@dataclass(frozen=True)
class Backend:
    """A k-means implementation: ``train`` returns (centroids, objective per iteration)."""

    module: str  # the import that must succeed for the backend to work
    package: str  # the PyPI package providing it
    train: Callable[..., tuple[np.ndarray, list[float]]]
    assign: Callable[[np.ndarray, np.ndarray], np.ndarray]


def kmeans(
    x,
    k: int,
    iters: int = 20,
    redo: int = 1,
    init: str = "kmeans++",
    sample: int | None = None,
    spherical: bool = False,
    init_centroids=None,
    seed: int = 0,
    backend: str = "auto",
) -> KMeansResult:
    """Cluster the rows of ``x`` [N, d] into ``k`` groups with Lloyd's k-means.

    ``init`` is "kmeans++", "random" or "auto" (k-means++ if k <= 4096, else random);
    ``init_centroids`` [k, d] (a warm start) overrides it, and then ``redo`` is 1. ``sample``
    trains on a seeded uniform sample of that many rows; assignments and inertia always cover
    all N rows. ``spherical`` renormalises the centroids to unit length. ``backend`` is a
    :data:`BACKENDS` name or "auto" (faiss when importable, else scikit-learn).
    """
    x = _as_matrix(x)
    n, d = x.shape
    _check_params(n, k, iters, redo, init, sample, backend)
    name = _resolve_backend(backend)
    impl = BACKENDS[name]
    if init_centroids is not None:
        init_centroids = _as_matrix(init_centroids, what="init_centroids")
        if init_centroids.shape != (k, d):
            raise MmkitError(
                f"init_centroids has shape {init_centroids.shape}, expected ({k}, {d})",
                field="init_centroids",
            )
        init_name = "init_centroids"
    elif init == "auto":
        init_name = "kmeans++" if k <= AUTO_KMEANSPP_MAX_K else "random"
    else:
        init_name = init

    train_x = x
    if sample is not None and sample < n:
        rows = stable_rng(seed, "kmeans", "sample").choice(n, size=sample, replace=False)
        train_x = x[np.sort(rows)]
    _check_distinct(train_x, k, sampled=train_x is not x)

    centroids, objective = impl.train(
        train_x,
        k,
        iters=iters,
        redo=1 if init_centroids is not None else redo,
        init=init_name,
        init_centroids=init_centroids,
        spherical=spherical,
        seed=seed,
    )
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    assignments = impl.assign(x, centroids)
    return KMeansResult(
        centroids=centroids,
        assignments=assignments,
        inertia=inertia(x, centroids, assignments),
        backend=name,
        init=init_name,
        objective_per_iter=[float(v) for v in objective],
    )


def inertia(x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> float:
    """sum_i ||x_i - centroids[assignments_i]||^2, in float64, over memory-bounded blocks."""
    c64 = centroids.astype(np.float64)
    total = 0.0
    for s in _blocks(*x.shape):
        diff = x[s].astype(np.float64) - c64[assignments[s]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


# ---------------------------------------------------------------------------- validation


def _as_matrix(x, what: str = "x") -> np.ndarray:
    """A contiguous finite float32 [N, d] array with N, d >= 1, or an MmkitError."""
    try:
        arr = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise MmkitError(f"{what} must be a numeric 2-D array ({exc})", field=what) from None
    if arr.ndim != 2 or 0 in arr.shape:
        raise MmkitError(
            f"{what} must be a non-empty 2-D array [N, d], got shape {arr.shape}", field=what
        )
    for s in _blocks(*arr.shape):
        bad = ~np.isfinite(arr[s]).all(axis=1)
        if bad.any():
            row = s.start + int(np.argmax(bad))
            raise MmkitError(f"{what} has a non-finite value (NaN or inf) in row {row}", field=what)
    return arr


def _check_params(
    n: int, k: int, iters: int, redo: int, init: str, sample: int | None, backend: str
) -> None:
    """Raise MmkitError for an out-of-range or unknown argument."""
    if not 1 <= k <= n:
        raise MmkitError(f"k must be between 1 and the number of rows ({n}), got {k}", field="k")
    if iters < 1:
        raise MmkitError(f"iters must be at least 1, got {iters}", field="iters")
    if redo < 1:
        raise MmkitError(f"redo must be at least 1, got {redo}", field="redo")
    if init not in INITS:
        raise MmkitError(
            f"unknown k-means init {init!r}; expected one of {', '.join(INITS)}"
            + suggest(init, INITS),
            field="init",
        )
    if backend != "auto" and backend not in BACKENDS:
        names = ("auto", *BACKENDS)
        raise MmkitError(
            f"unknown k-means backend {backend!r}; expected one of {', '.join(names)}"
            + suggest(backend, names),
            field="backend",
        )
    if sample is not None and sample < k:
        raise MmkitError(f"sample ({sample}) must be at least k ({k})", field="sample")


def _check_distinct(x: np.ndarray, k: int, sampled: bool) -> None:
    """Raise MmkitError if ``x`` has fewer than ``k`` distinct rows.

    Rows are counted by a 64-bit hash of their bits, which can merge distinct rows but never
    split equal ones, so a count >= k proves the point; below k the rows are compared exactly.
    """
    coef = stable_rng(0, "kmeans", "row-hash").integers(1, 2**63, size=x.shape[1], dtype=np.uint64)
    hashes = np.empty(len(x), dtype=np.uint64)
    for s in _blocks(*x.shape):
        bits = (x[s] + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0
        hashes[s] = (bits.astype(np.uint64) * coef).sum(axis=1)  # wraps around mod 2**64
    if len(np.unique(hashes)) >= k:
        return
    rows = (x + np.float32(0.0)).view(np.dtype((np.void, x.itemsize * x.shape[1]))).ravel()
    distinct = len(np.unique(rows))
    if distinct < k:
        where = "the training sample" if sampled else "x"
        raise MmkitError(
            f"k={k} is more than the {distinct} distinct rows of {where}", field="k"
        )


def _resolve_backend(backend: str) -> str:
    """The backend to use: ``backend`` itself, or for "auto" faiss if importable else sklearn."""
    if backend != "auto":
        impl = BACKENDS[backend]
        if not _importable(impl.module):
            raise MmkitError(
                f"k-means backend {backend!r} needs the package {impl.package!r}: "
                f"pip install {impl.package}",
                field="backend",
            )
        return backend
    if _importable(BACKENDS["faiss"].module):
        return "faiss"
    log.warning("faiss is not importable; k-means falls back to scikit-learn (slower)")
    return "sklearn"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _blocks(n: int, d: int):
    """Row slices covering [0, n) with about ``_BLOCK_ELEMENTS`` values each."""
    step = max(1, _BLOCK_ELEMENTS // d)
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


def _normalise(c: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return c / np.where(norms > 0, norms, 1)


# ------------------------------------------------------------------------------ backends


def _kmeanspp_sample(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn's k-means++ on at most ``KMEANSPP_MAX_POINTS`` seeded sampled rows."""
    from sklearn.cluster import kmeans_plusplus

    if len(x) > KMEANSPP_MAX_POINTS:
        rows = stable_rng(seed, "kmeans", "kmeans++").choice(
            len(x), size=KMEANSPP_MAX_POINTS, replace=False
        )
        x = x[np.sort(rows)]
    centers, _ = kmeans_plusplus(x, k, random_state=seed % 2**32)
    return np.ascontiguousarray(centers, dtype=np.float32)


def _faiss_train(
    x: np.ndarray,
    k: int,
    *,
    iters: int,
    redo: int,
    init: str,
    init_centroids: np.ndarray | None,
    spherical: bool,
    seed: int,
) -> tuple[np.ndarray, list[float]]:
    """faiss.Kmeans on every row of ``x`` (max_points_per_centroid=N: faiss never subsamples)."""
    import faiss

    params = dict(
        niter=iters,
        nredo=redo,
        seed=seed % 2**31,  # a C int
        spherical=spherical,
        max_points_per_centroid=len(x),
        min_points_per_centroid=1,  # k <= N is checked; silences faiss's "too few points"
    )
    if init == "kmeans++":
        native = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
        if native is not None:
            params["init_method"] = native
            log.info("k-means++ init: faiss native")
        else:
            init_centroids = _kmeanspp_sample(x, k, seed)
            params["nredo"] = 1
            log.info("k-means++ init: scikit-learn kmeans_plusplus (faiss has no native one)")
    km = faiss.Kmeans(x.shape[1], k, **params)
    km.train(x, init_centroids=init_centroids)
    return km.centroids, list(km.obj)


def _faiss_assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row by exact L2 search (faiss IndexFlatL2), block by block."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    out = np.empty(len(x), dtype=np.int64)
    for s in _blocks(*x.shape):
        out[s] = index.search(x[s], 1)[1][:, 0]
    return out


def _sklearn_train(
    x: np.ndarray,
    k: int,
    *,
    iters: int,
    redo: int,
    init: str,
    init_centroids: np.ndarray | None,
    spherical: bool,
    seed: int,
) -> tuple[np.ndarray, list[float]]:
    """scikit-learn's Lloyd KMeans for exactly ``iters`` iterations (tol=0), like faiss."""
    from sklearn.cluster import KMeans

    if init_centroids is not None:
        start = init_centroids
    else:
        start = {"kmeans++": "k-means++", "random": "random"}[init]
    km = KMeans(
        n_clusters=k,
        init=start,
        n_init=redo,
        max_iter=iters,
        tol=0.0,
        algorithm="lloyd",
        random_state=seed % 2**32,
    ).fit(x)
    centroids = km.cluster_centers_.astype(np.float32)
    return (_normalise(centroids) if spherical else centroids), []


def _sklearn_assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row (scikit-learn's chunked exact argmin)."""
    from sklearn.metrics import pairwise_distances_argmin

    return pairwise_distances_argmin(x, centroids).astype(np.int64)


BACKENDS: dict[str, Backend] = {
    "faiss": Backend("faiss", "faiss-cpu", _faiss_train, _faiss_assign),
    "sklearn": Backend("sklearn", "scikit-learn", _sklearn_train, _sklearn_assign),
}
