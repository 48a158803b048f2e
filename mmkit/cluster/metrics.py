"""The three CommonIT grouping metrics: Task, Embedding, Length (cluster.md §3).

Each metric in :data:`METRICS` is ``fn(records, options) -> MetricResult`` with ``labels``
(int64, ids 0..K'-1), ``names``, optional ``centroids`` (float32[K', d]) and ``extra`` (what
the summary needs: embeddings, lengths, k-means and encoder info, timings). K' never exceeds
the requested k. Encoding and k-means are the shared ``core/embed.py`` and ``core/kmeans.py``.
Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmkit.cluster.records import InstructionRecords
from mmkit.core.models import MINILM_HUB_ID
from mmkit.errors import MmkitError, ModelError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

#: Requested number of groups when ``--k`` is not given.
DEFAULT_K = {"embedding": 16, "length": 8}
#: Texts per tokenizer call when counting tokens (§3.3).
TOKENIZE_CHUNK = 1000


@dataclass(frozen=True)
class MetricOptions:
    """Every metric option (§7 names and defaults); each metric reads the ones it uses."""

    k: int | None = None  # None: DEFAULT_K of the metric; an error with task
    seed: int = 0
    # embedding (§3.2)
    encoder: str = MINILM_HUB_ID
    max_seq_len: int | None = None  # None: sentence_bert_config.json, else 512
    embed_batch_size: int = 128
    device: str = "auto"
    cache_dir: str | None = None  # the cache root; entries go to <root>/embed
    use_cache: bool = True
    progress: bool = True
    kmeans_backend: str = "auto"
    kmeans_init: str = "kmeans++"
    kmeans_iters: int = 20
    kmeans_redo: int = 1
    spherical: bool = False
    # length (§3.3)
    tokenizer: str | None = None
    gguf_file: str | None = None
    length_of: str = "response"
    length_edges: tuple[float, ...] | None = None


@dataclass
class MetricResult:
    """A metric's grouping: ``labels`` int64[N] in 0..K'-1, one name per id, optional centroids."""

    labels: np.ndarray
    names: list[str]
    centroids: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def k_effective(self) -> int:
        return len(self.names)


METRICS: Registry = Registry("metric")


# --------------------------------------------------------------------------- task (§3.1)


@METRICS.register("task")
def task_metric(records: InstructionRecords, options: MetricOptions) -> MetricResult:
    """One group per task label; ids in byte order of the labels (file order for ``--task-from file``)."""
    if options.k is not None:
        raise MmkitError("has no meaning with --metric task (the task labels are the groups); drop it",
                         field="--k")
    if records.task is None:
        raise MmkitError("the task metric needs records loaded with need_task=True", field="--metric")
    present, inverse = np.unique(np.asarray(records.task, dtype=str), return_inverse=True)
    names = present.tolist()  # numpy sorts str by code point, which is UTF-8 byte order
    if records.task_order is not None:
        rank = {name: i for i, name in enumerate(records.task_order)}
        order = np.argsort([rank[name] for name in names], kind="stable")
        names = [names[i] for i in order]
        inverse = np.argsort(order)[inverse]
    return MetricResult(np.asarray(inverse, dtype=np.int64).reshape(-1), names)


# --------------------------------------------------------------------------- embedding (§3.2)


def renumber_clusters(assignments: np.ndarray, k: int,
                      centroids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Drop empty clusters and renumber by descending size, ties by smallest member index.

    Returns (labels int64[N], centroids of the kept clusters in the new order, or None).
    """
    assignments = np.asarray(assignments, dtype=np.int64)
    sizes = np.bincount(assignments, minlength=k)
    present, first = np.unique(assignments, return_index=True)
    order = present[np.lexsort((first, -sizes[present]))]
    new_id = np.full(k, -1, dtype=np.int64)
    new_id[order] = np.arange(len(order))
    kept = None if centroids is None else np.ascontiguousarray(centroids[order], dtype=np.float32)
    return new_id[assignments], kept


def embedding_names(k: int) -> list[str]:
    """``e00``, ``e01``, ... (wider when there are more than 100 groups)."""
    width = max(2, len(str(k - 1)))
    return [f"e{i:0{width}d}" for i in range(k)]


