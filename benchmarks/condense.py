"""`mmkit build-dataset condense` on precomputed embeddings: pairs/s and peak memory as N grows.

    python benchmarks/condense.py [--sizes 100000,300000,1000000] [--d 512] [--tmp DIR]

Data (generated in a temporary directory, deleted afterwards): N pairs in `pairs.jsonl` and N x d
float16 image embeddings in mmkit shards of 100,000 rows (`row`, `image`, `clip_score`): rows
around N/1,000 seeded random centres (noise 1/sqrt(d) per coordinate: cosine ~0.5 within a
cluster) plus 5% planted near-copies of earlier rows (noise 0.01/sqrt(d)). Each size runs the real CLI in a fresh child process
(`--embeddings`, `--shard-rows 100000`, `--clusters N/1000`, `--buckets N/100000`, target N/50,
parquet export) so that the child's peak RSS (`wait4`) is the pipeline's alone. Per-stage times
are the gaps between the stages' `_STAGE.json` files. Writes the section
"## build-dataset condense (build/condense.py)" of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_section  # noqa: E402

from mmkit.core.seeding import stable_rng  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
HEADING = "## build-dataset condense (build/condense.py)"
SHARD_ROWS, PER_CLUSTER, PER_BUCKET, COPIES = 100_000, 1_000, 100_000, 0.05
STAGE_DIRS = ("emb", "kmeans", "assign", "part", "dedup", "clip_band", "centroid_band", "sample")


def make_data(root: Path, n: int, d: int) -> tuple[Path, Path]:
    """pairs.jsonl + mmkit embedding shards with planted clusters and near-copies, shard by shard."""
    from safetensors.numpy import save_file

    rng = stable_rng(0, "benchmarks", "condense", n)
    centres = rng.standard_normal((max(1, n // PER_CLUSTER), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = root / "emb"
    emb.mkdir(parents=True)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(f'{{"key": "k{i}", "image": "img/{i}.jpg", "caption": "a photo {i}"}}\n' for i in range(n))
    for s, start in enumerate(range(0, n, SHARD_ROWS)):
        m = min(SHARD_ROWS, n - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, d), dtype=np.float32) * (1.0 / d ** 0.5)
        copies = rng.random(m) < COPIES
        src = rng.integers(0, m, int(copies.sum()))
        x[copies] = x[src] + rng.standard_normal((len(src), d), dtype=np.float32) * (0.01 / d ** 0.5)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        save_file({"row": np.arange(start, start + m, dtype=np.int64), "image": x.astype(np.float16),
                   "clip_score": rng.uniform(0.1, 0.4, m).astype(np.float32)}, str(emb / f"shard-{s:05d}.safetensors"))
    return root / "pairs.jsonl", emb


def run_once(root: Path, n: int, pairs: Path, emb: Path) -> dict:
    """One CLI run in a child process: wall time, peak RSS, stage times and the funnel."""
    out = root / "out"
    cmd = [sys.executable, "-m", "mmkit", "-q", "build-dataset", "condense", "--pairs", str(pairs),
           "--embeddings", str(emb), "--shard-rows", str(SHARD_ROWS), "--clusters", str(max(1, n // PER_CLUSTER)),
           "--buckets", str(max(1, n // PER_BUCKET)), "--target", str(n // 50), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"condense failed at N={n}:\n{err}")
    work = root / "out.work"
    stamps = [(work / name / "_STAGE.json").stat().st_mtime for name in STAGE_DIRS]
    manifest = json.loads((out / "manifest.json").read_text())
    started = time.mktime(time.strptime(manifest["started"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    gaps = np.diff([started, *stamps, stamps[-1]]).tolist()[:-1]
    return {"n": n, "wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stages": dict(zip(STAGE_DIRS, gaps)),
            "funnel": {s["name"]: s["kept"] for s in manifest["metrics"]["stages"]},
            "export_s": wall - (stamps[-1] - started)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,300000,1000000", help="comma list of N")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--tmp", default=None, help="scratch directory (default: the system temp dir)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="mmkit-bench-condense-", dir=args.tmp))
        try:
            t0 = time.perf_counter()
            pairs, emb = make_data(root, n, args.d)
            gen = time.perf_counter() - t0
            res = run_once(root, n, pairs, emb)
            res["gen_s"] = gen
            results.append(res)
            print(f"N={n:,}: {res['wall_s']:.1f} s, {n / res['wall_s']:,.0f} pairs/s, peak RSS {res['rss_mb']:,.0f} MB",
                  file=sys.stderr)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    big = results[-1]
    rss = [r["rss_mb"] for r in results]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/condense.py --sizes {args.sizes} --d {args.d}`.",
        "",
        f"- {machine_info()}",
        "",
        f"Data: N pairs with N x {args.d} float16 image embeddings in mmkit shards of {SHARD_ROWS:,} rows, "
        f"streamed from disk (`--embeddings`): rows around N/{PER_CLUSTER:,} seeded random centres plus "
        f"{COPIES:.0%} planted near-copies. Each N runs the real CLI in its own child process: "
        f"`--shard-rows {SHARD_ROWS} --clusters N/{PER_CLUSTER} --buckets N/{PER_BUCKET} --target N/50`, "
        "default dedup threshold (0.86), bands (0.40-0.60 clip score, 0.15-0.35 centroid cosine) and "
        "parquet export. Peak RSS is the child's `ru_maxrss` (the whole pipeline, Python and "
        "libraries included). The sizes keep the work per shard, per bucket and per cluster constant, so "
        "the memory bound of build.md §2 (one shard, one bucket) does not grow with N.",
        "",
        "| N | wall (s) | pairs/s | peak RSS (MB) | kept (dedup / bands / sample) |",
        "|---|---|---|---|---|",
        *(f"| {r['n']:,} | {r['wall_s']:.1f} | {r['n'] / r['wall_s']:,.0f} | {r['rss_mb']:,.0f} | "
          f"{r['funnel']['dedup']:,} / {r['funnel']['centroid-band']:,} / {r['funnel']['sample']:,} |"
          for r in results),
        "",
        f"- peak RSS from N = {results[0]['n']:,} to N = {big['n']:,} ({big['n'] // results[0]['n']}x the data): "
        f"{rss[0]:,.0f} MB -> {rss[-1]:,.0f} MB ({rss[-1] / rss[0]:.2f}x)",
        f"- stage times at N = {big['n']:,} (s): "
        + ", ".join(f"{name} {sec:.1f}" for name, sec in big["stages"].items())
        + f", export and publish (to process exit) {big['export_s']:.1f}",
        f"- what still grows with N here: k = N/{PER_CLUSTER:,}, so the k-means sample (64 x k x d x 4 B, "
        f"{64 * (big['n'] // PER_CLUSTER) * args.d * 4 / 2**20:,.0f} MB at the largest N) and faiss's buffers; "
        "plus 17 B per pair (key index) and 12 B per band survivor.",
        "- dedup costs N x (mean cluster size) x d multiply-adds: at the default `--clusters auto` "
        f"(N/20,000) clusters hold ~20,000 rows, {20_000 // PER_CLUSTER}x the size used here, and dedup "
        "then dominates the run time.",
    ]
    print("\n".join(lines))
    write_section(DOC, HEADING, lines)
    print(f"\nwrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
