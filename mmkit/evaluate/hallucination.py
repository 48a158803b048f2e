"""``mmkit evaluate chair|pope``: object hallucination (unlearn.md §5.1-5.4; evaluate.md §1.1, §7).

**CHAIR** (Rohrbach et al. 2018, LisaAnne/Hallucination): the model describes each image (the §5.1
instruction, beam search 5, ``max_new_tokens`` 200); object mentions are pulled out of every caption
with the COCO synonym table of :mod:`mmkit.core.objects`; a mention is hallucinated when its
category is not in the image's ground truth (instance annotations ∪ objects of its reference
captions). :func:`chair_scores` gives CHAIR_i / CHAIR_s and the per-caption rows the runner writes
to ``chair_per_caption.jsonl`` (the ``per_sample`` entry of :func:`chair_score`'s result);
:func:`caption_quality` gives word-level corpus BLEU-1/2/4, length and distinct-n (§5.3).

**POPE** (Li et al. 2023, RUCAIBox/POPE): yes/no questions "Is there a {object} in the image?" in
three splits (``random``, ``popular``, ``adversarial``), read from POPE-format files or built from a
ground-truth file (:func:`build_pope`). Answers are parsed by the ``reference`` or ``strict`` rule
(:data:`POPE_PARSERS`); :func:`pope_metrics` gives accuracy, precision, recall, F1 and yes-ratio (yes
is the positive class), per split and as the mean over splits.

All rates are percentages; a zero denominator gives ``None`` with a warning, never 0. The pure
functions (:func:`chair_scores`, :func:`caption_quality`, :func:`pope_metrics`, :func:`build_pope`,
the parsers) take plain Python data so ``unlearn`` can reach them through the evaluate registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Sequence

from mmkit.core.objects import VOCAB, Mention, Vocabulary, word_tokens
from mmkit.core.seeding import stable_rng
from mmkit.errors import ConfigError, DataError, suggest
from mmkit.evaluate.base import EvalConfig, Loaded, Request
from mmkit.io import Record, read_records, sha256_file, write_jsonl

log = logging.getLogger("mmkit")

#: The CHAIR caption instruction (unlearn.md §5.1).
CHAIR_PROMPT = "Please describe the image in great detail. Your response should have at least 100 words."
#: The POPE prompt around each question (LLaVA-1.5 short-answer convention, unlearn.md §5.4).
POPE_TEMPLATE = "{question}\nAnswer the question using a single word or phrase."
POPE_SPLITS = ("random", "popular", "adversarial")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# =========================================================================== shared helpers


def _pct(numerator: float, denominator: float, name: str, warnings: Optional[list[str]]) -> Optional[float]:
    """``100·numerator/denominator``; ``None`` and a warning (appended to ``warnings``, else logged)
    when the denominator is 0 (design.md §2)."""
    if denominator:
        return 100.0 * numerator / denominator
    _warn(f"{name} is undefined (zero denominator); reported as null", warnings)
    return None


def _warn(message: str, warnings: Optional[list[str]]) -> None:
    if warnings is None:
        log.warning("%s", message)
    else:
        warnings.append(message)


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """The mean of the non-null values, ``None`` if there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _files_sha256(files: Sequence[Path]) -> str:
    """The sha256 of one file, or over (name, sha256) of several, in the order given."""
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\x1f{sha256_file(f)}\x1e".encode())
    return h.hexdigest()


def image_id_of(name: str) -> str:
    """The image id a file name implies: the trailing digits of its stem without leading zeros
    (``COCO_val2014_000000123456.jpg`` -> ``123456``), else the stem itself."""
    stem = Path(name).stem
    digits = re.search(r"(\d+)$", stem)
    return str(int(digits.group(1))) if digits else stem


def list_images(root: str | Path) -> list[str]:
    """The images under ``root`` (recursive; ``.jpg .jpeg .png .webp``) as sorted relative paths."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError("no such image folder", file=str(root), field="--images")
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _str_id(rec: Record, name: str) -> str:
    """A record's id field as a string (ints accepted: COCO ids are numbers)."""
    value = rec.require(name, (str, int))
    if isinstance(value, bool):
        raise rec.error(name, f"expected a string or an integer, got {value!r}")
    return str(value)


def _str_list(rec: Record, name: str, nonempty: bool = False) -> list[str]:
    value = rec.require(name, list, nonempty=nonempty)
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise rec.error(f"{name}[{k}]", f"expected a string, got {type(item).__name__}")
    return value


def _read_any_json(path: Path) -> Iterable[Record]:
    """Records of a JSONL file or a JSON array, whatever the suffix (POPE's ``.json`` files are JSONL)."""
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    return read_records(str(path), format="json" if head.startswith("[") else "jsonl")


# =========================================================================== CHAIR maths (§5.2, §5.3)