@METRICS.register("embedding")
def embedding_metric(records: InstructionRecords, options: MetricOptions) -> MetricResult:
    """k-means over L2-normalised mean-pooled embeddings of ``instruction_text``."""
    from mmkit.core.embed import encode_texts
    from mmkit.core.kmeans import kmeans

    n = len(records)
    k = DEFAULT_K["embedding"] if options.k is None else options.k
    if not 1 <= k <= n:
        raise MmkitError(f"must be between 1 and the number of records ({n}), got {k}", field="--k")
    t0 = time.perf_counter()
    embeddings, info = encode_texts(
        records.instruction_text, options.encoder, max_length=options.max_seq_len,
        batch_size=options.embed_batch_size, device=options.device, text_mode=records.fields.embed_text,
        cache_dir=options.cache_dir, use_cache=options.use_cache, progress=options.progress, return_info=True)
    t1 = time.perf_counter()
    log.info("encoder %s: %s", options.encoder, info.path)
    try:
        result = kmeans(embeddings, k, options.kmeans_iters, options.kmeans_redo, options.kmeans_init,
                        spherical=options.spherical, seed=options.seed, backend=options.kmeans_backend)
    except MmkitError as err:
        if err.field != "k":
            raise
        raise MmkitError(f"{err.message} (identical instructions have identical embeddings)", field="--k") from None
    labels, centroids = renumber_clusters(result.assignments, k, result.centroids)
    t2 = time.perf_counter()
    k_eff = len(centroids)
    if k_eff < k:
        log.warning("k-means left %d of %d clusters empty; %d groups remain", k - k_eff, k, k_eff)
    kmeans_info = {"backend": result.backend, "init": result.init, "iters": options.kmeans_iters,
                   "redo": options.kmeans_redo, "seed": options.seed,
                   "objective_per_iter": result.objective_per_iter}
    return MetricResult(labels, embedding_names(k_eff), centroids, {
        "k_requested": k, "embeddings": embeddings, "inertia": result.inertia, "kmeans": kmeans_info,
        "encoder": info.as_dict(), "timings": {"encode": t1 - t0, "cluster": t2 - t1}})


# --------------------------------------------------------------------------- length (§3.3)


def count_tokens(tokenizer: Any, texts: Sequence[str], chunk: int = TOKENIZE_CHUNK) -> np.ndarray:
    """int64 token counts of ``texts`` with ``add_special_tokens=False``, ``chunk`` texts per call."""
    counts = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        ids = tokenizer(list(texts[start:start + chunk]), add_special_tokens=False, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        counts[start:start + len(ids)] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return counts


def _whitespace_counter(gguf_file: str | None) -> tuple[Callable[[Sequence[str]], np.ndarray], dict]:
    def count(texts: Sequence[str]) -> np.ndarray:
        return np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))

    return count, {"id": "whitespace", "path": None, "gguf_file": None}


#: Tokenizer names that need no model: name -> ``factory(gguf_file) -> (count_fn, info)``.
TOKENIZERS: Registry = Registry("tokenizer")
TOKENIZERS.register("whitespace", _whitespace_counter)


