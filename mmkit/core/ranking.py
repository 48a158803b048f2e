"""Image-text retrieval ranking in memory-bounded blocks, and ITM re-ranking of a shortlist.

Shared by ``mmkit evaluate retrieval`` and ``mmkit distill dcd`` (evaluate.md §6, distill.md §3.7).

**Best rank** (evaluate.md §6, "Ranking without the full matrix"). For a query with scores s over
the gallery and relevant set R, let m = max_{j in R} s_j and p* the lowest index in R with
s_{p*} = m. The 0-based best rank is #{j not in R: s_j > m} + #{j not in R: s_j = m, j < p*}:
ties go by gallery index, without sorting, and the result equals the minimum of the per-item
ranks over R. Queries run in row blocks of floor(budget / (4 N_gallery)); when one row exceeds
the budget, the gallery is split into column blocks too, m and p* come from a first pass over
the blocks and the (additive) counts from a second. No score block is larger than the budget.

**Metrics.** Recall@K = 100 x hits / queries (a hit: best rank < K), RSUM = the sum of R@{1,5,10}
in both directions, MedR = floor(median of 1-based ranks), MeanR = their mean. Protocols: ``full``
(one ranking), ``1k`` (consecutive folds of ``fold_size`` images with their captions, every
metric the mean over folds, per-fold blocks in ``folds``) and ``both`` (flat keys from ``full``,
the ``1k`` figures in a ``coco_1k`` block).

**Re-ranking** (:func:`rerank`). Per query the top K gallery items of the shortlist scores
(ties by gallery index) take their order from an ITM model's scores (ties by gallery index), and
the rest keep their shortlist order below them: a relevant item outside the top K ranks at its
shortlist position. ``k="all"`` scores every pair.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from mmkit.errors import MmkitError

log = logging.getLogger("mmkit")

Direction = Literal["i2t", "t2i"]
DIRECTIONS: tuple[Direction, Direction] = ("i2t", "t2i")
DEFAULT_KS = (1, 5, 10)
RSUM_KS = (1, 5, 10)
DEFAULT_BUDGET_BYTES = 256 * 2**20
DEFAULT_FOLD_SIZE = 1000
DEFAULT_RERANK_K = 128
ELEMENT_BYTES = 4  # scores are float32

#: ``itm_score_fn(image_idx, text_idx) -> scores``: one ITM score per (image, text) pair.
ItmScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- relevance


@dataclass(frozen=True)
class Relevance:
    """Which captions are relevant to which images.

    ``text_to_image`` (int64 [N_t]) gives each caption's image; with ``image_group`` [N_i] and
    ``text_group`` [N_t], a caption is instead relevant to every image of its group.
    """

    text_to_image: torch.Tensor
    n_images: int
    image_group: torch.Tensor | None = None
    text_group: torch.Tensor | None = None

    @classmethod
    def build(cls, text_to_image, n_images: int, image_group=None, text_group=None,
              source: str | None = None) -> "Relevance":
        """Check shapes and ranges (one-line :class:`MmkitError` naming ``source`` and the field)."""
        t2i = _int_vector(text_to_image, "text_to_image", source)
        if len(t2i) and (int(t2i.min()) < 0 or int(t2i.max()) >= n_images):
            bad = int(torch.nonzero((t2i < 0) | (t2i >= n_images))[0])
            raise MmkitError(f"entry {bad} is {int(t2i[bad])}, expected 0 <= value < {n_images} (N_i)",
                             file=source, field="text_to_image")
        if (image_group is None) != (text_group is None):
            raise MmkitError("image_group and text_group go together; give both or neither",
                             file=source, field="image_group" if image_group is None else "text_group")
        groups = None, None
        if image_group is not None:
            groups = _int_vector(image_group, "image_group", source), _int_vector(text_group, "text_group", source)
            for name, g, n in (("image_group", groups[0], n_images), ("text_group", groups[1], len(t2i))):
                if len(g) != n:
                    raise MmkitError(f"has {len(g)} entries, expected {n}", file=source, field=name)
        rel = cls(t2i, int(n_images), *groups)
        for direction in DIRECTIONS:
            query_key, gallery_key = rel.keys(direction)
            lonely = ~torch.isin(query_key, gallery_key)
            if bool(lonely.any()):
                q = int(torch.nonzero(lonely)[0])
                what = "image" if direction == "i2t" else "caption"
                raise MmkitError(f"{what} {q} has no relevant {'caption' if what == 'image' else 'image'} "
                                 f"({int(lonely.sum())} {what}(s) without one)", file=source,
                                 field="text_to_image" if groups[0] is None else "image_group")
        return rel

    @property
    def n_texts(self) -> int:
        return len(self.text_to_image)

    def gallery_size(self, direction: Direction) -> int:
        return self.n_texts if direction == "i2t" else self.n_images

    def keys(self, direction: Direction) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query_key, gallery_key)``: gallery item g is relevant to query q iff the keys are equal."""
        if self.image_group is not None:
            image_key, text_key = self.image_group, self.text_group
        else:
            image_key, text_key = torch.arange(self.n_images), self.text_to_image
        return (image_key, text_key) if direction == "i2t" else (text_key, image_key)

    def subset(self, images: torch.Tensor) -> tuple["Relevance", torch.Tensor]:
        """The relevance among ``images`` (sorted indices) and the captions of those images.

        Returns ``(relevance, texts)`` where ``texts`` are the global caption indices kept.
        """
        images = torch.as_tensor(images, dtype=torch.long)
        local = torch.full((self.n_images,), -1, dtype=torch.long)
        local[images] = torch.arange(len(images))
        texts = torch.nonzero(local[self.text_to_image] >= 0).flatten()
        groups = (None, None) if self.image_group is None else (self.image_group[images], self.text_group[texts])
        return Relevance(local[self.text_to_image[texts]], len(images), *groups), texts


