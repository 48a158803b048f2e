"""CommonIT on ShareGPT: the protocol of cluster.md section 11, measured side by side in one run.

    python benchmarks/cluster.py [--n 20000] [--ks 8,16,32] [--subset 2000] [--synthetic-n 100000]
                                 [--repeats 3] [--json-out FILE] [--no-write]

On --n ShareGPT pairs (``builtin:sharegpt``, sampled with seed 0 exactly as ``--sample``
does), with the bundled all-MiniLM-L6-v2 (``bundled:minilm``, max length 256, batch 128):

1. encode every instruction length-sorted with the cache off; the sorted vs input-order
   throughput ratio is measured on a seeded --subset of those texts (input order on all 20k
   would take about half an hour on 2 CPU cores: 11.6 texts/s measured on the subset);
2. k-means for each k of --ks, 20 iterations, through ``mmkit.core.kmeans.kmeans``: faiss with
   random init, faiss's native k-means++, faiss seeded from scikit-learn's ``kmeans_plusplus``,
   and scikit-learn ``KMeans(n_init=1)``; time (median of --repeats interleaved runs, end to
   end) and inertia over all rows;
3. the cosine silhouette of the default grouping (faiss, native k-means++) on a seeded
   5,000-point sample (``mmkit.cluster.summary.silhouette``);
4. the mean pairwise cosine inside the epoch-0 batches (B = 8, W = 1) of
   ``GroupedBatchSampler`` and of ``RandomBatchSampler`` on the same kept set;
5. the length metric with the SmolLM2 GGUF tokenizer (``bundled:smollm2``, k = 8): bucket
   ranges and sizes, tokenisation time, and the padding fraction of grouped vs random batches.

A second table repeats the k-means comparison on --synthetic-n x 384 synthetic unit vectors
with k = 64 (the data of benchmarks/kmeans.py), plus faiss trained on 256 rows per centroid
(what ``faiss.Kmeans`` does by default). Writes the section
"## cluster-instructions (benchmarks/cluster.py)" of docs/performance.md and the section
"## Experiment results (benchmarks/cluster.py)" of docs/cluster.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_section  # noqa: E402
from benchmarks.embed import interleaved, padded_tokens  # noqa: E402
from benchmarks.kmeans import machine, make_data  # noqa: E402
from mmkit.core.seeding import stable_rng  # noqa: E402

PERF_DOC = ROOT / "docs" / "performance.md"
PERF_HEADING = "## cluster-instructions (benchmarks/cluster.py)"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
CLUSTER_HEADING = "## Experiment results (benchmarks/cluster.py)"
ENCODER, MAX_LENGTH, ITERS, B, LENGTH_K, SYNTH_K = "bundled:minilm", 256, 20, 8, 8, 64
TOKENIZER = "bundled:smollm2"
VARIANTS = ("faiss random", "faiss k-means++ (native)", "faiss + sklearn kmeans_plusplus",
            "sklearn KMeans(n_init=1)")
DEFAULT_VARIANT = "faiss k-means++ (native)"  # what `mmkit cluster-instructions` runs by default
SUBSAMPLED = "faiss random, 256 rows per centroid"

#: Values from cluster.md section 11, measured while the spec was written (another run, same
#: kind of machine: 2 CPU cores, torch 2.13, transformers 5.24, faiss-cpu 1.15.1, sklearn 1.9.1).
REFERENCE = {
    "parse": "61,089 pairs, about 1.0 s",
    "encode": "about 267 s (75 texts/s)",
    "kmeans16": {"faiss random": "16,949 / 0.14 s", "faiss k-means++ (native)": "16,899 / 0.13 s",
                 "faiss + sklearn kmeans_plusplus": "16,912 / 0.38 s", "sklearn KMeans(n_init=1)": "16,912 / 0.30 s"},
    "silhouette": "0.025",
    "cosine": "0.153 vs 0.052 (about 3x)",
    "length": ("1-70, 71-144, 145-213, 214-275, 276-338, 339-418, 419-567, 568-3154; "
               "2,489-2,509 per bucket; tokenisation 3.9 s"),
    "padding": "0.169 vs 0.521",
    "synthetic": ("faiss 0.84 s (all points) vs sklearn 2.94 s; faiss with its default subsampling "
                  "0.15 s; sklearn `kmeans_plusplus` alone 1.9 s"),
}


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def embedding_k(ks: list[int]) -> int:
    """The k whose groups the detailed tables show: 16 (the default, the spec's reference row) if run."""
    return 16 if 16 in ks else ks[len(ks) // 2]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def kmeans_variants(x: np.ndarray, k: int, subsampled: bool = False) -> dict[str, Callable[[], dict]]:
    """name -> a call returning {result, init_s}; every variant goes through core/kmeans.kmeans."""
    from sklearn.cluster import kmeans_plusplus

    from mmkit.core.kmeans import kmeans

    def seeded() -> dict:
        t0 = time.perf_counter()
        init, _ = kmeans_plusplus(x, k, random_state=0)
        init_s = time.perf_counter() - t0
        return {"result": kmeans(x, k, ITERS, 1, init_centroids=init, seed=0, backend="faiss"), "init_s": init_s}

    variants = {
        "faiss random": lambda: {"result": kmeans(x, k, ITERS, 1, "random", seed=0, backend="faiss")},
        "faiss k-means++ (native)": lambda: {"result": kmeans(x, k, ITERS, 1, "kmeans++", seed=0,
                                                              backend="faiss")},
        "faiss + sklearn kmeans_plusplus": seeded,
        "sklearn KMeans(n_init=1)": lambda: {"result": kmeans(x, k, ITERS, 1, "kmeans++", seed=0,
                                                              backend="sklearn")},
    }
    if subsampled:  # faiss.Kmeans' default: train on at most 256 rows per centroid
        variants[SUBSAMPLED] = lambda: {"result": kmeans(x, k, ITERS, 1, "random", sample=min(len(x), 256 * k),
                                                         seed=0, backend="faiss")}
    return variants


def compare_kmeans(x: np.ndarray, k: int, repeats: int, subsampled: bool = False) -> dict[str, dict]:
    """Median end-to-end time of ``repeats`` interleaved runs per variant, and the last result."""
    variants = kmeans_variants(x, k, subsampled)
    times: dict[str, list[float]] = {v: [] for v in variants}
    init_times: dict[str, list[float]] = {v: [] for v in variants}
    last: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved, so a transient load hits every variant alike
        for name, call in variants.items():
            out, seconds = timed(call)
            times[name].append(seconds)
            if "init_s" in out:
                init_times[name].append(out["init_s"])
            last[name] = out["result"]
    return {name: {"time_s": statistics.median(times[name]), "runs_s": times[name],
                   "init_s": statistics.median(init_times[name]) if init_times[name] else None,
                   "inertia": last[name].inertia, "iterations": len(last[name].objective_per_iter) or None,
                   "result": last[name]} for name in variants}


def batches_of(labels: np.ndarray, names: list[str], centroids: np.ndarray | None, kind: str,
               medians: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Epoch-0 per-device batches [M, B] of GroupedBatchSampler and RandomBatchSampler (W = 1)."""
    from mmkit.cluster import GroupedBatchSampler, GroupInfo, RandomBatchSampler

    info = GroupInfo(names=names, centroids=centroids, ordered=kind == "length", medians=medians, kind=kind)
    opts = dict(world_size=1, rank=0, accumulation_steps=1, seed=0, small_groups="merge", group_info=info)
    grouped_s, random_s = GroupedBatchSampler(labels, B, **opts), RandomBatchSampler(labels, B, **opts)
    grouped, random = grouped_s.plan(0)[1].reshape(-1, B), random_s.plan(0)[1].reshape(-1, B)
    if not np.array_equal(np.sort(grouped.ravel()), np.sort(random.ravel())):
        raise SystemExit("RandomBatchSampler did not use the CommonIT kept set")
    pure = bool((grouped_s.labels[grouped] == grouped_s.labels[grouped][:, :1]).all())
    report = {k: v for k, v in grouped_s.report.items() if k in ("n_groups", "steps", "kept", "leftover")}
    return grouped, random, {**report, "pure": pure}


# --------------------------------------------------------------------------- the protocol


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmkit.cluster.metrics import METRICS, MetricOptions, renumber_clusters
    from mmkit.cluster.records import load_records
    from mmkit.cluster.summary import padding_fraction, silhouette, top_words, within_batch_cosine
    from mmkit.core import embed as E
    from mmkit.core.data import input_order_batches, length_sorted_batches, tokenize_flat
    from mmkit.core.kmeans import kmeans
    from mmkit.core.models import load_model

    res: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg()[0]}
    t_start = time.perf_counter()

    log("parsing builtin:sharegpt")
    everything, res["parse_s"] = timed(lambda: load_records("builtin:sharegpt"))
    res["pairs"] = len(everything)
    records = everything.sample(args.n, 0)
    texts = records.instruction_text
    log(f"{res['pairs']} pairs in {res['parse_s']:.1f} s; sampled {len(records)}")

    # 1. encoding -------------------------------------------------------------------------
    loaded, res["encoder_load_s"] = timed(lambda: load_model(ENCODER, "encoder", device="cpu"))
    res["machine_encode"] = machine_info()
    length = E.resolve_max_length(loaded.path, loaded.model.config, loaded.preprocessor, None)
    common = dict(loaded=loaded, batch_size=args.batch_size, use_cache=False, progress=False)
    E.encode_texts(texts[:16], **common)  # warm-up: thread pools, kernels
    log(f"encoding {len(texts)} instructions, length-sorted, cache off")
    emb, res["encode_s"] = timed(lambda: E.encode_texts(texts, **common))
    log(f"encoded in {res['encode_s']:.1f} s")
    lengths = tokenize_flat(loaded.preprocessor, texts, max_length=length).lengths
    res["encode_tokens"] = {"real": int(lengths.sum()),
                            "padded_sorted": padded_tokens(lengths, length_sorted_batches(lengths, args.batch_size))}
    res["max_length"] = length

    rows = np.sort(stable_rng(0, "benchmarks", "cluster", "subset").choice(len(texts), args.subset, replace=False))
    sub = [texts[i] for i in rows]
    sub_lengths = tokenize_flat(loaded.preprocessor, sub, max_length=length).lengths
    log(f"sorted vs input order on a {len(sub)}-text subset (interleaved batch by batch)")
    (t_sorted, t_unsorted), out = interleaved(loaded, sub, length, args.batch_size)
    res["subset"] = {
        "n": len(sub), "sorted_s": t_sorted, "unsorted_s": t_unsorted, "ratio": t_unsorted / t_sorted,
        "real_tokens": int(sub_lengths.sum()),
        "padded_sorted": padded_tokens(sub_lengths, length_sorted_batches(sub_lengths, args.batch_size)),
        "padded_unsorted": padded_tokens(sub_lengths, input_order_batches(len(sub), args.batch_size)),
        "max_diff_modes": float(np.abs(out[True] - out[False]).max()),
        "max_diff_full_run": float(np.abs(out[True] - emb[rows]).max()),
    }
    log(f"subset: sorted {t_sorted:.1f} s, input order {t_unsorted:.1f} s, ratio {res['subset']['ratio']:.2f}x")
    del loaded

    # 2-4. k-means, silhouette, within-batch cosine -----------------------------------------
    for backend in ("faiss", "sklearn"):
        kmeans(emb[:2000], 8, iters=2, backend=backend)  # warm-up: imports, thread pools
    res["kmeans"], res["quality"] = {}, {}
    embedding_batches = {}
    for k in args.ks:
        log(f"k-means k={k}: {len(VARIANTS)} variants x {args.repeats} runs")
        rows_k = compare_kmeans(emb, k, args.repeats)
        default = rows_k[DEFAULT_VARIANT]["result"]
        labels, centroids = renumber_clusters(default.assignments, k, default.centroids)
        names = [f"e{i:02d}" for i in range(len(centroids))]
        (score, sampled), sil_s = timed(lambda: silhouette(emb, labels, seed=0))
        grouped, random, report = batches_of(labels, names, centroids, "embedding")
        embedding_batches[k] = grouped, random
        cos_g, cos_r = within_batch_cosine(emb, grouped), within_batch_cosine(emb, random)
        sizes = np.bincount(labels)
        quality = {"k_effective": len(centroids), "silhouette": score, "silhouette_sample": sampled,
                   "silhouette_s": sil_s, "cos_grouped": cos_g, "cos_random": cos_r, "cos_ratio": cos_g / cos_r,
                   "size_min": int(sizes.min()), "size_max": int(sizes.max()), **report}
        if k == embedding_k(args.ks):
            words = top_words(texts, labels, len(centroids))
            quality["groups"] = [{"name": n, "size": int(s), "top_words": w[:6]}
                                 for n, s, w in zip(names, sizes, words)]
        res["quality"][k] = quality
        res["kmeans"][k] = {v: {key: val for key, val in r.items() if key != "result"} for v, r in rows_k.items()}
        log(f"k={k}: silhouette {score:.3f}, within-batch cosine {cos_g:.3f} vs {cos_r:.3f}")
    res["embedding_labels_k"] = embedding_k(args.ks)

    # 5. length metric -----------------------------------------------------------------------
    log("length metric with the SmolLM2 GGUF tokenizer")
    metric, total_s = timed(lambda: METRICS.resolve("length")(records, MetricOptions(k=LENGTH_K, tokenizer=TOKENIZER)))
    tok_s = metric.extra["timings"]["tokenize"]
    lens = metric.extra["lengths"]
    sizes = np.bincount(metric.labels)
    medians = np.array([np.median(lens[metric.labels == g]) for g in range(len(metric.names))])
    grouped, random, report = batches_of(metric.labels, metric.names, None, "length", medians)
    res["length"] = {
        "k_effective": len(metric.names), "ranges": metric.extra["ranges"], "sizes": sizes.tolist(),
        "tokenize_s": tok_s, "tokenizer_load_s": total_s - tok_s, "total_tokens": int(lens.sum()),
        "median_tokens": float(np.median(lens)), "max_tokens": int(lens.max()),
        "pad_grouped": padding_fraction(lens, grouped), "pad_random": padding_fraction(lens, random), **report,
    }
    # For comparison: the padding of the embedding groups (they do not sort by length).
    g_emb, r_emb = embedding_batches[res["embedding_labels_k"]]
    res["length"]["pad_embedding_grouped"] = padding_fraction(lens, g_emb)
    res["length"]["pad_embedding_random"] = padding_fraction(lens, r_emb)
    log(f"length: tokenised in {tok_s:.1f} s; padding {res['length']['pad_grouped']:.3f} grouped vs "
        f"{res['length']['pad_random']:.3f} random")

    # synthetic ------------------------------------------------------------------------------
    log(f"synthetic {args.synthetic_n} x 384, k={SYNTH_K}")
    x = make_data(args.synthetic_n, 384)
    rows_s = compare_kmeans(x, SYNTH_K, args.repeats, subsampled=True)
    res["synthetic"] = {v: {key: val for key, val in r.items() if key != "result"} for v, r in rows_s.items()}
    res["machine_kmeans"] = machine()
    res["load_after"] = os.getloadavg()[0]
    res["total_s"] = time.perf_counter() - t_start
    log(f"done in {res['total_s']:.0f} s")
    return res


# --------------------------------------------------------------------------- rendering


def _kmeans_table(rows: dict[str, dict], reference: dict[str, str] | None = None) -> list[str]:
    head = "| variant | time (s), median | relative time | runs (s) | inertia | faiss iterations |"
    sep = "|---|---|---|---|---|---|"
    if reference is not None:
        head, sep = head + " reference (spec §11): inertia / time |", sep + "---|"
    lines = [head, sep]
    best = min(r["inertia"] for r in rows.values())
    base = rows[DEFAULT_VARIANT]["time_s"]
    for name, r in rows.items():
        inertia = f"{r['inertia']:,.1f}"
        if r["inertia"] == best:
            inertia = f"**{inertia}**"
        init = f" (incl. {r['init_s']:.2f} s `kmeans_plusplus`)" if r["init_s"] is not None else ""
        line = (f"| {name} | {r['time_s']:.2f}{init} | {r['time_s'] / base:.2f}x | {', '.join(f'{t:.2f}' for t in r['runs_s'])} | {inertia} "
                f"| {r['iterations'] or '-'} |")
        if reference is not None:
            line += f" {reference.get(name, '-')} |"
        lines.append(line)
    return lines


def _command(args: argparse.Namespace) -> str:
    return (f"python benchmarks/cluster.py --n {args.n} --ks {','.join(map(str, args.ks))} --subset {args.subset} "
            f"--synthetic-n {args.synthetic_n} --repeats {args.repeats}")


def perf_section(res: dict, args: argparse.Namespace) -> list[str]:
    sub, n = res["subset"], args.n
    real, padded = res["encode_tokens"]["real"], res["encode_tokens"]["padded_sorted"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `{_command(args)}` (whole run {res['total_s'] / 60:.1f} min; "
        f"1-minute load average {res['load_before']:.2f} before, {res['load_after']:.2f} after). All results of "
        "that run, with the reference values of the spec, are in [cluster.md](cluster.md#experiment-results-benchmarksclusterpy).",
        "",
        f"- Encoder machine: {res['machine_encode']}.",
        *res["machine_kmeans"],
        "",
        "### Encoding the instructions (`core/embed.py`)",
        "",
        f"{n:,} ShareGPT instructions (`builtin:sharegpt`, `--sample {n}` with seed 0), `{ENCODER}` "
        f"(all-MiniLM-L6-v2, max length {res['max_length']}), batch {args.batch_size}, cache off, CPU:",
        "",
        f"- length-sorted (`encode_texts`' default), all {n:,} texts in one `encode_texts` call: "
        f"**{res['encode_s']:.1f} s ({n / res['encode_s']:.1f} texts/s)**; {real:,} real tokens, "
        f"{padded:,} with padding ({100 * (padded - real) / padded:.1f}% padding).",
        f"- sorted vs input order, measured on a seeded {sub['n']:,}-text subset of those texts, because input "
        f"order on all {n:,} would take about {n / (sub['n'] / sub['unsorted_s']) / 60:.0f} minutes on this "
        "machine. The two modes run interleaved batch by batch (the method of benchmarks/embed.py):",
        "",
        "| | sorted by length | input order |",
        "|---|---|---|",
        f"| time | {sub['sorted_s']:.1f} s | {sub['unsorted_s']:.1f} s |",
        f"| texts/s | {sub['n'] / sub['sorted_s']:.1f} | {sub['n'] / sub['unsorted_s']:.1f} |",
        f"| tokens run (incl. padding) | {sub['padded_sorted']:,} | {sub['padded_unsorted']:,} |",
        "",
        f"- **Throughput ratio sorted / input order: {sub['ratio']:.2f}x** (real tokens {sub['real_tokens']:,}). "
        f"Same embeddings either way: max difference {sub['max_diff_modes']:.1e} between the modes and "
        f"{sub['max_diff_full_run']:.1e} against the rows of the full {n:,}-text run.",
        "",
        "### k-means (`core/kmeans.py`)",
        "",
        f"Each time is one end-to-end `kmeans()` call ({ITERS} iterations on all rows, assignment of all rows, "
        f"float64 inertia), median of {args.repeats} interleaved runs after a warm-up. The "
        "scikit-learn-seeded faiss row includes the `kmeans_plusplus` call, and `sklearn KMeans(n_init=1)` runs the same "
        "k-means++ inside its timed call (benchmarks/kmeans.py instead gives both backends one precomputed, untimed "
        "init). The lowest inertia is in bold; relative time is over faiss with native k-means++ (the default).",
        "",
    ]
    for k in args.ks:
        lines += [f"ShareGPT embeddings, {n:,} x 384, k = {k}:", "", *_kmeans_table(res["kmeans"][k]), ""]
    lines += [f"Synthetic {args.synthetic_n:,} x 384 unit vectors (the data of benchmarks/kmeans.py: 64 seeded "
              f"centres + noise), k = {SYNTH_K}. The last row trains on a seeded sample of 256 rows per centroid, "
              "as `faiss.Kmeans` does unless told otherwise (assignment and inertia still cover all rows):", "",
              *_kmeans_table(res["synthetic"]), ""]
    return lines


def cluster_section(res: dict, args: argparse.Namespace) -> list[str]:
    n, sub = args.n, res["subset"]
    k_ref = res["embedding_labels_k"]
    q = res["quality"][k_ref]
    L = res["length"]
    ranges = ", ".join(f"{a}-{b}" for a, b in L["ranges"])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} in one run of `{_command(args)}` ({res['total_s'] / 60:.1f} min on "
        f"{res['machine_encode']}). The protocol is §11 of the spec. The reference column holds the values "
        "measured while the spec was written (another run on a similar 2-core machine); expect the same order "
        "of magnitude, not equality. More timing detail is in "
        "[performance.md](performance.md#cluster-instructions-benchmarksclusterpy).",
        "",
        f"Data: `builtin:sharegpt` ({res['pairs']:,} pairs, parsed in {res['parse_s']:.1f} s), `--sample {n}` "
        f"with seed 0. Embedding metric: `{ENCODER}`, max length {res['max_length']}, batch {args.batch_size}, "
        f"length-sorted, cache off; k-means {ITERS} iterations. Batches: B = {B}, W = 1, A = 1, epoch 0, seed 0; "
        "the random baseline is `RandomBatchSampler` on the same kept set.",
        "",
        "### Summary",
        "",
        "| quantity | this run | reference (spec §11) |",
        "|---|---|---|",
        f"| parse `builtin:sharegpt` | {res['pairs']:,} pairs, {res['parse_s']:.1f} s | {REFERENCE['parse']} |",
        f"| encode {n:,} instructions (length-sorted) | {res['encode_s']:.0f} s ({n / res['encode_s']:.0f} texts/s) "
        f"| {REFERENCE['encode']} |",
        f"| encode throughput, sorted / input order ({sub['n']:,}-text subset) | {sub['ratio']:.2f}x "
        f"({sub['sorted_s']:.1f} s vs {sub['unsorted_s']:.1f} s) | - |",
        "| k = 16 inertia / time: " + ", ".join(VARIANTS) + " | "
        + (", ".join(f"{res['kmeans'][16][v]['inertia']:,.0f} / {res['kmeans'][16][v]['time_s']:.2f} s"
                     for v in VARIANTS) if 16 in res["kmeans"] else "-")
        + " | " + ", ".join(REFERENCE["kmeans16"][v] for v in VARIANTS) + " |",
        f"| cosine silhouette, k = {k_ref} ({q['silhouette_sample']:,}-point sample) | {q['silhouette']:.3f} "
        f"| {REFERENCE['silhouette']} |",
        f"| within-batch mean cosine, k = {k_ref}, grouped vs random | **{q['cos_grouped']:.3f} vs "
        f"{q['cos_random']:.3f}** ({q['cos_ratio']:.1f}x) | {REFERENCE['cosine']} |",
        f"| length k = {LENGTH_K} (SmolLM2): token ranges; sizes; tokenisation | {ranges}; "
        f"{min(L['sizes']):,}-{max(L['sizes']):,} per bucket; {L['tokenize_s']:.1f} s | {REFERENCE['length']} |",
        f"| response padding fraction, length buckets, grouped vs random | **{L['pad_grouped']:.3f} vs "
        f"{L['pad_random']:.3f}** | {REFERENCE['padding']} |",
        f"| synthetic {args.synthetic_n:,} x 384, k = {SYNTH_K} | "
        f"faiss {res['synthetic']['faiss random']['time_s']:.2f} s (random init, all points), "
        f"{res['synthetic']['faiss k-means++ (native)']['time_s']:.2f} s (native k-means++) vs sklearn "
        f"{res['synthetic']['sklearn KMeans(n_init=1)']['time_s']:.2f} s; faiss with its default subsampling "
        f"{res['synthetic'][SUBSAMPLED]['time_s']:.2f} s; sklearn `kmeans_plusplus` alone "
        f"{res['synthetic']['faiss + sklearn kmeans_plusplus']['init_s']:.1f} s | {REFERENCE['synthetic']} |",
        "",
        "### Embedding groups: k-means variants",
        "",
        "Time (median of "
        f"{args.repeats} interleaved runs, end to end) and inertia sum_i ||e_i - c(y_i)||^2 over all {n:,} rows; "
        "the lowest inertia is in bold; relative time is over faiss with native k-means++, the default. The "
        "scikit-learn-seeded faiss row and the sklearn row both include scikit-learn's k-means++ in their time.",
        "",
    ]
    for k in args.ks:
        reference = REFERENCE["kmeans16"] if k == 16 else None
        lines += [f"k = {k}:", "", *_kmeans_table(res["kmeans"][k], reference), ""]
    lines += [
        "### Embedding groups: quality",
        "",
        "Groups from the default variant (faiss, native k-means++, renumbered by size). The silhouette uses "
        "`mmkit.cluster.summary.silhouette` (cosine, seeded 5,000-point sample); the within-batch cosine is "
        "`within_batch_cosine` over every epoch-0 batch of `GroupedBatchSampler` and of `RandomBatchSampler`.",
        "",
        "| k | groups (sizes) | silhouette (cosine) | within-batch cosine, grouped | random | ratio | batches | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in args.ks:
        qk = res["quality"][k]
        lines.append(f"| {k} | {qk['k_effective']} ({qk['size_min']:,}-{qk['size_max']:,}) | {qk['silhouette']:.3f} "
                     f"| {qk['cos_grouped']:.3f} | {qk['cos_random']:.3f} | {qk['cos_ratio']:.2f}x "
                     f"| {qk['steps']:,} | {qk['kept']:,} |")
    lines += ["", f"The k = {k_ref} groups (top words: class-based TF-IDF, as in `summary.json`):", "",
              "| group | size | top words |", "|---|---|---|"]
    lines += [f"| {g['name']} | {g['size']:,} | {', '.join(g['top_words'])} |" for g in q.get("groups", [])]
    lines += [
        "",
        f"### Length groups (SmolLM2 tokenizer, k = {LENGTH_K})",
        "",
        f"Response tokens (`--length-of response`, `add_special_tokens=False`): {L['total_tokens']:,} in all, "
        f"median {L['median_tokens']:.0f}, longest {L['max_tokens']:,}. Tokenisation took {L['tokenize_s']:.1f} s "
        f"(loading the GGUF tokenizer another {L['tokenizer_load_s']:.1f} s). Mid-rank quantile buckets:",
        "",
        "| group | token range | size |",
        "|---|---|---|",
        *(f"| {g} | {a}-{b} | {s:,} |" for g, ((a, b), s) in enumerate(zip(L["ranges"], L["sizes"]))),
        "",
        f"Padding fraction 1 - sum(L) / (B * max L) per batch, averaged over the epoch-0 batches (B = {B}): "
        f"**{L['pad_grouped']:.3f}** with the length groups vs **{L['pad_random']:.3f}** with random batches of "
        f"the same kept set. For comparison, the k = {k_ref} embedding groups give {L['pad_embedding_grouped']:.3f} "
        f"(random {L['pad_embedding_random']:.3f}): they group by topic, not by length.",
        "",
        f"### Synthetic data ({args.synthetic_n:,} x 384, k = {SYNTH_K})",
        "",
        *_kmeans_table(res["synthetic"]),
        "",
        "The last row trains on a seeded sample of 256 rows per centroid, as `faiss.Kmeans` does by default; "
        "mmkit always passes `max_points_per_centroid = N` instead, so that times and inertias compare.",
        "",
    ]
    return lines


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="ShareGPT pairs, sampled with seed 0 (default 20000)")
    ap.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32],
                    help="comma list of k for the embedding metric (default 8,16,32)")
    ap.add_argument("--subset", type=int, default=2000,
                    help="texts for the sorted vs input-order encoding ratio (default 2000)")
    ap.add_argument("--synthetic-n", type=int, default=100_000, help="rows of the synthetic table (default 100000)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved k-means runs per variant (default 3)")
    ap.add_argument("--batch-size", type=int, default=128, help="encoder batch size (default 128)")
    ap.add_argument("--json-out", help="also write every measured number to this JSON file")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch the docs")
    args = ap.parse_args(argv)
    if args.subset > args.n:
        ap.error(f"--subset {args.subset} is more than --n {args.n}")

    res = run(args)
    perf, clus = perf_section(res, args), cluster_section(res, args)
    print("\n".join([PERF_HEADING, "", *perf, CLUSTER_HEADING, "", *clus]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(_jsonable(res), indent=1) + "\n")
    if not args.no_write:
        write_section(PERF_DOC, PERF_HEADING, perf)
        write_section(CLUSTER_DOC, CLUSTER_HEADING, clus)
        print(f"wrote {PERF_DOC.relative_to(ROOT)} and {CLUSTER_DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