def clean_caption(text: str) -> str:
    """A generated caption as CHAIR scores it: newlines (with their surrounding blanks) become one
    space, ends stripped (unlearn.md §5.1)."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _first_per_word(mentions: Sequence[Mention]) -> list[Mention]:
    """The first mention of each normalised word, in text order (``--unique-mentions``)."""
    first: dict[str, Mention] = {}
    for m in mentions:
        first.setdefault(m.word, m)
    return list(first.values())


def chair_scores(captions: Mapping[str, str], ground_truth: Mapping[str, Collection[str]], *,
                 vocab: Optional[Vocabulary] = None, unique_mentions: bool = False,
                 warnings: Optional[list[str]] = None) -> dict[str, Any]:
    """CHAIR over ``captions`` (image id -> caption) against ``ground_truth`` (image id -> canonical
    categories), unlearn.md §5.2::

        CHAIR_i = 100 · (# hallucinated mentions) / (# mentions)          over all captions
        CHAIR_s = 100 · (# captions with >= 1 hallucinated mention) / (# captions)

    Every mention counts, repeats included (LisaAnne); ``unique_mentions`` counts each distinct
    normalised word once per caption (the EFUF evaluator). Returns ``chair_i``, ``chair_s``,
    ``n_captions``, ``n_mentions``, ``n_hallucinated``, ``n_empty``, ``per_category`` (category ->
    mentions, hallucinated, chair_i) and ``per_caption`` (the ``chair_per_caption.jsonl`` rows).
    An image id without ground truth is a :class:`DataError`."""
    vocab = vocab or VOCAB
    rows, n_mentions, n_hal, n_hal_caps, n_empty = [], 0, 0, 0, 0
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for image_id, caption in captions.items():
        if image_id not in ground_truth:
            raise DataError(f"no ground truth for image_id {image_id!r} (check --gt / --coco-annotations)",
                            field="image_id")
        gt = ground_truth[image_id]
        mentions = vocab.find(caption)
        if unique_mentions:
            mentions = _first_per_word(mentions)
        flags = [m.canonical not in gt for m in mentions]
        for m, hal in zip(mentions, flags):
            per_cat[m.canonical][0] += 1
            per_cat[m.canonical][1] += hal
        n_mentions += len(mentions)
        n_hal += sum(flags)
        n_hal_caps += any(flags)
        n_empty += not caption.strip()
        rows.append({"image_id": image_id, "caption": caption,
                     "mentions": [{"word": m.word, "category": m.canonical, "hallucinated": hal}
                                  for m, hal in zip(mentions, flags)],
                     "hallucinated": any(flags)})
    return {
        "chair_i": _pct(n_hal, n_mentions, "chair_i (no object mentions)", warnings),
        "chair_s": _pct(n_hal_caps, len(rows), "chair_s (no captions)", warnings),
        "n_captions": len(rows), "n_mentions": n_mentions, "n_hallucinated": n_hal, "n_empty": n_empty,
        "per_category": {c: {"mentions": m, "hallucinated": h, "chair_i": 100.0 * h / m}
                         for c, (m, h) in sorted(per_cat.items())},
        "per_caption": rows,
    }


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                max_order: int = 4) -> float:
    """Corpus BLEU-``max_order`` ×100 (unlearn.md §5.3): clipped n-gram precisions pooled over the
    corpus, uniform weights over orders 1..n, no smoothing, brevity penalty from the reference length
    closest to each hypothesis; texts are compared as the §5.2 step-1 word tokens. Every hypothesis
    needs at least one reference (the number may vary)."""
    import sacrebleu

    def tok(text: str) -> str:
        return " ".join(word_tokens(text))

    width = max(len(refs) for refs in references)
    streams = [[tok(refs[k]) if k < len(refs) else None for refs in references] for k in range(width)]
    bleu = sacrebleu.BLEU(tokenize="none", smooth_method="none", max_ngram_order=max_order)
    return float(bleu.corpus_score([tok(h) for h in hypotheses], streams).score)


def distinct_n(texts: Iterable[str], n: int, warnings: Optional[list[str]] = None) -> Optional[float]:
    """Distinct-n ×100: unique n-grams / total n-grams of each text (§5.2 step-1 tokens), averaged
    over the texts that have at least one n-gram; ``None`` with a warning if none has."""
    ratios = []
    for text in texts:
        tokens = word_tokens(text)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    value = _mean(ratios)
    if value is None:
        _warn(f"distinct{n} is undefined (no caption has {n} words); reported as null", warnings)
    return None if value is None else 100.0 * value


def caption_quality(captions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    warnings: Optional[list[str]] = None) -> dict[str, Optional[float]]:
    """Caption quality (unlearn.md §5.3): ``bleu1``, ``bleu2``, ``bleu4`` (:func:`corpus_bleu` over the
    captions whose image has reference captions), ``mean_words`` (whitespace split), ``mean_chars``,
    ``distinct1``, ``distinct2``."""
    texts = list(captions.values())
    scored = [(c, references[i]) for i, c in captions.items() if references.get(i)]
    if scored:
        hyps, refs = [c for c, _ in scored], [r for _, r in scored]
        bleu = {f"bleu{n}": corpus_bleu(hyps, refs, n) for n in (1, 2, 4)}
    else:
        _warn("no reference captions for the captioned images: BLEU is null", warnings)
        bleu = dict.fromkeys(("bleu1", "bleu2", "bleu4"))
    return {
        **bleu,
        "mean_words": _mean(len(t.split()) for t in texts),
        "mean_chars": _mean(len(t) for t in texts),
        "distinct1": distinct_n(texts, 1, warnings),
        "distinct2": distinct_n(texts, 2, warnings),
    }


# =========================================================================== CHAIR data


@dataclass
class ChairConfig(EvalConfig):
    """``mmkit evaluate chair`` options: the common ones plus ground truth, images and counting."""

    annotations: Optional[str] = None  # COCO instances_*/captions_* JSON file or the folder holding them
    gt: Optional[str] = None  # JSONL {"image_id", "objects", "captions"?} (unlearn.md §6)
    image_root: Optional[str] = None  # the images (--images); relative paths resolve here
    exclude: Optional[str] = None  # samples/responses JSONL: its images are not evaluated
    n: int = 1600
    unique_mentions: bool = False
    vocab: Optional[str] = None  # a synonym table replacing the COCO one
    references: Optional[str] = None  # JSONL {"image_id", "captions"} for BLEU
    save_gt: Optional[str] = None  # write the derived ground truth (JSONL, --gt format)

    def validate(self) -> None:
        if bool(self.annotations) == bool(self.gt):
            raise ConfigError("give exactly one ground truth: --coco-annotations DIR|FILE or --gt FILE",
                              field="--gt")
        if self.n < 1:
            raise ConfigError(f"expected a positive number of images, got {self.n}", field="--n")


@dataclass
class ChairData(Loaded):
    """Loaded CHAIR data: ``records`` are ``{"image_id", "image"}`` dicts (``image`` an absolute path,
    or ``None`` when only the ground truth names the image); ``ground_truth`` maps every known image
    id to its categories; ``references`` to its reference captions."""

    ground_truth: dict[str, frozenset[str]] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    vocab: Vocabulary = VOCAB


def _coco_files(path: Path) -> list[Path]:
    """The COCO annotation files ``--coco-annotations`` names: the file, or every ``instances_*.json``
    and ``captions_*.json`` of the folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or directory", file=str(path), field="--coco-annotations")
    files = sorted([*path.glob("instances_*.json"), *path.glob("captions_*.json")])
    if not files:
        raise DataError("no instances_*.json or captions_*.json in this folder", file=str(path),
                        field="--coco-annotations")
    return files


def _coco_field(ann: Any, k: int, name: str, types: type | tuple[type, ...], path: Path) -> Any:
    if not isinstance(ann, dict) or not isinstance(ann.get(name), types) or isinstance(ann.get(name), bool):
        raise DataError(f"expected an object with {name!r}", file=str(path), line=f"annotations[{k}]", field=name)
    return ann[name]


def read_coco_annotations(files: Sequence[Path], vocab: Vocabulary, anomalies: list[dict[str, Any]]
                          ) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(image id -> categories of its instance annotations, image id -> reference captions) merged
    over COCO-format ``files``; a file with ``categories`` is an instances file, else a captions file.
    Every image a file lists gets an entry (possibly empty). A category name the vocabulary does not
    know is skipped and recorded in ``anomalies``."""
    objects: dict[str, set[str]] = defaultdict(set)
    captions: dict[str, list[str]] = defaultdict(list)
    unknown: Counter[str] = Counter()
    for path in files:
        try:
            coco = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read COCO annotations: {exc}", file=str(path), field="json") from None
        if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list):
            raise DataError("expected a COCO annotation object with an 'annotations' list", file=str(path),
                            field="annotations")
        for img in coco.get("images") or []:
            if isinstance(img, dict) and "id" in img:
                objects.setdefault(str(img["id"]), set())
        if "categories" in coco:
            names = {c.get("id"): c.get("name") for c in coco["categories"] if isinstance(c, dict)}
            for k, ann in enumerate(coco["annotations"]):
                image_id = str(_coco_field(ann, k, "image_id", (int, str), path))
                name = names.get(_coco_field(ann, k, "category_id", (int, str), path))
                if name is None:
                    raise DataError(f"category_id {ann['category_id']!r} is not in 'categories'", file=str(path),
                                    line=f"annotations[{k}]", field="category_id")
                category = vocab.canonical(name)
                if category is None:
                    unknown[name] += 1
                else:
                    objects[image_id].add(category)
        else:
            for k, ann in enumerate(coco["annotations"]):
                image_id = str(_coco_field(ann, k, "image_id", (int, str), path))
                captions[image_id].append(_coco_field(ann, k, "caption", str, path))
    anomalies += [{"kind": "unknown_category", "category": name, "count": count,
                   "message": f"COCO category {name!r} is not in the vocabulary; {count} annotation(s) skipped"}
                  for name, count in unknown.items()]
    return dict(objects), dict(captions)


def read_gt(path: str, vocab: Vocabulary) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The ``--gt`` JSONL (unlearn.md §6): (image id -> objects in file order, image id -> captions).
    Objects must be canonical vocabulary entries; a bad word or a repeated image id is a
    :class:`DataError` naming the line."""
    objects: dict[str, list[str]] = {}
    captions: dict[str, list[str]] = {}
    lines: dict[str, int | str] = {}
    for rec in read_records(path, format="jsonl"):
        image_id = _str_id(rec, "image_id")
        if image_id in objects:
            raise rec.error("image_id", f"image_id {image_id!r} repeats line {lines[image_id]}")
        lines[image_id] = rec.loc
        names = _str_list(rec, "objects")
        for k, name in enumerate(names):
            if name not in vocab.categories:
                canonical = vocab.synonyms.get(name.lower())
                hint = f" (a synonym of {canonical!r}: give the canonical name)" if canonical else suggest(
                    name, vocab.categories)
                raise rec.error(f"objects[{k}]", f"{name!r} is not a canonical vocabulary entry{hint}")
        objects[image_id] = list(dict.fromkeys(names))
        if rec.get("captions") is not None:
            captions[image_id] = _str_list(rec, "captions")
    if not objects:
        raise DataError("no ground-truth records", file=path, field="--gt")
    return objects, captions


def read_references(path: str) -> dict[str, list[str]]:
    """``--references`` JSONL ``{"image_id", "captions": [...]}`` -> image id -> captions."""
    refs: dict[str, list[str]] = {}
    for rec in read_records(path, format="jsonl"):
        refs.setdefault(_str_id(rec, "image_id"), []).extend(_str_list(rec, "captions"))
    return refs


def ground_truth(instance_objects: Mapping[str, Iterable[str]], captions: Mapping[str, Sequence[str]],
                 vocab: Optional[Vocabulary] = None, ids: Optional[Iterable[str]] = None) -> dict[str, frozenset[str]]:
    """Ground truth per image (unlearn.md §5.2): the annotated categories ∪ the categories found by
    the mention pipeline in the image's reference captions; for ``ids`` (default: every image either
    mapping names)."""
    vocab = vocab or VOCAB
    ids = dict.fromkeys([*instance_objects, *captions] if ids is None else ids)
    return {i: frozenset(instance_objects.get(i, ()))
            | {m.canonical for c in captions.get(i, ()) for m in vocab.find(c)} for i in ids}


def _excluded(path: str) -> set[str]:
    """Images (relative paths) and image ids named by a samples/responses file (``--exclude``)."""
    names: set[str] = set()
    for rec in read_records(path, format="jsonl"):
        if rec.get("image") is None and rec.get("image_id") is None:
            raise rec.error("image", "expected 'image' or 'image_id' (a samples or responses record)")
        names.update(str(rec[k]) for k in ("image", "image_id") if rec.get(k) is not None)
    return names


def _chair_images(cfg: ChairConfig, gt_ids: Sequence[str]) -> list[dict[str, Optional[str]]]:
    """The images to caption (§5.1): ``--data`` records (``image``, optional ``image_id``) in file
    order, else the sorted contents of ``--images``, else the ground truth's images; minus
    ``--exclude``; the first ``--n``."""
    if cfg.data:
        root = Path(cfg.image_root).expanduser() if cfg.image_root else Path(cfg.data).expanduser().parent
        images = []
        for rec in read_records(cfg.data, format="jsonl"):
            rel = rec.require("image", str)
            image_id = _str_id(rec, "image_id") if rec.get("image_id") is not None else image_id_of(rel)
            if not cfg.predictions and not (root / rel).is_file():
                raise rec.error("image", f"image file not found (looked under {root})")
            images.append({"image_id": image_id, "image": str(root / rel), "rel": rel})
    elif cfg.image_root:
        root = Path(cfg.image_root).expanduser()
        images = [{"image_id": image_id_of(rel), "image": str(root / rel), "rel": rel}
                  for rel in list_images(root)]
    else:
        images = [{"image_id": i, "image": None, "rel": None} for i in gt_ids]
    drop = _excluded(cfg.exclude) if cfg.exclude else set()
    kept = [img for img in images if img["image_id"] not in drop and img["rel"] not in drop]
    return [{"image_id": img["image_id"], "image": img["image"]} for img in kept][:cfg.n]


def chair_load(cfg: ChairConfig) -> ChairData:
    """Read the ground truth (COCO annotations or ``--gt``), the reference captions and the image
    list; every image must have ground truth (a :class:`DataError` naming it otherwise). The
    caption-derived objects are computed for the evaluated images only; ``--save-gt`` writes their
    ground truth."""
    cfg.validate()
    vocab = Vocabulary.from_file(cfg.vocab) if cfg.vocab else VOCAB
    anomalies: list[dict[str, Any]] = []
    if cfg.annotations:
        files = _coco_files(Path(cfg.annotations).expanduser())
        objects, captions = read_coco_annotations(files, vocab, anomalies)
        source, sha = str(cfg.annotations), _files_sha256(files)
    else:
        objects, captions = read_gt(cfg.gt, vocab)
        source, sha = str(cfg.gt), sha256_file(cfg.gt)
    known = dict.fromkeys([*objects, *captions])
    records = _chair_images(cfg, list(known))
    seen: dict[str, Optional[str]] = {}
    for rec in records:
        where = rec["image"] or cfg.data or source
        if rec["image_id"] in seen:
            raise DataError(f"image_id {rec['image_id']!r} names two images ({seen[rec['image_id']]})",
                            file=where, field="image_id")
        if rec["image_id"] not in known:
            raise DataError(f"no ground truth for image_id {rec['image_id']!r} in {source}", file=where,
                            field="image_id")
        seen[rec["image_id"]] = rec["image"]
    if cfg.limit is not None:
        records = records[:cfg.limit]
    if not records:
        raise DataError("no images to evaluate (all excluded, or the folder is empty)",
                        file=cfg.data or cfg.image_root or source, field="--images")
    gt = ground_truth(objects, captions, vocab, ids=[r["image_id"] for r in records])
    references = {**captions, **(read_references(cfg.references) if cfg.references else {})}
    if cfg.save_gt:
        order = {c: k for k, c in enumerate(vocab.categories)}
        write_jsonl(cfg.save_gt, ({"image_id": r["image_id"], "objects": sorted(gt[r["image_id"]], key=order.get),
                                   "captions": references.get(r["image_id"], [])} for r in records))
    return ChairData(records=records, path=source, sha256=sha, anomalies=anomalies, ground_truth=gt,
                     references=references, vocab=vocab)


def chair_prompt(data: ChairData, cfg: ChairConfig) -> list[Request]:
    """One caption request per image: the image and the §5.1 instruction; uid = image id, extras
    ``image_id`` and ``image``."""
    missing = next((r for r in data.records if r["image"] is None), None)
    if missing is not None:
        raise ConfigError(f"image_id {missing['image_id']!r} has no image file: give --images DIR (or --data "
                          "listing the images) to generate captions, or --predictions to score captions",
                          field="--images")
    return [Request(uid=r["image_id"], text=CHAIR_PROMPT, images=(r["image"],),
                    extras={"image_id": r["image_id"], "image": r["image"]}) for r in data.records]


def chair_parse(text: str, request: Request) -> str:
    """The ``parsed`` copy of a caption: :func:`clean_caption`."""
    return clean_caption(text)


def chair_uid_of(line: Mapping[str, Any], data: ChairData) -> Optional[str]:
    """A predictions line without ``uid``/``id`` names its image by ``image_id``."""
    return None if line.get("image_id") is None else str(line["image_id"])


def _answered(answers: Mapping[str, Mapping[str, Any]], uids: Sequence[str], warnings: list[str]) -> dict[str, str]:
    """uid -> raw prediction of the requests answered without error; the rest are counted in a warning."""
    good = {u: str(answers[u].get("prediction") or "") for u in uids
            if u in answers and answers[u].get("error") is None}
    if len(good) < len(uids):
        warnings.append(f"{len(uids) - len(good)} of {len(uids)} requests failed or are missing")
    return good


def chair_score(data: ChairData, answers: Mapping[str, Mapping[str, Any]], cfg: ChairConfig) -> dict[str, Any]:
    """CHAIR and caption quality over the answered captions (failed ones are left out, with a
    warning); ``per_sample`` holds the ``chair_per_caption.jsonl`` rows the runner writes. (A backend
    that cannot beam-search is the runner's warning, with the decoding in ``config.decoding``.)"""
    warnings: list[str] = []
    raw = _answered(answers, [r["image_id"] for r in data.records], warnings)
    captions = {uid: clean_caption(text) for uid, text in raw.items()}
    chair = chair_scores(captions, data.ground_truth, vocab=data.vocab, unique_mentions=cfg.unique_mentions,
                         warnings=warnings)
    per_category, per_sample = chair.pop("per_category"), chair.pop("per_caption")
    metrics = {**chair, **caption_quality(captions, data.references, warnings)}
    return {"metrics": metrics, "per_category": per_category, "anomalies": list(data.anomalies),
            "warnings": warnings, "per_sample": per_sample}


class _Chair:
    """The ``chair`` entry of the benchmark registry (the hooks of :mod:`mmkit.evaluate.base`)."""

    name = "chair"
    version = "1"
    needs = "generate"
    config_class = ChairConfig
    flags = {"--coco-annotations": "annotations", "--annotations": "annotations", "--gt": "gt",
             "--images": "image_root", "--image-root": "image_root", "--exclude": "exclude", "--n": "n",
             "--unique-mentions": "unique_mentions", "--vocab": "vocab", "--references": "references",
             "--save-gt": "save_gt", "--num-beams": "generation.num_beams",
             "--length-penalty": "generation.length_penalty"}
    max_new_tokens = 200
    #: §5.1 decoding where the user sets none: beam search with 5 beams, no sampling, raw summed
    #: log-probability (length penalty 0); the ``hf`` backend applies it, HTTP servers decode greedily.
    generation_defaults = {"num_beams": 5, "length_penalty": 0.0}
    #: The file the runner writes ``score(...)["per_sample"]`` to.
    per_sample_file = "chair_per_caption.jsonl"
    load = staticmethod(chair_load)
    prompt = staticmethod(chair_prompt)
    parse = staticmethod(chair_parse)
    uid_of = staticmethod(chair_uid_of)
    score = staticmethod(chair_score)


CHAIR = _Chair()


# =========================================================================== POPE maths (§5.4)


def _reference_parse(text: str) -> tuple[str, bool]:
    """POPE's own rule: the text before the first ``.``, commas removed, split on spaces; ``no`` if
    a word is ``no``, ``No`` or ``not``, else ``yes``. The flag marks a *yes* reached by default
    (no word is ``yes`` in any case), e.g. an empty answer."""
    words = text.split(".", 1)[0].replace(",", "").split(" ")
    if {"no", "No", "not"} & set(words):
        return "no", False
    return "yes", not any(w.lower() == "yes" for w in words)


def _strict_parse(text: str) -> tuple[str, bool]:
    """Tokens ``[a-z']+`` of the lower-cased text (curly apostrophes straightened): a first token
    ``yes``/``no`` decides; else any of ``no, not, none`` or a token ending in ``n't`` gives ``no``;
    else ``yes`` by default (flagged)."""
    tokens = re.findall(r"[a-z']+", text.lower().replace("\u2019", "'"))
    if tokens and tokens[0] in ("yes", "no"):
        return tokens[0], False
    if any(t in ("no", "not", "none") or t.endswith("n't") for t in tokens):
        return "no", False
    return "yes", True


#: POPE answer parsers: name -> text -> (``yes``/``no``, whether *yes* was a default).
POPE_PARSERS: dict[str, Callable[[str], tuple[str, bool]]] = {"reference": _reference_parse, "strict": _strict_parse}


def parse_yes_no(text: str, parser: str = "reference") -> str:
    """``yes`` or ``no`` for an answer under the named parser (unlearn.md §5.4)."""
    if parser not in POPE_PARSERS:
        raise ConfigError(f"unknown POPE parser {parser!r}{suggest(parser, POPE_PARSERS)}", field="--parser")
    return POPE_PARSERS[parser](text)[0]


def pope_metrics(labels: Sequence[str], answers: Sequence[str],
                 warnings: Optional[list[str]] = None) -> dict[str, Optional[float]]:
    """POPE metrics with *yes* as the positive class, all in percent (unlearn.md §5.4): accuracy
    ``100·(TP+TN)/N``, precision ``100·TP/(TP+FP)``, recall ``100·TP/(TP+FN)``, F1 (harmonic mean of
    precision and recall), yes-ratio ``100·#yes/N``, and ``n``. ``labels`` and ``answers`` are
    ``yes``/``no`` lists of one length; undefined values are ``None`` with a warning."""
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    pairs = Counter(zip(labels, answers))
    tp, fp, tn, fn = pairs["yes", "yes"], pairs["no", "yes"], pairs["no", "no"], pairs["yes", "no"]
    n = len(labels)
    precision = _pct(tp, tp + fp, "precision (no yes predictions)", warnings)
    recall = _pct(tp, tp + fn, "recall (no yes labels)", warnings)
    f1 = None
    if precision is not None and recall is not None:
        f1 = (2 * precision * recall / (precision + recall)) if precision + recall else _pct(
            0, 0, "f1 (precision and recall are 0)", warnings)
    return {"accuracy": _pct(tp + tn, n, "accuracy (no questions)", warnings), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": _pct(tp + fp, n, "yes_ratio (no questions)", warnings), "n": n}


def pope_question(obj: str) -> str:
    """``Is there a {obj} in the image?`` with ``an`` before a vowel-initial name."""
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


@dataclass(frozen=True)
class _ObjectStats:
    """Object statistics of the selected images: every object seen (sorted), its frequency (number of
    images containing it) and pairwise co-occurrence counts."""

    pool: tuple[str, ...]
    freq: Counter[str]
    cooc: dict[str, Counter[str]]


def _most(candidates: Iterable[str], counts: Mapping[str, int]) -> Optional[str]:
    """The candidate with the highest count (ties by name), ``None`` if there is none."""
    return min(candidates, key=lambda o: (-counts[o], o), default=None)


#: POPE negative rules (unlearn.md §5.4): split -> (positive, asked, stats) -> object or None; None
#: falls back to the uniform ``random`` draw.
NEGATIVE_RULES: dict[str, Callable[[str, set[str], _ObjectStats], Optional[str]]] = {
    "random": lambda positive, asked, stats: None,
    "popular": lambda positive, asked, stats: _most((o for o in stats.pool if o not in asked), stats.freq),
    "adversarial": lambda positive, asked, stats: _most(
        (o for o in stats.cooc[positive] if o not in asked), stats.cooc[positive]),
}


def _negative(split: str, positive: str, asked: set[str], stats: _ObjectStats, rng: Any) -> Optional[str]:
    """One negative object for ``positive`` under ``split``, never in ``asked``: the split's rule, else
    uniform over the objects not yet asked (``None`` if none is left)."""
    chosen = NEGATIVE_RULES[split](positive, asked, stats)
    if chosen is not None:
        return chosen
    free = [o for o in stats.pool if o not in asked]
    return free[int(rng.integers(len(free)))] if free else None


def build_pope(images: Sequence[tuple[str, str, Sequence[str]]], splits: Sequence[str] = POPE_SPLITS, *,
               seed: int = 0, n_images: int = 500, n_positive: int = 3) -> list[dict[str, Any]]:
    """POPE questions (unlearn.md §5.4) from ``(image_id, image, objects)`` triples: keep images with at
    least ``n_positive`` objects and sample ``n_images`` of them with ``seed`` (kept in input order);
    the first ``n_positive`` objects are the positives, each followed by one negative never in the
    image and never already asked for it — ``random`` uniform over the objects seen in the selected
    images, ``popular`` the most frequent (images containing it), ``adversarial`` the one co-occurring
    most with the positive. Returns ``{"question_id", "image_id", "image", "text", "label", "split"}``
    records, question ids 1.. per split."""
    eligible = [(i, img, list(dict.fromkeys(objs))) for i, img, objs in images if len(set(objs)) >= n_positive]
    if not eligible:
        raise DataError(f"no image has {n_positive} or more ground-truth objects", field="objects")
    rng = stable_rng(seed, "pope-images")
    chosen = sorted(rng.choice(len(eligible), size=min(n_images, len(eligible)), replace=False).tolist())
    selected = [eligible[k] for k in chosen]
    freq: Counter[str] = Counter(o for _, _, objs in selected for o in objs)
    cooc: dict[str, Counter[str]] = defaultdict(Counter)
    for _, _, objs in selected:
        for a in objs:
            cooc[a].update(o for o in objs if o != a)
    stats = _ObjectStats(tuple(sorted(freq)), freq, cooc)
    questions = []
    for split in splits:
        rng = stable_rng(seed, "pope", split)
        qid = 0
        for image_id, image, objs in selected:
            asked = set(objs)
            for positive in objs[:n_positive]:
                negative = _negative(split, positive, asked, stats, rng)
                if negative is None:
                    raise DataError(f"image_id {image_id!r}: no object left to ask as a negative (the selected "
                                    "images mention too few distinct objects)", field="objects")
                asked.add(negative)
                for obj, label in ((positive, "yes"), (negative, "no")):
                    qid += 1
                    questions.append({"question_id": qid, "image_id": image_id, "image": image,
                                      "text": pope_question(obj), "label": label, "split": split})
    return questions


# =========================================================================== POPE data


@dataclass
class PopeConfig(EvalConfig):
    """``mmkit evaluate pope`` options: the common ones plus questions, images, splits and parser."""

    questions: list[str] = field(default_factory=list)  # POPE question files (besides --data)
    image_root: Optional[str] = None  # the images (--images); question ``image`` paths resolve here
    splits: list[str] = field(default_factory=list)  # keep (or build) these splits; empty = all
    build_from: Optional[str] = None  # a --gt format JSONL to build the questions from
    n_images: int = 500
    parser: str = "reference"
    template: str = POPE_TEMPLATE

    def validate(self) -> None:
        if self.parser not in POPE_PARSERS:
            raise ConfigError(f"unknown parser {self.parser!r}; expected one of {', '.join(POPE_PARSERS)}"
                              f"{suggest(self.parser, POPE_PARSERS)}", field="--parser")
        if "{question}" not in self.template:
            raise ConfigError("the template must contain {question}", field="--pope-template")
        if self.build_from and (self.data or self.questions):
            raise ConfigError("--build-from makes the questions; it excludes --data/--questions", field="--build-from")
        if not (self.build_from or self.data or self.questions):
            raise ConfigError("give the POPE questions (--data FILE|DIR or --questions FILE...) or "
                              "--build-from GT.jsonl", field="--data")
        if self.build_from and not self.image_root:
            raise ConfigError("--build-from needs --images DIR", field="--images")
        unknown = [s for s in self.splits if s not in POPE_SPLITS]
        if self.build_from and unknown:
            raise ConfigError(f"cannot build split {unknown[0]!r}; expected some of {', '.join(POPE_SPLITS)}",
                              field="--splits")
        if self.n_images < 1:
            raise ConfigError(f"expected a positive number of images, got {self.n_images}", field="--n-images")


def _question_files(cfg: PopeConfig) -> list[Path]:
    files: list[Path] = []
    for name in ([cfg.data] if cfg.data else []) + list(cfg.questions):
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
            if not found:
                raise DataError("no .json/.jsonl question files in this folder", file=name, field="--data")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError("no such file or directory", file=name, field="--data")
    return files


def _split_of_file(path: Path) -> str:
    """The split a file name implies (``coco_pope_adversarial.json`` -> ``adversarial``), else its stem."""
    return next((s for s in POPE_SPLITS if s in path.stem.lower()), path.stem)


def _read_questions(files: Sequence[Path]) -> list[dict[str, Any]]:
    """POPE records (``question_id, image, text, label``, optional ``split``) with their location."""
    questions = []
    for path in files:
        default_split = _split_of_file(path)
        for rec in _read_any_json(path):
            label = str(rec.require("label", str)).strip().lower()
            if label not in ("yes", "no"):
                raise rec.error("label", f"expected yes or no, got {rec['label']!r}")
            questions.append({"question_id": _str_id(rec, "question_id"), "image": rec.require("image", str),
                              "text": rec.require("text", str), "label": label,
                              "split": str(rec.get("split") or default_split), "file": rec.source, "line": rec.loc})
    return questions


def pope_load(cfg: PopeConfig) -> Loaded:
    """Read the POPE questions (files, a folder of per-split files, or built from ``--build-from``),
    keep ``--splits``, resolve images; a duplicate ``{split}:{question_id}`` or a bad label is a
    :class:`DataError` naming the file and line."""
    cfg.validate()
    root = Path(cfg.image_root).expanduser() if cfg.image_root else None
    if cfg.build_from:
        objects, _ = read_gt(cfg.build_from, VOCAB)
        by_id = {image_id_of(rel): rel for rel in list_images(root)}
        missing = next((i for i in objects if i not in by_id), None)
        if missing is not None:
            raise DataError(f"no image in --images for image_id {missing!r}", file=cfg.build_from, field="image_id")
        built = build_pope([(i, by_id[i], objs) for i, objs in objects.items()], cfg.splits or POPE_SPLITS,
                           seed=cfg.seed, n_images=cfg.n_images)
        questions = [{**q, "question_id": str(q["question_id"]), "file": cfg.build_from, "line": None} for q in built]
        source, sha = cfg.build_from, sha256_file(cfg.build_from)
    else:
        files = _question_files(cfg)
        questions = _read_questions(files)
        source, sha = (cfg.data or str(files[0])), _files_sha256(files)
        found = list(dict.fromkeys(q["split"] for q in questions))
        unknown = [s for s in cfg.splits if s not in found]
        if unknown:
            raise ConfigError(f"split {unknown[0]!r} is not in the questions (found: {', '.join(found)})",
                              field="--splits")
        if cfg.splits:
            questions = [q for q in questions if q["split"] in cfg.splits]
    base = root or (Path(source).expanduser().parent if Path(source).expanduser().is_file() else Path(source))
    seen: dict[str, dict[str, Any]] = {}
    checked: set[str] = set()
    for q in questions:
        q["uid"] = f"{q['split']}:{q['question_id']}"
        if q["uid"] in seen:
            first = seen[q["uid"]]
            raise DataError(f"question {q['uid']} repeats {first['file']}:{first['line']}", file=q["file"],
                            line=q["line"], field="question_id")
        seen[q["uid"]] = q
        q["image"] = str(base / q["image"])
        if not cfg.predictions and q["image"] not in checked:
            if not Path(q["image"]).is_file():
                raise DataError(f"image file not found: {q['image']}", file=q["file"], line=q["line"], field="image")
            checked.add(q["image"])
    if cfg.limit is not None:
        questions = questions[:cfg.limit]
    if not questions:
        raise DataError("no POPE questions", file=source, field="--data")
    return Loaded(records=questions, path=source, sha256=sha)


def pope_prompt(data: Loaded, cfg: PopeConfig) -> list[Request]:
    """One request per question: the image and the question in ``--pope-template``; uid
    ``{split}:{question_id}``, extras ``question_id``, ``split`` (and ``parser`` for ``parsed``)."""
    return [Request(uid=q["uid"], text=cfg.template.format(question=q["text"]), images=(q["image"],),
                    extras={"question_id": q["question_id"], "split": q["split"], "parser": cfg.parser})
            for q in data.records]


def pope_parse(text: str, request: Request) -> str:
    """The ``parsed`` copy of an answer: ``yes``/``no`` under the request's parser."""
    return parse_yes_no(text, request.extras.get("parser", "reference"))


def pope_uid_of(line: Mapping[str, Any], data: Loaded) -> Optional[str]:
    """A predictions line without ``uid`` names its question by ``question_id`` and ``split`` (the
    split may be left out when the data holds one split)."""
    if line.get("question_id") is None:
        return None
    splits = list(dict.fromkeys(q["split"] for q in data.records))
    split = line.get("split") or (splits[0] if len(splits) == 1 else None)
    if split is None:
        raise DataError(f"question_id {line['question_id']!r} without 'split' is ambiguous with splits "
                        f"{', '.join(splits)}", file=getattr(line, "source", None), line=getattr(line, "loc", None),
                        field="split")
    return f"{split}:{line['question_id']}"


def pope_score(data: Loaded, answers: Mapping[str, Mapping[str, Any]], cfg: PopeConfig) -> dict[str, Any]:
    """POPE per split and the mean over splits (non-null values); a failed or missing answer counts as
    wrong (the opposite of its label); ``n_default_yes`` counts *yes* reached by the parser's default."""
    warnings: list[str] = []
    answered = _answered(answers, [q["uid"] for q in data.records], warnings)
    parse = POPE_PARSERS[cfg.parser]
    by_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    n_default_yes = 0
    for q in data.records:
        if q["uid"] in answered:
            answer, defaulted = parse(answered[q["uid"]])
            n_default_yes += defaulted
        else:
            answer = "no" if q["label"] == "yes" else "yes"
        labels, predictions = by_split[q["split"]]
        labels.append(q["label"])
        predictions.append(answer)
    per_split = {}
    for split, (labels, preds) in by_split.items():
        split_warnings: list[str] = []
        per_split[split] = pope_metrics(labels, preds, split_warnings)
        warnings += [f"{split}: {w}" for w in split_warnings]
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    metrics = {k: _mean(m[k] for m in per_split.values()) for k in keys}
    metrics.update(n=len(data.records), n_default_yes=n_default_yes)
    return {"metrics": metrics, "per_category": per_split, "anomalies": list(data.anomalies), "warnings": warnings}


class _Pope:
    """The ``pope`` entry of the benchmark registry (the hooks of :mod:`mmkit.evaluate.base`)."""

    name = "pope"
    version = "1"
    needs = "generate"
    config_class = PopeConfig
    flags = {"--questions": "questions", "--images": "image_root", "--image-root": "image_root",
             "--split": "splits", "--splits": "splits", "--build-from": "build_from", "--n-images": "n_images",
             "--parser": "parser", "--pope-template": "template"}
    max_new_tokens = 16
    load = staticmethod(pope_load)
    prompt = staticmethod(pope_prompt)
    parse = staticmethod(pope_parse)
    uid_of = staticmethod(pope_uid_of)
    score = staticmethod(pope_score)


POPE = _Pope()