def _int_vector(values, name: str, source: str | None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise MmkitError(f"expected a 1-D integer array, got {str(t.dtype).removeprefix('torch.')} "
                         f"of shape {list(t.shape)}", file=source, field=name)
    return t.to(torch.long)


# --------------------------------------------------------------------------- score sources


class Scores(ABC):
    """Similarity scores of images x captions, produced block by block.

    ``block(direction, rows, cols)`` returns a float32 tensor ``[len(rows), len(cols)]`` of the
    scores of queries ``rows`` against gallery items ``cols`` (``i2t``: image rows, caption
    columns; ``t2i``: the transpose).
    """

    n_images: int
    n_texts: int
    device: torch.device

    @abstractmethod
    def block(self, direction: Direction, rows: slice, cols: slice) -> torch.Tensor:
        """Scores of queries ``rows`` against gallery items ``cols``, float32."""

    @abstractmethod
    def subset(self, images: torch.Tensor, texts: torch.Tensor) -> "Scores":
        """The scores among ``images`` x ``texts`` (global indices), renumbered from 0."""

    def sizes(self, direction: Direction) -> tuple[int, int]:
        """``(n_queries, n_gallery)``."""
        return (self.n_images, self.n_texts) if direction == "i2t" else (self.n_texts, self.n_images)


class EmbeddingScores(Scores):
    """Cosine scores of L2-normalised image and caption embeddings, one ``matmul`` per block.

    ``matmul(a, b)`` (default :func:`torch.matmul`) computes ``a @ b``; tests inject one that
    records block shapes.
    """

    def __init__(self, image_embeds, text_embeds, *, normalize: bool = True,
                 matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
                 device: str | torch.device | None = None) -> None:
        img, txt = torch.as_tensor(image_embeds), torch.as_tensor(text_embeds)
        if img.ndim != 2 or txt.ndim != 2:
            raise MmkitError(f"expected 2-D embeddings, got shapes {list(img.shape)} and {list(txt.shape)}",
                             field="embeddings")
        if img.shape[1] != txt.shape[1]:
            raise MmkitError(f"text_embeds have width {txt.shape[1]}, image_embeds {img.shape[1]}; "
                             "expected the same width", field="text_embeds")
        device = torch.device(device) if device is not None else img.device
        img, txt = img.to(device, torch.float32), txt.to(device, torch.float32)
        if normalize:
            img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
        self.image_embeds, self.text_embeds, self.matmul, self.device = img, txt, matmul, device
        self.n_images, self.n_texts = len(img), len(txt)

    def block(self, direction: Direction, rows: slice, cols: slice) -> torch.Tensor:
        query, gallery = ((self.image_embeds, self.text_embeds) if direction == "i2t"
                          else (self.text_embeds, self.image_embeds))
        return self.matmul(query[rows], gallery[cols].T)

    def subset(self, images: torch.Tensor, texts: torch.Tensor) -> "EmbeddingScores":
        return EmbeddingScores(self.image_embeds[images.to(self.device)], self.text_embeds[texts.to(self.device)],
                               normalize=False, matmul=self.matmul, device=self.device)


class MatrixScores(Scores):
    """A precomputed ``sims`` matrix ``[N_i, N_t]`` (any device); blocks are slices of it."""

    def __init__(self, sims, *, device: str | torch.device | None = None,
                 images: torch.Tensor | None = None, texts: torch.Tensor | None = None) -> None:
        sims = torch.as_tensor(sims)
        if sims.ndim != 2:
            raise MmkitError(f"expected a 2-D [N_i, N_t] matrix, got shape {list(sims.shape)}", field="sims")
        self.sims, self.images, self.texts = sims, images, texts
        self.device = torch.device(device) if device is not None else sims.device
        self.n_images = len(images) if images is not None else sims.shape[0]
        self.n_texts = len(texts) if texts is not None else sims.shape[1]

    def block(self, direction: Direction, rows: slice, cols: slice) -> torch.Tensor:
        img, txt = (rows, cols) if direction == "i2t" else (cols, rows)
        if self.images is not None:  # a fold: gather exactly the block, never a whole row
            out = self.sims[self.images[img][:, None], self.texts[txt][None, :]]
        else:
            out = self.sims[img, txt]
        out = out.to(self.device, torch.float32)
        return out if direction == "i2t" else out.T

    def subset(self, images: torch.Tensor, texts: torch.Tensor) -> "MatrixScores":
        if self.images is not None:
            images, texts = self.images[images], self.texts[texts]
        return MatrixScores(self.sims, device=self.device, images=images, texts=texts)


class MeanScores(Scores):
    """An ensemble: per block, the mean of each part's block (each from its own embeddings)."""

    def __init__(self, parts: Sequence[Scores]) -> None:
        if not parts or len({(p.n_images, p.n_texts) for p in parts}) != 1:
            raise MmkitError("ensemble members must score the same images and captions", field="--ensemble")
        self.parts = list(parts)
        self.n_images, self.n_texts, self.device = parts[0].n_images, parts[0].n_texts, parts[0].device

    def block(self, direction: Direction, rows: slice, cols: slice) -> torch.Tensor:
        out = self.parts[0].block(direction, rows, cols).clone()
        for part in self.parts[1:]:
            out += part.block(direction, rows, cols).to(out.device)
        return out / len(self.parts)

    def subset(self, images: torch.Tensor, texts: torch.Tensor) -> "MeanScores":
        return MeanScores([p.subset(images, texts) for p in self.parts])


def as_scores(scores: Scores | torch.Tensor | np.ndarray) -> Scores:
    """A :class:`Scores` as is; a ``sims`` array as :class:`MatrixScores`."""
    return scores if isinstance(scores, Scores) else MatrixScores(scores)


# --------------------------------------------------------------------------- blocks


def _blocks(n_queries: int, n_gallery: int, budget_bytes: int) -> tuple[list[slice], list[slice]]:
    """Row slices of floor(budget / (4 N_gallery)) queries; when one row exceeds the budget,
    single rows with column slices of floor(budget / 4) gallery items."""
    elems = max(int(budget_bytes) // ELEMENT_BYTES, 1)
    rows_per = elems // max(n_gallery, 1)
    cols_per = n_gallery if rows_per >= 1 else elems
    rows_per = max(rows_per, 1)
    rows = [slice(a, min(a + rows_per, n_queries)) for a in range(0, n_queries, rows_per)]
    cols = [slice(a, min(a + cols_per, n_gallery)) for a in range(0, n_gallery, cols_per)]
    return rows, cols


def _relevant(query_key: torch.Tensor, gallery_key: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """Bool ``[rows, cols]``: gallery item relevant to query."""
    return query_key[rows][:, None] == gallery_key[cols][None, :]


def _max_first(s: torch.Tensor, rel: torch.Tensor, offset: int, n_gallery: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, m = the best relevant score and p* = the lowest gallery index reaching it
    (``n_gallery`` and -inf for rows without a relevant item in this block)."""
    m = s.masked_fill(~rel, -math.inf).amax(1)
    hit = rel & (s == m[:, None])
    p = torch.where(hit.any(1), hit.to(torch.uint8).argmax(1) + offset, n_gallery)
    return m, p


def _count_above(s: torch.Tensor, rel: torch.Tensor, m: torch.Tensor, p: torch.Tensor, offset: int) -> torch.Tensor:
    """Per row, non-relevant items scoring above m, or exactly m at a gallery index below p*."""
    index = torch.arange(offset, offset + s.shape[1], device=s.device)
    ahead = (s > m[:, None]) | ((s == m[:, None]) & (index[None, :] < p[:, None]))
    return (ahead & ~rel).sum(1)


def best_rank_dense(s: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """0-based best ranks of a dense score block ``[Q, G]`` with relevance mask ``rel`` (the §6 rule)."""
    m, p = _max_first(s, rel, 0, s.shape[1])
    return _count_above(s, rel, m, p, 0)


def best_ranks(scores: Scores | torch.Tensor, relevance: Relevance, direction: Direction, *,
               budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """0-based best rank of every query (int64 [N_queries], on CPU), in memory-bounded blocks."""
    scores = as_scores(scores)
    n_q, n_g = scores.sizes(direction)
    query_key, gallery_key = (k.to(scores.device) for k in relevance.keys(direction))
    row_blocks, col_blocks = _blocks(n_q, n_g, budget_bytes)
    out = torch.empty(n_q, dtype=torch.long)
    for rows in row_blocks:
        if len(col_blocks) == 1:
            s = scores.block(direction, rows, col_blocks[0])
            out[rows] = best_rank_dense(s, _relevant(query_key, gallery_key, rows, col_blocks[0])).cpu()
            continue
        m = torch.full((rows.stop - rows.start,), -math.inf, device=scores.device)
        p = torch.full_like(m, n_g, dtype=torch.long)
        for cols in col_blocks:  # pass 1: m and p* (earlier blocks win ties: lower indices)
            bm, bp = _max_first(scores.block(direction, rows, cols),
                                _relevant(query_key, gallery_key, rows, cols), cols.start, n_g)
            better = bm > m
            m, p = torch.where(better, bm, m), torch.where(better, bp, p)
        count = torch.zeros_like(p)
        for cols in col_blocks:  # pass 2: the additive counts
            count += _count_above(scores.block(direction, rows, cols),
                                  _relevant(query_key, gallery_key, rows, cols), m, p, cols.start)
        out[rows] = count.cpu()
    return out


def top_k(scores: Scores | torch.Tensor, direction: Direction, k: int, *,
          budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """Gallery indices of every query's top ``k`` (int64 [N_queries, k], on CPU), best first,
    ties by gallery index: exactly the items whose per-item rank is below ``k``."""
    scores = as_scores(scores)
    n_q, n_g = scores.sizes(direction)
    if not 1 <= k <= n_g:
        raise MmkitError(f"k = {k} is outside 1..{n_g} (the gallery size)", field="k")
    elems = max(int(budget_bytes) // ELEMENT_BYTES, 1)
    rows_per = max(elems // max(n_g, 1), 1)  # top-k needs whole rows; one row at a time at the least
    out = torch.empty((n_q, k), dtype=torch.long)
    full = slice(0, n_g)
    for a in range(0, n_q, rows_per):
        rows = slice(a, min(a + rows_per, n_q))
        s = scores.block(direction, rows, full)
        kth = s.topk(k, dim=1).values[:, -1:]
        above = s > kth
        need = k - above.sum(1, keepdim=True)
        ties = (s == kth) & (torch.cumsum((s == kth).to(torch.int32), 1, dtype=torch.int32) <= need)
        idx = torch.nonzero(above | ties)[:, 1].view(-1, k)  # row-major: ascending gallery index
        order = torch.sort(s.gather(1, idx), dim=1, descending=True, stable=True).indices
        out[rows] = idx.gather(1, order).cpu()
    return out


# --------------------------------------------------------------------------- metrics


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Recall@K in percent: 100 x share of queries whose 0-based best rank is below K."""
    return 100.0 * float((ranks < k).double().mean())


def median_rank(ranks: torch.Tensor) -> int:
    """MedR: floor of the median of the 1-based ranks (the mean of the two middle ones when even)."""
    return int(math.floor(float(np.median(ranks.numpy() + 1))))


def mean_rank(ranks: torch.Tensor) -> float:
    """MeanR: the mean of the 1-based ranks."""
    return float((ranks.double() + 1).mean())


def rsum(metrics: dict[str, float]) -> float | None:
    """RSUM = i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10 (None when a recall is missing)."""
    keys = [f"{d}_r{k}" for d in DIRECTIONS for k in RSUM_KS]
    if any(metrics.get(key) is None for key in keys):
        return None
    return float(sum(metrics[key] for key in keys))


def summarize(i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float | None]:
    """The §6 metrics of best ranks: ``i2t_r{K}``, ``t2i_r{K}``, ``rsum``, ``*_medr``, ``*_meanr``."""
    out: dict[str, float | None] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = recall_at_k(ranks, k)
    out["rsum"] = rsum(out)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = median_rank(ranks)
        out[f"{name}_meanr"] = mean_rank(ranks)
    return out


def mean_metrics(blocks: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Key-wise mean of metric blocks (None when a block has None); RSUM stays the sum of the
    averaged recalls, which equals the mean of the fold RSUMs."""
    out = {key: (None if any(b[key] is None for b in blocks) else float(np.mean([b[key] for b in blocks])))
           for key in blocks[0]}
    out["rsum"] = rsum(out)
    return out


# --------------------------------------------------------------------------- protocols


#: ``rank_fn(scores, relevance, index) -> (i2t ranks, t2i ranks)``; ``index`` is None for the whole
#: set, else ``(images, texts)``: the global indices a fold's local indices stand for.
RankFn = Callable[[Scores, Relevance, "tuple[torch.Tensor, torch.Tensor] | None"],
                  "tuple[torch.Tensor, torch.Tensor]"]


def folds(n_images: int, fold_size: int = DEFAULT_FOLD_SIZE) -> list[torch.Tensor]:
    """Consecutive folds of ``fold_size`` images (the COCO 1k protocol: 5 folds of 5,000)."""
    if fold_size < 1 or n_images % fold_size:
        raise MmkitError(f"the 1k protocol needs an image count divisible by {fold_size}, got {n_images}",
                         field="--protocol")
    return [torch.arange(a, a + fold_size) for a in range(0, n_images, fold_size)]


def check_ks(ks: Sequence[int], relevance: Relevance, protocol: str, fold_size: int = DEFAULT_FOLD_SIZE) -> None:
    """Every K must be at least 1 and at most the smallest gallery it is used on (the CLI's check;
    the metric functions themselves accept any K, a K at or above the gallery giving 100)."""
    galleries = {"i2t": [relevance.n_texts], "t2i": [relevance.n_images]}
    if protocol in ("1k", "both"):
        for fold in folds(relevance.n_images, fold_size):
            sub, texts = relevance.subset(fold)
            galleries["i2t"].append(len(texts))
            galleries["t2i"].append(sub.n_images)
    smallest = min(min(v) for v in galleries.values())
    bad = [k for k in ks if k < 1 or k > smallest]
    if bad:
        raise MmkitError(f"K = {bad[0]} is larger than the gallery ({smallest} items)" if bad[0] > 0
                         else f"K must be >= 1, got {bad[0]}", field="--recall-k")


def protocol_metrics(rank_fn: RankFn, scores: Scores | torch.Tensor, relevance: Relevance, *,
                     protocol: str = "full", ks: Sequence[int] = DEFAULT_KS,
                     fold_size: int = DEFAULT_FOLD_SIZE) -> dict:
    """Metrics under ``protocol`` (``full``, ``1k`` or ``both``) from the best ranks ``rank_fn`` gives."""
    if protocol not in ("full", "1k", "both"):
        raise MmkitError(f"unknown protocol {protocol!r}; expected full, 1k or both", field="--protocol")
    scores = as_scores(scores)
    out: dict = {}
    if protocol in ("full", "both"):
        out.update(summarize(*rank_fn(scores, relevance, None), ks))
    if protocol in ("1k", "both"):
        per_fold = []
        for fold in folds(relevance.n_images, fold_size):
            sub, texts = relevance.subset(fold)
            per_fold.append(summarize(*rank_fn(scores.subset(fold, texts), sub, (fold, texts)), ks))
        block = {**mean_metrics(per_fold), "folds": per_fold}
        if protocol == "1k":
            out.update(block)
        else:
            out["coco_1k"] = block
    return out


def retrieval_metrics(scores: Scores | torch.Tensor, relevance: Relevance, *, protocol: str = "full",
                      ks: Sequence[int] = DEFAULT_KS, fold_size: int = DEFAULT_FOLD_SIZE,
                      budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict:
    """Recall@K / RSUM / MedR / MeanR of ``scores`` (embeddings or a ``sims`` matrix) under ``protocol``."""
    def rank(scores: Scores, rel: Relevance, index) -> tuple[torch.Tensor, torch.Tensor]:
        return (best_ranks(scores, rel, "i2t", budget_bytes=budget_bytes),
                best_ranks(scores, rel, "t2i", budget_bytes=budget_bytes))

    return protocol_metrics(rank, scores, relevance, protocol=protocol, ks=ks, fold_size=fold_size)


# --------------------------------------------------------------------------- re-ranking


def rerank(shortlist: Scores | torch.Tensor, itm_score_fn: ItmScoreFn, relevance: Relevance,
           k: int | str = DEFAULT_RERANK_K, *, batch_size: int = 256,
           budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ranks ``(i2t, t2i)`` after re-ranking each query's shortlist top ``k`` with ITM scores.

    The top ``k`` of the shortlist (ties by gallery index; ``k`` is capped at the gallery size,
    ``"all"`` means every item) take the ITM order, ties by gallery index; the rest keep their
    shortlist order below them. Each distinct (image, text) pair is scored once, in batches of
    ``batch_size`` pairs sorted by image, through ``itm_score_fn(image_idx, text_idx)``.
    """
    shortlist = as_scores(shortlist)
    n_i, n_t = shortlist.n_images, shortlist.n_texts
    if k == "all":
        log.warning("re-ranking every pair: %d x %d = %d ITM forward passes", n_i, n_t, n_i * n_t)
    elif not isinstance(k, int) or k < 1:
        raise MmkitError(f"expected a positive integer or 'all', got {k!r}", field="--rerank-k")
    cand, pairs = {}, []
    for d in DIRECTIONS:
        n_g = shortlist.sizes(d)[1]
        kk = n_g if k == "all" else min(k, n_g)
        cand[d] = torch.sort(top_k(shortlist, d, kk, budget_bytes=budget_bytes), dim=1).values
        query = torch.arange(len(cand[d]))[:, None].expand_as(cand[d])
        img, txt = (query, cand[d]) if d == "i2t" else (cand[d], query)
        pairs.append((img * n_t + txt).reshape(-1))
    unique, inverse = torch.unique(torch.cat(pairs), return_inverse=True)  # sorted: grouped by image
    itm = torch.empty(len(unique), dtype=torch.float32)
    for a in range(0, len(unique), batch_size):
        key = unique[a:a + batch_size]
        itm[a:a + batch_size] = torch.as_tensor(itm_score_fn(key // n_t, key % n_t)).float().cpu().reshape(-1)
    out, at = [], 0
    for d in DIRECTIONS:
        s = itm[inverse[at:at + cand[d].numel()]].view(cand[d].shape)
        at += cand[d].numel()
        query_key, gallery_key = relevance.keys(d)
        rel = query_key[:, None] == gallery_key[cand[d]]
        ranks = best_rank_dense(s, rel)
        if not bool(rel.any(1).all()):  # a relevant item outside the top k keeps its shortlist rank
            ranks = torch.where(rel.any(1), ranks, best_ranks(shortlist, relevance, d, budget_bytes=budget_bytes))
        out.append(ranks)
    return out[0], out[1]


def rerank_metrics(shortlist: Scores | torch.Tensor, itm_score_fn: ItmScoreFn, relevance: Relevance, *,
                   k: int | str = DEFAULT_RERANK_K, protocol: str = "full", ks: Sequence[int] = DEFAULT_KS,
                   fold_size: int = DEFAULT_FOLD_SIZE, batch_size: int = 256,
                   budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict:
    """:func:`retrieval_metrics` with ITM re-ranking of the shortlist (each 1k fold re-ranked within itself)."""
    def rank(scores: Scores, rel: Relevance, index) -> tuple[torch.Tensor, torch.Tensor]:
        fn = itm_score_fn if index is None else (lambda i, t: itm_score_fn(index[0][i], index[1][t]))
        return rerank(scores, fn, rel, k, batch_size=batch_size, budget_bytes=budget_bytes)

    return protocol_metrics(rank, shortlist, relevance, protocol=protocol, ks=ks, fold_size=fold_size)
