"""Tests for mmkit/core/kmeans.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mmkit.core.kmeans import BACKENDS, KMeansResult, kmeans
from mmkit.errors import MmkitError

HAS_FAISS = importlib.util.find_spec("faiss") is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")
BACKEND_PARAMS = [
    pytest.param(name, marks=needs_faiss) if name == "faiss" else name for name in BACKENDS
]


def blobs(n_per: int = 200, k: int = 5, d: int = 16, spread: float = 0.3, seed: int = 0):
    """k Gaussian blobs around random centres 10 apart on average; returns (x, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 10
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + spread * rng.standard_normal((k * n_per, d))
    return x.astype(np.float32), labels


def hand_inertia(x: np.ndarray, result: KMeansResult) -> float:
    diff = x.astype(np.float64) - result.centroids.astype(np.float64)[result.assignments]
    return float((diff**2).sum())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("init", ["kmeans++", "auto"])
def test_recovers_planted_clusters(backend, init):
    x, labels = blobs()
    r = kmeans(x, 5, init=init, backend=backend)
    assert adjusted_rand_score(labels, r.assignments) == 1.0
    assert r.backend == backend
    assert r.init == "kmeans++"
    assert r.centroids.shape == (5, 16) and r.centroids.dtype == np.float32
    assert r.assignments.shape == (1000,) and r.assignments.dtype == np.int64


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_random_init_and_auto_above_4096(backend):
    x, _ = blobs(spread=3.0)
    r = kmeans(x, 5, init="random", backend=backend)
    assert r.init == "random"
    assert not np.array_equal(r.centroids, kmeans(x, 5, backend=backend).centroids)
    y = np.random.default_rng(0).standard_normal((4200, 2))
    assert kmeans(y, 4097, iters=1, init="auto", backend=backend).init == "random"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_result_fields_and_inertia_recomputed(backend):
    x, _ = blobs(spread=3.0)  # overlapping blobs: a non-trivial inertia
    r = kmeans(x, 7, iters=10, backend=backend)
    assert r.inertia == pytest.approx(hand_inertia(x, r), rel=1e-9)
    d2 = ((x[:, None, :].astype(np.float64) - r.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(r.assignments, d2.argmin(1))
    if backend == "faiss":  # recent faiss (1.15 here) stops once the objective stops changing
        assert 1 <= len(r.objective_per_iter) <= 10
    else:
        assert r.objective_per_iter == []


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_same_seed_same_result(backend):
    x, _ = blobs(spread=3.0)
    a = kmeans(x, 6, seed=3, sample=600, backend=backend)
    b = kmeans(x, 6, seed=3, sample=600, backend=backend)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia
    c = kmeans(x, 6, seed=4, sample=600, backend=backend)
    assert not np.array_equal(a.centroids, c.centroids)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_sample_trains_on_subset_but_assigns_all_rows(backend):
    x, labels = blobs()
    r = kmeans(x, 5, sample=100, redo=3, backend=backend)
    assert r.assignments.shape == (len(x),)
    assert adjusted_rand_score(labels, r.assignments) == 1.0
    assert r.inertia == pytest.approx(hand_inertia(x, r), rel=1e-9)
    full = kmeans(x, 5, redo=3, backend=backend)
    assert not np.array_equal(r.centroids, full.centroids)  # trained on other rows


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_spherical_gives_unit_centroids(backend):
    x, _ = blobs(spread=3.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r = kmeans(x, 5, spherical=True, backend=backend)
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    assert r.inertia == pytest.approx(hand_inertia(x, r), rel=1e-9)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_init_centroids_warm_start(backend):
    x, labels = blobs()
    start = np.stack([x[labels == g].mean(0) for g in range(5)])
    r = kmeans(x, 5, iters=1, init="random", init_centroids=start, backend=backend)
    assert r.init == "init_centroids"
    np.testing.assert_allclose(r.centroids, start, atol=1e-4)  # already a fixed point
    np.testing.assert_array_equal(r.assignments, labels)


@needs_faiss
def test_faiss_and_sklearn_agree_from_same_init():
    x, _ = blobs(n_per=300, k=8, d=12, spread=4.0, seed=1)  # overlapping: Lloyd must move
    start = x[np.random.default_rng(0).choice(len(x), 8, replace=False)]
    f = kmeans(x, 8, iters=15, init_centroids=start, backend="faiss")
    s = kmeans(x, 8, iters=15, init_centroids=start, backend="sklearn")
    np.testing.assert_array_equal(f.assignments, s.assignments)
    np.testing.assert_allclose(f.centroids, s.centroids, atol=1e-4)
    assert f.inertia == pytest.approx(s.inertia, rel=1e-6)


@needs_faiss
def test_faiss_without_native_kmeanspp_uses_sklearn_init(monkeypatch):
    import faiss

    x, labels = blobs()
    native = kmeans(x, 5, backend="faiss")
    monkeypatch.delattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", raising=False)
    r = kmeans(x, 5, backend="faiss")
    assert r.init == "kmeans++"
    assert adjusted_rand_score(labels, r.assignments) == 1.0
    assert adjusted_rand_score(native.assignments, r.assignments) == 1.0


def test_auto_backend(monkeypatch, caplog):
    x, _ = blobs(n_per=20)
    assert kmeans(x, 3, iters=2).backend == ("faiss" if HAS_FAISS else "sklearn")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with caplog.at_level("WARNING", logger="mmkit"):
        assert kmeans(x, 3, iters=2).backend == "sklearn"
    assert "falls back to scikit-learn" in caplog.text
    with pytest.raises(MmkitError, match="pip install faiss-cpu"):
        kmeans(x, 3, backend="faiss")


def test_k_equal_to_n_and_duplicates():
    x = np.array([[0, 0], [0, 0], [1, 0], [0, 1], [-0.0, 0]], dtype=np.float32)
    r = kmeans(x, 3, iters=5)
    assert r.inertia == pytest.approx(0.0, abs=1e-9)
    assert len(np.unique(r.assignments)) == 3
    with pytest.raises(MmkitError, match="k=4 is more than the 3 distinct rows of x"):
        kmeans(x, 4)
    y = np.eye(4, dtype=np.float32)
    assert kmeans(y, 4).inertia == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 11}, r"k must be between 1 and the number of rows \(10\), got 11"),
        ({"k": 0}, "k must be between 1"),
        ({"x": np.zeros(10)}, r"x must be a non-empty 2-D array \[N, d\], got shape \(10,\)"),
        ({"x": np.zeros((0, 3))}, "non-empty 2-D array"),
        ({"x": "abc"}, "x must be a numeric 2-D array"),
        ({"backend": "fiass"}, "unknown k-means backend 'fiass'.*did you mean 'faiss'"),
        ({"backend": "sklean"}, "did you mean 'sklearn'"),
        ({"init": "kmeans+"}, "unknown k-means init 'kmeans\\+'.*did you mean 'kmeans\\+\\+'"),
        ({"sample": 1}, r"sample \(1\) must be at least k \(2\)"),
        ({"iters": 0}, "iters must be at least 1"),
        ({"redo": 0}, "redo must be at least 1"),
        ({"init_centroids": np.zeros((3, 3))}, r"init_centroids has shape \(3, 3\), expected"),
        ({"init_centroids": np.full((2, 3), np.inf)}, "init_centroids has a non-finite value"),
    ],
)
def test_validation_errors(kwargs, message):
    args = {"x": np.random.default_rng(0).standard_normal((10, 3)), "k": 2, **kwargs}
    with pytest.raises(MmkitError, match=message):
        kmeans(**args)


def test_nan_input_names_the_row():
    x = np.random.default_rng(0).standard_normal((10, 3))
    x[7, 1] = np.nan
    with pytest.raises(MmkitError, match="x has a non-finite value .* in row 7"):
        kmeans(x, 2)


def test_import_is_cheap_and_never_imports_torch():
    code = (
        "import sys, numpy as np\n"
        "import mmkit.core.kmeans as m\n"
        "assert not {'faiss', 'sklearn', 'torch'} & set(sys.modules)\n"
        "m.kmeans(np.random.default_rng(0).standard_normal((50, 4)), 3, iters=2)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
