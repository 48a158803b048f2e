"""faiss vs scikit-learn k-means through mmkit.core.kmeans, side by side in one run.

    python benchmarks/kmeans.py [--n 100000] [--d 384] [--k 64]

Data: --n rows around 64 seeded random centres on the unit sphere plus Gaussian noise, rows
L2-normalised (like sentence embeddings). Both backends start from the same k-means++ centroids
and run up to 20 Lloyd iterations on every row, using all available threads; each is timed end to end
(`kmeans()`: training, assignment of all rows, inertia) as the median of 3 interleaved runs
after a warm-up.
Writes the section "## k-means (core/kmeans.py)" of docs/performance.md. Exits 1 if the two
inertias differ by more than 1%.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_section  # noqa: E402

from mmkit.core.kmeans import kmeans  # noqa: E402
from mmkit.core.seeding import stable_rng  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
HEADING = "## k-means (core/kmeans.py)"
CENTRES, NOISE, ITERS, REPEATS, GOAL = 64, 0.05, 20, 3, 3.0


def make_data(n: int, d: int) -> np.ndarray:
    """Seeded float32 [n, d]: unit-sphere centres + noise, rows L2-normalised."""
    rng = stable_rng(0, "benchmarks", "kmeans")
    centres = rng.standard_normal((CENTRES, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, CENTRES, n)] + NOISE * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def machine() -> list[str]:
    """nproc, CPU model, thread pools and library versions."""
    import faiss
    import scipy
    import sklearn
    from threadpoolctl import threadpool_info

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    pools = ", ".join(
        f"{p['internal_api']} {p.get('version') or ''} ({Path(p['filepath']).parent.name}): "
        f"{p['num_threads']} threads".replace("  ", " ")
        for p in threadpool_info()
    )
    return [
        f"- nproc: {len(os.sched_getaffinity(0))}; CPU: {model}",
        f"- python {platform.python_version()}, numpy {np.__version__}, faiss-cpu "
        f"{faiss.__version__} ({faiss.get_compile_options().strip()}), scikit-learn "
        f"{sklearn.__version__}, scipy {scipy.__version__}",
        f"- threads: faiss OpenMP {faiss.omp_get_max_threads()}; thread pools: {pools}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="rows (default 100000)")
    ap.add_argument("--d", type=int, default=384, help="dimension (default 384)")
    ap.add_argument("--k", type=int, default=64, help="clusters (default 64)")
    args = ap.parse_args()
    from sklearn.cluster import kmeans_plusplus

    x = make_data(args.n, args.d)
    t0 = time.perf_counter()
    init, _ = kmeans_plusplus(x[:100_000], args.k, random_state=0)
    init_s = time.perf_counter() - t0

    backends = ("faiss", "sklearn")
    for backend in backends:
        kmeans(x[:2000], 8, iters=2, backend=backend)  # warm-up: imports, thread pools
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {b: [] for b in backends}
    results = {}
    for _ in range(REPEATS):  # interleaved, so a transient load hits both alike
        for backend in backends:
            t0 = time.perf_counter()
            results[backend] = kmeans(x, args.k, iters=ITERS, init_centroids=init, backend=backend)
            times[backend].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    med = {b: statistics.median(t) for b, t in times.items()}
    inertia = {b: r.inertia for b, r in results.items()}
    rel = abs(inertia["faiss"] - inertia["sklearn"]) / min(inertia.values())
    ratio = med["sklearn"] / med["faiss"]
    same = float(np.mean(results["faiss"].assignments == results["sklearn"].assignments))
    agree = rel <= 0.01

    command = f"python benchmarks/kmeans.py --n {args.n} --d {args.d} --k {args.k}"
    runs = {b: ", ".join(f"{t:.3f}" for t in ts) for b, ts in times.items()}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}`.",
        "",
        *machine(),
        "",
        f"Data: {args.n:,} x {args.d} float32, {CENTRES} seeded random centres on the unit "
        f"sphere + N(0, {NOISE}^2) noise, rows L2-normalised. k = {args.k}, {ITERS} iterations, "
        f"both backends start from the same scikit-learn k-means++ centroids ({init_s:.1f} s, "
        "not timed below). Each time is one end-to-end `kmeans()` call (training on all rows, "
        f"assignment of all rows, float64 inertia), median of {REPEATS} interleaved runs "
        f"after a warm-up (1-minute load average {load_before:.2f} before, {load_after:.2f} "
        "after, counting this benchmark's own threads). "
        "Both backends use all available threads (faiss through OpenMP, scikit-learn's Lloyd "
        "through OpenMP + BLAS). Both stop before 20 iterations only at convergence: "
        "scikit-learn (tol=0) when no label changes, faiss (1.15 here) when the objective stops "
        f"changing; faiss ran {len(results['faiss'].objective_per_iter)} iterations here.",
        "",
        "| backend | time (s), median | runs (s) | inertia |",
        "|---|---|---|---|",
        *(
            f"| {b} | {med[b]:.3f} | {runs[b]} | {inertia[b]:.4f} |"
            for b in ("faiss", "sklearn")
        ),
        "",
        f"- relative inertia difference: {rel:.2e} ({'within' if agree else 'NOT within'} 1%); "
        f"identical assignments: {same:.2%} of rows",
        f"- ratio sklearn_time / faiss_time: **{ratio:.2f}x** "
        f"(goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'not met'})",
        f"- work: each iteration's distance product is {2 * args.n * args.k * args.d / 1e9:.1f} GFLOP; "
        "both backends spend their time in that BLAS product on the same cores, so on a CPU "
        "neither has much to gain over the other (scikit-learn >= 1.x runs Lloyd with OpenMP and "
        "chunked BLAS). faiss stays the default for what it adds beyond this benchmark: GPU "
        "k-means, sampling without copying, and an index for assignment at build-dataset scale.",
    ]
    print("\n".join(lines))
    write_section(DOC, HEADING, lines)
    print(f"\nwrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