def load_tokenizer(name: str, gguf_file: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(tokenizer, {id, path, gguf_file})`` from a hub id, a directory (plus ``gguf_file``) or
    ``bundled:smollm2``. Any failure of the loader becomes a one-line :class:`ModelError`.
    """
    from mmkit.core.models import resolve_source

    local = Path(name).expanduser()
    # A tokenizer-only directory (no config.json) is fine here; resolve_source wants a model.
    path, gguf = (str(local), gguf_file) if local.is_dir() else resolve_source(name, gguf_file)
    try:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the user's tokenizer choice
        text = str(exc).strip()
        raise ModelError(f"cannot load the tokenizer: {text.splitlines()[0] if text else type(exc).__name__}",
                         file=name, field="--tokenizer") from exc
    if not getattr(tokenizer, "is_fast", False):
        log.warning("tokenizer %s is not a fast tokenizer; counting tokens will be slow", name)
    return tokenizer, {"id": name, "path": path, "gguf_file": gguf}


def token_counter(name: str | None,
                  gguf_file: str | None = None) -> tuple[Callable[[Sequence[str]], np.ndarray], dict]:
    """``(count(texts) -> int64[n], info)`` for ``--tokenizer`` ``name`` (§3.3)."""
    if name is None:
        raise MmkitError("the length metric needs a tokenizer: --tokenizer ID|DIR|bundled:smollm2|whitespace",
                         field="--tokenizer")
    if name in TOKENIZERS:
        return TOKENIZERS.resolve(name)(gguf_file)
    tokenizer, info = load_tokenizer(name, gguf_file)
    return (lambda texts: count_tokens(tokenizer, texts)), info


def record_lengths(records: InstructionRecords, count: Callable[[Sequence[str]], np.ndarray],
                   side: str = "response") -> np.ndarray:
    """Per-record token counts of one side, summed over turns (int64[N])."""
    texts, owner = records.turn_texts(side)
    return np.bincount(owner, weights=count(texts), minlength=len(records)).round().astype(np.int64)


def quantile_buckets(lengths: np.ndarray, k: int) -> np.ndarray:
    """Mid-rank buckets: r_i = #{L_j < L_i} + (#{L_j = L_i} - 1)/2, bucket = min(k-1, floor(k r_i / N)).

    Exact integer arithmetic (2 r_i is an integer), so ties never split.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    _, inverse, counts = np.unique(lengths, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    twice_rank = 2 * below[inverse] + counts[inverse] - 1
    return np.minimum(k - 1, (k * twice_rank) // (2 * n)).astype(np.int64)


def edge_buckets(lengths: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """bucket = #{edges <= L}: intervals closed on the left, (-inf, e0), [e0, e1), ..."""
    edges_arr = np.asarray(edges, dtype=np.float64)
    if edges_arr.ndim != 1 or len(edges_arr) == 0 or np.any(np.diff(edges_arr) <= 0):
        raise MmkitError(f"must be a strictly increasing list of numbers, got {list(edges)}", field="--length-edges")
    return np.searchsorted(edges_arr, lengths, side="right").astype(np.int64)


def length_groups(lengths: np.ndarray, buckets: np.ndarray) -> tuple[np.ndarray, list[str], list[list[int]]]:
    """Remove empty buckets, renumber in ascending length order; names ``len[min-max]`` and ranges."""
    _, labels = np.unique(buckets, return_inverse=True)
    labels = labels.astype(np.int64).reshape(-1)
    k_eff = int(labels.max()) + 1
    lo = np.full(k_eff, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(k_eff, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, labels, lengths)
    np.maximum.at(hi, labels, lengths)
    ranges = [[int(a), int(b)] for a, b in zip(lo, hi)]
    return labels, [f"len[{a}-{b}]" for a, b in ranges], ranges


@METRICS.register("length")
def length_metric(records: InstructionRecords, options: MetricOptions) -> MetricResult:
    """Token-count buckets of the response (or prompt, or both): mid-rank quantiles or fixed edges."""
    count, tokenizer_info = token_counter(options.tokenizer, options.gguf_file)
    t0 = time.perf_counter()
    lengths = record_lengths(records, count, options.length_of)
    t1 = time.perf_counter()
    if options.length_edges is not None:
        if options.k is not None:
            log.info("--length-edges overrides --k %d", options.k)
        k = len(options.length_edges) + 1
        buckets = edge_buckets(lengths, options.length_edges)
    else:
        k = DEFAULT_K["length"] if options.k is None else options.k
        if k < 1:
            raise MmkitError(f"must be at least 1, got {k}", field="--k")
        buckets = quantile_buckets(lengths, k)
    labels, names, ranges = length_groups(lengths, buckets)
    if len(names) < k:
        log.warning("length buckets: %d of %d are non-empty (ties or few distinct lengths); %d groups remain",
                    len(names), k, len(names))
    return MetricResult(labels, names, None, {
        "k_requested": k, "lengths": lengths, "ranges": ranges, "length_of": options.length_of,
        "mode": "edges" if options.length_edges is not None else "quantile",
        "edges": None if options.length_edges is None else list(options.length_edges),
        "tokenizer": tokenizer_info, "timings": {"tokenize": t1 - t0}})
