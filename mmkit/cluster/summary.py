"""The blocks of ``summary.json`` (cluster.md §6): pure functions over arrays, no I/O.

Labels here are the final group ids (after the small-group policy of §4); a row labelled -1
is excluded from training and from every per-group statistic. Random draws use the streams
of §5.6: ``SeedSequence([seed, 3])`` for the silhouette sample and ``SeedSequence([seed, 4])``
for the examples. Importing this module does not import torch.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Mapping, Sequence

import numpy as np

from mmkit import __version__
from mmkit.cluster.records import InstructionRecords

TOP_WORDS = 10
EXAMPLES = 3
EXAMPLE_CHARS = 200
SILHOUETTE_SAMPLE = 5000
DEFAULT_BATCH_SIZE = 8
_BLOCK_ELEMENTS = 1 << 22  # float64 values per gathered block of batches (32 MB)
#: ``versions`` entry -> installed distribution (read from metadata, nothing imported).
DISTRIBUTIONS = {"numpy": "numpy", "torch": "torch", "transformers": "transformers",
                 "faiss": "faiss-cpu", "sklearn": "scikit-learn"}


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def _first_per_group(order: np.ndarray, labels: np.ndarray, n_groups: int, n: int) -> list[list[int]]:
    """The first ``n`` rows of each group in ``order`` (rows already sorted by group, then rank)."""
    grouped = labels[order]
    starts = np.searchsorted(grouped, np.arange(n_groups))
    ends = np.searchsorted(grouped, np.arange(n_groups), side="right")
    return [order[s:min(e, s + n)].tolist() for s, e in zip(starts, ends)]


# --------------------------------------------------------------------------- per-group blocks


def top_words(texts: Sequence[str], labels: np.ndarray, n_groups: int, n: int = TOP_WORDS) -> list[list[str]]:
    """The ``n`` highest class-based TF-IDF words of each group (§6).

    ``CountVectorizer(stop_words="english", min_df=3)`` over the texts; counts are summed per
    group with one sparse product; score(w, g) = tf(w, g) / |g|_words * log(1 + avg_words_per_group
    / total_count(w)). Ties rank alphabetically. A vocabulary left empty by ``min_df`` gives no words.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    labels = np.asarray(labels, dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    vectorizer = CountVectorizer(stop_words="english", min_df=3)
    try:
        counts = vectorizer.fit_transform([texts[i] for i in keep])
    except ValueError:  # empty vocabulary (few or short texts)
        return [[] for _ in range(n_groups)]
    words = vectorizer.get_feature_names_out()
    member = sparse.csr_matrix((np.ones(len(keep)), (labels[keep], np.arange(len(keep)))),
                               shape=(n_groups, len(keep)))
    tf = (member @ counts).tocsr().astype(np.float64)  # [groups, vocabulary]
    group_words = np.asarray(tf.sum(axis=1)).ravel()
    word_total = np.asarray(tf.sum(axis=0)).ravel()
    idf = np.log1p(group_words.sum() / n_groups / word_total)
    scores = (sparse.diags(1.0 / np.maximum(group_words, 1.0)) @ tf @ sparse.diags(idf)).tocsr()
    out = []
    for g in range(n_groups):  # per group, over its non-zero words only
        row = slice(scores.indptr[g], scores.indptr[g + 1])
        cols, vals = scores.indices[row], scores.data[row]
        best = np.lexsort((words[cols], -vals))[:n]
        out.append(words[cols[best]].tolist())
    return out


def group_examples(labels: np.ndarray, n_groups: int, seed: int = 0, embeddings: np.ndarray | None = None,
                   centroids: np.ndarray | None = None, n: int = EXAMPLES) -> list[list[int]]:
    """Row indices of ``n`` examples per group: nearest the centroid when embeddings and centroids are
    given, else seeded random members (``SeedSequence([seed, 4])``)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    if embeddings is not None and centroids is not None:
        score = -np.einsum("ij,ij->i", embeddings, centroids[np.where(keep, labels, 0)])
    else:
        score = _rng(seed, 4).random(len(labels))
    order = np.lexsort((score, labels))
    order = order[keep[order]]
    return _first_per_group(order, labels, n_groups, n)


def centroid_cosine(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> list[float | None]:
    """Mean cosine between each group's members and its centroid."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    unit_c = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    unit_e = embeddings[keep] / np.maximum(np.linalg.norm(embeddings[keep], axis=1, keepdims=True), 1e-12)
    cos = np.einsum("ij,ij->i", unit_e.astype(np.float64), unit_c[labels[keep]].astype(np.float64))
    sizes = np.bincount(labels[keep], minlength=len(centroids))
    sums = np.bincount(labels[keep], weights=cos, minlength=len(centroids))
    return [float(s / c) if c else None for s, c in zip(sums, sizes)]


def length_stats(lengths: np.ndarray, labels: np.ndarray, n_groups: int) -> list[dict[str, float] | None]:
    """``{min, median, mean, max}`` of the token lengths of each group (None for an empty group)."""
    labels = np.asarray(labels, dtype=np.int64)
    lengths = np.asarray(lengths)
    keep = labels >= 0
    order = np.lexsort((lengths, labels))
    order = order[keep[order]]
    grouped, values = labels[order], lengths[order].astype(np.float64)
    sizes = np.bincount(grouped, minlength=n_groups)
    starts = np.searchsorted(grouped, np.arange(n_groups))
    sums = np.bincount(grouped, weights=values, minlength=n_groups)
    out: list[dict[str, float] | None] = []
    for g in range(n_groups):
        c, s = int(sizes[g]), int(starts[g])
        if not c:
            out.append(None)
            continue
        median = (values[s + (c - 1) // 2] + values[s + c // 2]) / 2
        out.append({"min": float(values[s]), "median": float(median), "mean": float(sums[g] / c),
                    "max": float(values[s + c - 1])})
    return out


# --------------------------------------------------------------------------- quality


def silhouette(embeddings: np.ndarray | None, labels: np.ndarray, seed: int = 0,
               sample: int = SILHOUETTE_SAMPLE) -> tuple[float | None, int | None]:
    """(cosine silhouette on min(sample, N) seeded points (``SeedSequence([seed, 3])``), points used).

    None when there are no embeddings, fewer than 2 groups, or the sample cannot be scored.
    """
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    if embeddings is None or len(np.unique(labels[keep])) < 2:
        return None, None
    rows = keep
    if len(keep) > sample:
        rows = np.sort(_rng(seed, 3).choice(keep, size=sample, replace=False))
    n_labels = len(np.unique(labels[rows]))
    if not 2 <= n_labels <= len(rows) - 1:
        return None, int(len(rows))
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(embeddings[rows], labels[rows], metric="cosine")), int(len(rows))


def _as_batches(batches: np.ndarray) -> np.ndarray:
    batches = np.asarray(batches, dtype=np.int64)
    return batches.reshape(-1, batches.shape[-1])


def within_batch_cosine(embeddings: np.ndarray, batches: np.ndarray) -> float | None:
    """Mean pairwise cosine inside each batch, averaged over all batches.

    ``batches`` is an int array [..., B] of row ids (e.g. ``plan_epoch``'s [S, A, W, B]). For unit
    rows, the sum over pairs i != j of e_i . e_j is ||sum e||^2 - sum ||e||^2. Batches are
    gathered in blocks of about ``_BLOCK_ELEMENTS`` values. None when B < 2 or there are no batches.
    """
    flat = _as_batches(batches)
    m, b = flat.shape
    if m == 0 or b < 2:
        return None
    unit = embeddings.astype(np.float64)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    step = max(1, _BLOCK_ELEMENTS // (b * unit.shape[1]))
    pair_sum = np.empty(m, dtype=np.float64)
    for start in range(0, m, step):
        rows = unit[flat[start:start + step]]  # [M', B, d]
        total = rows.sum(axis=1)
        pair_sum[start:start + step] = np.einsum("md,md->m", total, total) - np.einsum("mbd,mbd->m", rows, rows)
    return float(np.mean(pair_sum / (b * (b - 1))))


def padding_fraction(lengths: np.ndarray, batches: np.ndarray) -> float | None:
    """Mean over batches of 1 - sum(L) / (B * max L): the share of a padded batch that is padding."""
    flat = _as_batches(batches)
    if flat.shape[0] == 0:
        return None
    lens = np.asarray(lengths, dtype=np.float64)[flat]
    longest = lens.max(axis=1) * flat.shape[1]
    filled = np.divide(lens.sum(axis=1), longest, out=np.ones(len(lens)), where=longest > 0)
    return float(np.mean(1.0 - filled))


def _pair(fn, values: np.ndarray | None, grouped: np.ndarray | None, random: np.ndarray | None) -> dict:
    def one(batches):
        return None if values is None or batches is None else fn(values, batches)

    return {"grouped": one(grouped), "random": one(random)}


# --------------------------------------------------------------------------- assembly


def versions() -> dict[str, str | None]:
    """Python and library versions from installed metadata (None when a library is absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in DISTRIBUTIONS.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 1] + "…"


def build_summary(
    *,
    records: InstructionRecords,
    metric: str,
    labels: np.ndarray,
    names: Sequence[str],
    k_requested: int | None,
    params: Mapping[str, Any],
    small_groups: Mapping[str, Any],
    merged_from: Sequence[Sequence[int] | None] | None = None,
    centroids: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    grouped_batches: np.ndarray | None = None,
    random_batches: np.ndarray | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    inertia: float | None = None,
    kmeans: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    argv: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """The ``summary.json`` dict of §6 for the final grouping.

    ``labels``/``names``/``centroids``/``merged_from`` describe the groups after §4 (-1 =
    excluded); ``embeddings`` (embedding metric, or ``--merge-encoder``) and ``lengths`` (token
    counts, when a tokenizer was given) are optional and their blocks are null without them.
    ``grouped_batches`` and ``random_batches`` are epoch-0 batches ([..., B] row ids) of the
    CommonIT and random samplers for ``batch_size``; ``small_groups`` is the §4 report
    ``{U, policy, groups, examples}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_groups = len(names)
    n = len(records)
    sizes = np.bincount(labels[labels >= 0], minlength=n_groups)
    words = top_words(records.instruction_text, labels, n_groups)
    examples = group_examples(labels, n_groups, seed, embeddings, centroids)
    stats = length_stats(lengths, labels, n_groups) if lengths is not None else [None] * n_groups
    cosines = (centroid_cosine(embeddings, labels, centroids)
               if metric == "embedding" and embeddings is not None and centroids is not None else None)
    groups = []
    for g, name in enumerate(names):
        entry: dict[str, Any] = {
            "id": g, "name": name, "size": int(sizes[g]), "share": float(sizes[g] / n),
            "length_tokens": stats[g], "top_words": words[g],
            "examples": [{"row": int(records.rows[i]), "instruction": _clip(records.instruction_text[i]),
                          "output": _clip(records.response_text[i])} for i in examples[g]],
        }
        if cosines is not None:
            entry["mean_cos_to_centroid"] = cosines[g]
        if metric == "length" and stats[g] is not None:
            entry["range"] = [int(stats[g]["min"]), int(stats[g]["max"])]
        entry["merged_from"] = None if merged_from is None else merged_from[g]
        groups.append(entry)
    score, sampled = silhouette(embeddings, labels, seed)
    return {
        "mmkit_version": __version__,
        "argv": list(argv),
        "metric": metric,
        "params": dict(params),
        "source": dict(records.source),
        "k_requested": k_requested,
        "k_effective": n_groups,
        "groups": groups,
        "small_groups": dict(small_groups),
        "quality": {
            "inertia": inertia,
            "silhouette_cosine": score,
            "silhouette_sample": sampled,
            "within_batch_cosine": {"batch_size": batch_size,
                                    **_pair(within_batch_cosine, embeddings, grouped_batches, random_batches)},
            "padding_fraction": _pair(padding_fraction, lengths, grouped_batches, random_batches),
        },
        "kmeans": None if kmeans is None else dict(kmeans),
        "timings_s": dict(timings or {}),
        "versions": versions(),
    }
