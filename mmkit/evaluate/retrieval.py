"""``mmkit evaluate retrieval``: image-text retrieval Recall@K / RSUM / MedR / MeanR (evaluate.md §6).

``load`` reads an image-caption set (:mod:`mmkit.core.imagetext`) or precomputed embeddings /
scores (``--embeddings``, the safetensors format of evaluate.md §2.3); ``score`` encodes with a
dual encoder through :mod:`mmkit.core.embed` (cached), optionally re-ranks each query's
shortlist with an ITM model (:mod:`mmkit.core.itm`), and ranks in memory-bounded blocks with
:mod:`mmkit.core.ranking` under the ``full`` / COCO ``1k`` protocols. :func:`run` writes the run
folder; several ``--model`` get one sub-folder each and an ``aggregate`` block.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

from mmkit.config import config_dict
from mmkit.errors import ConfigError, MmkitError
from mmkit.evaluate.aggregate import aggregate, metric_means, model_slug, run_entry
from mmkit.io import RunDir, default_out, fingerprint, start_run, write_jsonl, write_results

log = logging.getLogger("mmkit")

COMMAND = "evaluate retrieval"
BENCHMARK_VERSION = "1"
DEFAULT_CAPTIONS = {"flickr30k": 5, "coco": 5, "custom": "all"}


@dataclass
class RetrievalConfig:
    """Options of ``mmkit evaluate retrieval`` (docs/evaluate.md lists each one)."""

    model: list[str] = field(default_factory=list)
    ensemble: list[str] = field(default_factory=list)
    data: Optional[str] = None
    image_root: Optional[str] = None
    dataset: Literal["flickr30k", "coco", "custom"] = "custom"
    split: str = "test"
    protocol: Literal["auto", "full", "5k", "1k"] = "auto"
    captions_per_image: Union[int, str] = "auto"
    image_field: str = "image"
    captions_field: str = "captions"
    group_field: str = "group"
    embeddings: Optional[str] = None
    rerank_model: Optional[str] = None
    rerank_k: Union[int, str] = 128
    itm_score: Literal["logit", "prob"] = "logit"  # BLIP: the match logit (BLIP's own evaluation) or its softmax
    recall_k: list[int] = field(default_factory=list)
    fold_size: int = 1000
    sim_chunk_mb: float = 256.0
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    no_cache: bool = False
    save_topk: int = 0
    seed: int = 0

    def validate(self) -> None:
        if self.embeddings and self.data:
            raise ConfigError("--embeddings and --data exclude each other: the file holds the scores "
                              "and text_to_image", field="--embeddings")
        if self.embeddings and (self.model or self.ensemble):
            raise ConfigError("--embeddings replaces --model/--ensemble; give one or the other", field="--embeddings")
        if not self.embeddings and not self.data:
            raise ConfigError("give --data (with --model) or --embeddings", field="--data")
        if self.data and not self.model:
            raise ConfigError("--data needs a dual-encoder --model", field="--model")
        if len(self.model) > 1 and self.ensemble:
            raise ConfigError("--ensemble combines models into one; with several --model give one run each",
                              field="--ensemble")
        if self.rerank_model and self.embeddings:
            raise ConfigError("--rerank-model needs the images and captions of --data", field="--rerank-model")
        _positive_or_all(self.rerank_k, "--rerank-k")
        if self.captions_per_image != "auto":
            _positive_or_all(self.captions_per_image, "--captions-per-image")
        for name, value, low in (("--sim-chunk-mb", self.sim_chunk_mb, 1e-9), ("--batch-size", self.batch_size, 1),
                                 ("fold_size", self.fold_size, 1), ("--save-topk", self.save_topk, 0),
                                 *(("--recall-k", k, 1) for k in self.recall_k)):
            if value < low:
                raise ConfigError(f"expected a value >= {low:g}, got {value}", field=name)

    @property
    def ks(self) -> list[int]:
        """R@1/5/10 plus ``--recall-k`` values, ascending."""
        return sorted({1, 5, 10, *self.recall_k})

    @property
    def resolved_protocol(self) -> str:
        """``auto``: both COCO protocols for ``coco``, a full ranking otherwise; ``5k`` is ``full``."""
        if self.protocol == "auto":
            return "both" if self.dataset == "coco" else "full"
        return "full" if self.protocol == "5k" else self.protocol

    @property
    def budget_bytes(self) -> int:
        return max(int(self.sim_chunk_mb * 2**20), 1)


def _positive_or_all(value: int | str, name: str) -> None:
    if value == "all" or (isinstance(value, int) and value >= 1):
        return
    raise ConfigError(f"expected a positive integer or 'all', got {value!r}", field=name)


# --------------------------------------------------------------------------- load


@dataclass
class Precomputed:
    """Scores read from ``--embeddings``: embeddings or a ``sims`` matrix, plus relevance."""

    scores: Any            # mmkit.core.ranking.Scores
    relevance: Any         # mmkit.core.ranking.Relevance
    data: dict[str, Any]
    kind: str              # "embeddings" | "sims"


def load_embeddings(path: str, device: str = "cpu") -> Precomputed:
    """Read the evaluate.md §2.3 safetensors file; every mistake is one line naming the file and tensor."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mmkit.core.ranking import EmbeddingScores, MatrixScores, Relevance

    if not Path(path).expanduser().is_file():
        raise MmkitError("no such file", file=path, field="--embeddings")
    try:
        t = load_file(str(Path(path).expanduser()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MmkitError(f"not a readable safetensors file ({str(exc).splitlines()[0]})", file=path,
                         field="--embeddings") from None
    emb = [k for k in ("image_embeds", "text_embeds") if k in t]
    if emb and "sims" in t:
        raise MmkitError("holds both embeddings and sims; expected one of them", file=path, field="sims")
    if not emb and "sims" not in t:
        raise MmkitError(f"expected image_embeds + text_embeds, or sims; found {', '.join(t) or 'no tensors'}",
                         file=path, field="--embeddings")
    if len(emb) == 1:
        missing = ({"image_embeds", "text_embeds"} - set(emb)).pop()
        raise MmkitError(f"missing (it comes with {emb[0]})", file=path, field=missing)
    for name in [*emb, "sims"] if "sims" in t else emb:
        x = t[name]
        if x.ndim != 2 or not x.is_floating_point():
            raise MmkitError(f"expected a 2-D float tensor, got {str(x.dtype).removeprefix('torch.')} "
                             f"of shape {list(x.shape)}", file=path, field=name)
        if not bool(torch.isfinite(x).all()):
            raise MmkitError("holds NaN or infinite values", file=path, field=name)
    if emb:
        img, txt = t["image_embeds"], t["text_embeds"]
        if img.shape[1] != txt.shape[1]:
            raise MmkitError(f"has width {txt.shape[1]}, image_embeds width {img.shape[1]}; expected the same "
                             "width", file=path, field="text_embeds")
        n_i, n_t = img.shape[0], txt.shape[0]
    else:
        n_i, n_t = t["sims"].shape
    if "text_to_image" not in t:
        raise MmkitError("missing: the image of each caption (int64 [N_t])", file=path, field="text_to_image")
    t2i = t["text_to_image"]
    if t2i.ndim != 1 or len(t2i) != n_t:
        raise MmkitError(f"has shape {list(t2i.shape)}, expected [{n_t}] (one entry per caption)", file=path,
                         field="text_to_image")
    rel = Relevance.build(t2i, n_i, t.get("image_group"), t.get("text_group"), source=path)
    if emb:
        scores = EmbeddingScores(t["image_embeds"], t["text_embeds"], device=device)
    else:
        scores = MatrixScores(t["sims"].float(), device=device)
    data = {**fingerprint(path, n_i), "n_captions": n_t}
    return Precomputed(scores, rel, data, "embeddings" if emb else "sims")


def load_data(cfg: RetrievalConfig):
    """The image-caption set of ``--data`` (:class:`~mmkit.core.imagetext.ImageTextSet`)."""
    from mmkit.core.imagetext import load_image_text

    keep = DEFAULT_CAPTIONS[cfg.dataset] if cfg.captions_per_image == "auto" else cfg.captions_per_image
    return load_image_text(cfg.data, image_root=cfg.image_root, split=cfg.split, captions_per_image=keep,
                           fields={"image": cfg.image_field, "captions": cfg.captions_field,
                                   "group": cfg.group_field}, revision=cfg.revision)


# --------------------------------------------------------------------------- ITM pairs


class ItmPairScorer:
    """``itm_score_fn(image_idx, text_idx)`` for :func:`mmkit.core.ranking.rerank` on an image-caption set.

    Captions are tokenised once; images are loaded, preprocessed and encoded (the ITM model's
    frozen unimodal part) once each when pairs arrive sorted by image, as ``rerank`` sends them:
    encodings of images below the current batch's smallest index are dropped. Each batch of
    pairs is fused in one forward pass.
    """

    def __init__(self, scorer: Any, images: list[Any], captions: list[str], *, image_batch: int = 16,
                 max_length: int | None = None) -> None:
        from mmkit.core.data import tokenize_flat

        self.scorer, self.images, self.image_batch = scorer, images, image_batch
        self.tokens = tokenize_flat(scorer.tokenizer, captions, max_length=max_length)
        self.pad_id = getattr(scorer.tokenizer, "pad_token_id", None) or 0
        self.cache: dict[int, Any] = {}

    def _encode_images(self, wanted: list[int]) -> None:
        """Encode ``wanted`` plus the next uncached images, ``image_batch`` at a time."""
        from mmkit.core.data import load_image

        missing = [i for i in wanted if i not in self.cache]
        if not missing:
            return
        ahead = [i for i in range(missing[-1] + 1, len(self.images)) if i not in self.cache]
        todo = (missing + ahead[:max(self.image_batch - len(missing), 0)])
        for a in range(0, len(todo), self.image_batch):
            chunk = todo[a:a + self.image_batch]
            inputs = self.scorer.preprocess([load_image(self.images[i]) for i in chunk])
            enc = self.scorer.encode_image(**{k: v.to(self.scorer.device) for k, v in inputs.items()})
            for j, i in enumerate(chunk):
                self.cache[i] = enc[j:j + 1]

    def __call__(self, image_idx, text_idx):
        import torch

        from mmkit.core.data import pad_flat
        from mmkit.core.itm import Encoded

        with torch.inference_mode():
            images = sorted(set(image_idx.tolist()))
            for i in [i for i in self.cache if i < images[0]]:
                del self.cache[i]
            self._encode_images(images)
            img = Encoded.cat([self.cache[i] for i in images])
            pos = torch.searchsorted(torch.tensor(images), image_idx)
            texts, tpos = torch.unique(text_idx, return_inverse=True)
            ids, mask = pad_flat(self.tokens, texts.numpy(), self.pad_id)
            txt = self.scorer.encode_text(ids.to(self.scorer.device), mask.to(self.scorer.device))
            return self.scorer.fused_scores(img[pos.to(img.feats.device)], txt[tpos.to(txt.feats.device)]).float().cpu()


# --------------------------------------------------------------------------- score


@dataclass
class Scored:
    """What :meth:`RetrievalBenchmark.score` returns: metrics and what produced them."""

    metrics: dict[str, Any]
    models: dict[str, dict[str, Any]]
    scores: Any
    relevance: Any
    warnings: list[str]
    rerank: dict[str, Any] | None


class RetrievalBenchmark:
    """Image-text retrieval: embedding-based, so only the ``load`` and ``score`` hooks."""

    name = "retrieval"
    version = BENCHMARK_VERSION
    needs = "embed"

    def load(self, cfg: RetrievalConfig):
        """An :class:`~mmkit.core.imagetext.ImageTextSet` (``--data``) or :class:`Precomputed` (``--embeddings``)."""
        from mmkit.core.models import resolve_device

        if cfg.embeddings:
            return load_embeddings(cfg.embeddings, resolve_device(cfg.device))
        return load_data(cfg)

    def score(self, data: Any, cfg: RetrievalConfig) -> Scored:
        """Encode (or take the given scores), optionally re-rank, and rank under the protocol."""
        from mmkit.core import ranking

        warnings: list[str] = []
        models: dict[str, dict[str, Any]] = {}
        if isinstance(data, Precomputed):
            scores, relevance = data.scores, data.relevance
        else:
            relevance = data.relevance()
            parts = [self._encode(data, mid, cfg, models, warnings) for mid in [*cfg.model, *cfg.ensemble]]
            scores = parts[0] if len(parts) == 1 else ranking.MeanScores(parts)
        protocol, ks = cfg.resolved_protocol, cfg.ks
        ranking.check_ks(ks, relevance, protocol, cfg.fold_size)
        common = dict(protocol=protocol, ks=ks, fold_size=cfg.fold_size, budget_bytes=cfg.budget_bytes)
        rerank = None
        if cfg.rerank_model:
            score_fn, record = self._itm(data, cfg)
            models["rerank"] = record
            rerank = {"shortlist": [*cfg.model, *cfg.ensemble], "reranker": cfg.rerank_model, "k": cfg.rerank_k}
            metrics = ranking.rerank_metrics(scores, score_fn, relevance, k=cfg.rerank_k,
                                             batch_size=cfg.batch_size, **common)
        else:
            metrics = ranking.retrieval_metrics(scores, relevance, **common)
        return Scored(metrics, models, scores, relevance, warnings, rerank)

    @staticmethod
    def _encode(data, model_id: str, cfg: RetrievalConfig, models: dict, warnings: list[str]):
        from mmkit.core.embed import encode_images, encode_texts
        from mmkit.core.models import load_model
        from mmkit.core.ranking import EmbeddingScores
        from mmkit.evaluate import check_capability

        lm = load_model(model_id, "dual-encoder", device=cfg.device, dtype=cfg.dtype, revision=cfg.revision)
        check_capability(BENCHMARK, model_id, lm.model.config)
        opts = dict(loaded=lm, batch_size=cfg.batch_size, use_cache=not cfg.no_cache, cache_dir=cfg.cache_dir,
                    return_info=True)
        img, img_info = encode_images(data.images, **opts)
        txt, txt_info = encode_texts(data.captions, **opts)
        if txt_info.n_at_max_length:
            msg = (f"{model_id}: {txt_info.n_at_max_length} of {len(data.captions)} captions reached the "
                   f"max length {txt_info.max_length} tokens (truncated or exactly that long)")
            warnings.append(msg)
            log.warning(msg)
        name = "model" if not models else f"ensemble_{len(models)}"
        models[name] = {**lm.record(), "backend": "hf", "class": type(lm.model).__name__,
                        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                        "cache_hit": {"images": img_info.cache_hit, "texts": txt_info.cache_hit}}
        return EmbeddingScores(img, txt, device=str(next(lm.model.parameters()).device), normalize=False)

    @staticmethod
    def _itm(data, cfg: RetrievalConfig):
        from mmkit.core.embed import resolve_max_length
        from mmkit.core.itm import itm_scorer
        from mmkit.core.models import load_model

        lm = load_model(cfg.rerank_model, "itm", device=cfg.device, dtype=cfg.dtype)
        lm.model.eval()
        scorer = itm_scorer(lm.model, lm.preprocessor, score=cfg.itm_score)
        length = resolve_max_length(lm.path, lm.model.config, scorer.tokenizer, None)
        fn = ItmPairScorer(scorer, data.images, data.captions, image_batch=cfg.batch_size, max_length=length)
        return fn, {**lm.record(), "backend": "hf", "class": type(lm.model).__name__,
                    "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch.")}


BENCHMARK = RetrievalBenchmark()


# --------------------------------------------------------------------------- run


def run(cfg: RetrievalConfig, out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate and write the run folder(s); returns ``results.json`` (the aggregate for several models)."""
    out = out if out is not None else default_out("evaluate-retrieval")
    if len(cfg.model) > 1:
        return _run_many(cfg, out, overwrite)
    run_dir = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with run_dir.guard():
        return _run_one(cfg, run_dir)


def _run_one(cfg: RetrievalConfig, run_dir: RunDir) -> dict[str, Any]:
    from mmkit.core.seeding import seed_everything

    seed_everything(cfg.seed)
    data = BENCHMARK.load(cfg)
    scored = BENCHMARK.score(data, cfg)
    if cfg.save_topk:
        _save_topk(run_dir / "predictions.jsonl", scored, cfg)
    rel = scored.relevance
    data_entry = data.data
    extra: dict[str, Any] = {}
    if scored.rerank:
        extra["rerank"] = scored.rerank
    log.info("retrieval on %d images x %d captions: RSUM %s", rel.n_images, rel.n_texts,
             "n/a" if scored.metrics.get("rsum") is None else f"{scored.metrics['rsum']:.2f}")
    return write_results(
        run_dir, method="retrieval", config=config_dict(cfg), metrics=scored.metrics, seed=cfg.seed,
        models=scored.models, data=data_entry, benchmark_version=BENCHMARK_VERSION, complete=True,
        protocol=cfg.resolved_protocol, dataset=cfg.dataset,
        counts={"images": rel.n_images, "captions": rel.n_texts, "records": rel.n_images},
        environment=_environment(scored.scores), anomalies=[], warnings=scored.warnings, **extra,
        out=str(run_dir.path))


def _save_topk(path: Path, scored: Scored, cfg: RetrievalConfig) -> None:
    """``predictions.jsonl``: per query its top-K gallery ids (best first) and 1-based best rank,
    from the dual-encoder (or given) scores over the whole set (inspection only)."""
    from mmkit.core.ranking import DIRECTIONS, best_ranks, top_k

    def lines():
        for d in DIRECTIONS:
            n_g = scored.scores.sizes(d)[1]
            top = top_k(scored.scores, d, min(cfg.save_topk, n_g), budget_bytes=cfg.budget_bytes)
            ranks = best_ranks(scored.scores, scored.relevance, d, budget_bytes=cfg.budget_bytes)
            for q, (ids, rank) in enumerate(zip(top.tolist(), ranks.tolist())):
                yield {"uid": f"{d}/{q}", "direction": d, "topk": ids, "rank": rank + 1}

    write_jsonl(path, lines())


def _environment(scores: Any) -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(scores.device)}


def _run_many(cfg: RetrievalConfig, out: str, overwrite: bool) -> dict[str, Any]:
    slugs = [model_slug(m) for m in cfg.model]
    if len(set(slugs)) != len(slugs):
        dup = next(m for m, s in zip(cfg.model, slugs) if slugs.count(s) > 1)
        raise ConfigError(f"{dup!r} is given twice (or maps to the same folder as another)", field="--model")
    top = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with top.guard():
        per_model = []
        for model_id, slug in zip(cfg.model, slugs):
            sub = start_run(top / slug, COMMAND, replace(cfg, model=[model_id]), overwrite=overwrite)
            per_model.append((slug, _run_one(replace(cfg, model=[model_id]), sub)))
        top.attach_log()
        stats = aggregate([r["metrics"] for _, r in per_model])
        first = per_model[0][1]
        return write_results(
            top, method="retrieval", config=config_dict(cfg), seed=cfg.seed,
            metrics=metric_means(stats), models={slug: r["models"]["model"] for slug, r in per_model},
            data=first["data"], benchmark_version=BENCHMARK_VERSION, complete=True,
            protocol=cfg.resolved_protocol, dataset=cfg.dataset, counts=first["counts"],
            aggregate=stats, runs=[run_entry(r, slug) for slug, r in per_model],
            environment=first["environment"], anomalies=[], warnings=[w for _, r in per_model for w in r["warnings"]],
            out=str(top.path))
