"""Quickstart: embed ShareGPT instructions with all-MiniLM-L6-v2 and cluster them, offline.

Runs end to end through mmkit's core (records -> encoder -> k-means -> run folder) on data
and a model shipped by PyPI packages. Writes OUT/results.json, OUT/clusters.jsonl,
OUT/config.yaml and OUT/log.txt; a second run reuses the embedding cache and gives the same
files.

    python examples/quickstart.py --n 2000 --k 8 --out runs/quickstart
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np


@dataclass
class QuickstartConfig:
    n: int = 2000
    k: int = 8
    seed: int = 0
    model: str = "bundled:minilm"
    out: str = "runs/quickstart"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(QuickstartConfig()).items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    cfg = QuickstartConfig(**vars(parser.parse_args()))

    from sklearn.metrics import silhouette_score

    from mmkit.config import config_dict
    from mmkit.core.embed import encode_texts
    from mmkit.core.kmeans import kmeans
    from mmkit.core.seeding import stable_rng
    from mmkit.io import fingerprint, read_records, start_run, write_jsonl, write_results
    from mmkit.progress import setup_logging

    setup_logging()
    run = start_run(cfg.out, "quickstart", cfg, overwrite=True)

    records = list(read_records("builtin:sharegpt", required=["instruction"]))
    pick = np.sort(stable_rng(cfg.seed, "quickstart").choice(len(records), size=cfg.n, replace=False))
    texts = [records[i]["instruction"] for i in pick]

    emb, info = encode_texts(texts, cfg.model, return_info=True)
    km = kmeans(emb, cfg.k, seed=cfg.seed)
    sizes = np.bincount(km.assignments, minlength=cfg.k)
    dist = ((emb - km.centroids[km.assignments]) ** 2).sum(1)
    clusters = []
    for c in np.argsort(-sizes):
        members = np.flatnonzero(km.assignments == c)
        nearest = members[np.argsort(dist[members])[:3]]
        clusters.append({"cluster": int(c), "size": int(sizes[c]),
                         "nearest_to_centroid": [texts[i][:200] for i in nearest]})
    write_jsonl(run / "clusters.jsonl", clusters)
    write_results(run, method="embed+kmeans", config=config_dict(cfg),
                  metrics={"n": cfg.n, "k": cfg.k, "dim": int(emb.shape[1]), "inertia": km.inertia,
                           "silhouette_cosine": float(silhouette_score(emb, km.assignments, metric="cosine")),
                           "cluster_sizes": sorted(sizes.tolist(), reverse=True),
                           "kmeans_backend": km.backend, "embedding_cache_hit": info.cache_hit},
                  seed=cfg.seed, models={"encoder": info.record()},
                  data=fingerprint("builtin:sharegpt", cfg.n))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.n} ShareGPT instructions, k-means k={cfg.k} ({km.backend})")
    for col in ("cluster", "size", "an instruction near the centroid"):
        table.add_column(col)
    for c in clusters:
        table.add_row(str(c["cluster"]), str(c["size"]), c["nearest_to_centroid"][0][:70].replace("\n", " "))
    console = Console(stderr=True)
    console.print(table)
    console.print(f"results: {run / 'results.json'}\nclusters: {run / 'clusters.jsonl'}")


if __name__ == "__main__":
    main()
