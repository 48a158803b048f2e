"""``mmkit evaluate snare``: multimodal alignment probes (evaluate.md §5).

Input is ``probes.jsonl`` from ``build-dataset snare`` (build.md §4): per probe one image (cropped to
``bbox`` when given), its captions with the correct one at ``answer`` (always 0) and their option
labels. A probe is correct iff the correct caption's score is strictly the highest
(``--tie-policy strict``) or highest with ties going to the lower index (``reference``). Scores come
from one of four routes (``--score``, default by backend kind):

- ``cosine`` (dual encoder) and ``itm`` (ITM head or cross-encoder) need no generation:
  :func:`score_direct` loads the model through :mod:`mmkit.core.models` and scores with
  :mod:`mmkit.core.embed` / :mod:`mmkit.core.itm`;
- ``yesno`` (MLLM default): one request per caption; the first-token log-prob margin
  logsumexp(yes set) − logsumexp(no set) when the backend reports it, else the answer's first word
  (yes → 1, no → 0, anything else −1 and unparsed);
- ``choice``: one request per probe listing the captions numbered from 0 in a per-probe permutation
  drawn from ``stable_seed(seed, uid)``; correct iff the first in-range integer names the correct one.

A predictions file may give ``{"uid", "scores": [one float per caption]}`` per probe (routes
``cosine``, ``itm`` and ``choice``, whose requests are per probe).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from mmkit.errors import ConfigError, DataError
from mmkit.evaluate.base import EvalConfig, Loaded, Request
from mmkit.io import Record, read_records, sha256_file
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

Route = Literal["cosine", "itm", "yesno", "choice"]
TiePolicy = Literal["strict", "reference"]
YESNO_PROMPT = "Does the following sentence match the image? Answer yes or no."
CHOICE_PROMPT = ("Select the most accurate description for the image from the following options. "
                 "Respond using the corresponding option number.")
#: Routes that need no generation (score_direct); the others send requests to a backend.
DIRECT_ROUTES = ("cosine", "itm")
#: Per-probe request routes (a predictions file may answer them with ``scores``).
PER_PROBE_ROUTES = ("cosine", "itm", "choice")
OTHER = "other"


@dataclass
class SnareConfig(EvalConfig):
    """``mmkit evaluate snare`` options: the common ones plus the scoring route and tie policy."""

    score: Optional[Route] = None  # None: cosine for dual encoders, itm for ITM models, yesno for MLLMs
    tie_policy: TiePolicy = "strict"
    min_group_size: int = 25
    image_root: Optional[str] = None

    def validate(self) -> None:
        if self.min_group_size < 1:
            raise ConfigError(f"expected >= 1, got {self.min_group_size}", field="--min-group-size")


@dataclass(frozen=True)
class Probe:
    """One checked probe; ``image`` is the resolved path, ``bbox`` ``(x, y, w, h)`` or None."""

    id: str
    task: str
    subtask: str
    image: str
    bbox: Optional[tuple[float, ...]]
    captions: tuple[str, ...]
    labels: tuple[str, ...]
    answer: int

    @property
    def image_ref(self) -> Any:
        """What a backend or encoder loads: the path, or ``{"path", "bbox"}`` for a crop (§2.4)."""
        return self.image if self.bbox is None else {"path": self.image, "bbox": list(self.bbox)}


@dataclass
class SnareData(Loaded):
    """Loaded probes and the resolved scoring route."""

    route: str = "yesno"


# --------------------------------------------------------------------------- load


def check_probe(rec: Record, root: Path) -> Probe:
    """One ``probes.jsonl`` line (build.md §4), checked: ``len(captions) == len(option_labels) ≥ 2``,
    ``0 ≤ answer < len(captions)``, ``bbox`` null or ``[x, y, w, h]`` with w, h > 0, image present."""
    pid = rec.require("id", str)
    task = rec.require("task", str)
    subtask = rec.require("subtask", str, nonempty=False)
    image = str(root / rec.require("image", str))
    if not Path(image).is_file():
        raise rec.error("image", f"image file not found: {image}")
    bbox = rec.get("bbox")
    if bbox is not None:
        if (not isinstance(bbox, list) or len(bbox) != 4
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox)
                or bbox[2] <= 0 or bbox[3] <= 0):
            raise rec.error("bbox", f"expected null or [x, y, w, h] with w, h > 0, got {bbox!r}")
        bbox = tuple(bbox)
    captions = rec.require("captions", list)
    labels = rec.require("option_labels", list)
    for name, values in (("captions", captions), ("option_labels", labels)):
        for k, v in enumerate(values):
            if not isinstance(v, str):
                raise rec.error(f"{name}[{k}]", f"expected a string, got {v!r}")
    if len(captions) < 2 or len(captions) != len(labels):
        raise rec.error("option_labels", f"expected as many labels as captions (at least 2), got "
                                         f"{len(labels)} labels for {len(captions)} captions")
    answer = rec.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(captions):
        raise rec.error("answer", f"expected a caption index 0..{len(captions) - 1}, got {answer!r}")
    return Probe(pid, task, subtask, image, bbox, tuple(captions), tuple(labels), answer)


def default_route(cfg: SnareConfig) -> str:
    """``--score`` or, by backend kind: ``choice`` for a predictions file (per-probe lines), ``yesno``
    for an HTTP server, and for a local model ``cosine`` (dual encoder), ``itm`` (ITM model) or ``yesno``."""
    from mmkit.core.backends import resolve_kind

    kind = resolve_kind(cfg.backend, cfg.predictions)
    if cfg.score is not None:
        if cfg.score in DIRECT_ROUTES and kind == "openai":
            raise ConfigError(f"--score {cfg.score} needs a local model, not an HTTP server", field="--score")
        return cfg.score
    if kind == "predictions":
        return "choice"
    if kind != "hf":
        return "yesno"
    from mmkit.core.itm import ITM_SCORERS
    from mmkit.evaluate import model_offers

    config = _model_config(_one_model(cfg), cfg)
    if config.model_type in ITM_SCORERS:
        return "itm"
    return "cosine" if "embed" in model_offers(config) else "yesno"


def _model_config(model_id: str, cfg: SnareConfig) -> Any:
    from mmkit.core.models import _load_config, resolve_source

    return _load_config(resolve_source(model_id)[0], model_id, {"revision": cfg.backend.revision,
                                                               "trust_remote_code": cfg.backend.trust_remote_code})


def _one_model(cfg: SnareConfig) -> str:
    if len(cfg.backend.model) != 1:
        raise ConfigError(f"expected one --model, got {len(cfg.backend.model)}", field="--model")
    return cfg.backend.model[0]


def load(cfg: SnareConfig) -> SnareData:
    """Read and check ``--data``; degenerate probes (a repeated caption) are logged, excluded and listed
    in the anomalies; ``--limit`` keeps the first N remaining probes."""
    if not cfg.data:
        raise ConfigError("give --data: a probes.jsonl from build-dataset snare", field="--data")
    path = Path(cfg.data).expanduser()
    if not path.is_file():
        raise DataError("no such file", file=cfg.data, field="--data")
    root = Path(cfg.image_root).expanduser() if cfg.image_root else path.parent
    probes: list[Probe] = []
    anomalies: list[dict[str, Any]] = []
    first_line: dict[str, Any] = {}
    for rec in read_records(str(path), format="jsonl"):
        probe = check_probe(rec, root)
        if probe.id in first_line:
            raise rec.error("id", f"duplicate id {probe.id!r} (first at line {first_line[probe.id]})")
        first_line[probe.id] = rec.loc
        if len(set(probe.captions)) < len(probe.captions):
            anomalies.append({"kind": "degenerate", "uid": probe.id, "file": rec.source, "line": rec.loc,
                              "message": f"{probe.id}: a caption repeats; the probe is excluded"})
            continue
        probes.append(probe)
    if anomalies:
        log.warning("%d degenerate probe(s) (a repeated caption) excluded; see anomalies", len(anomalies))
    if cfg.limit is not None:
        probes = probes[:cfg.limit]
    if not probes:
        raise DataError("no usable probes", file=cfg.data, field="--data")
    return SnareData(records=probes, path=str(path), sha256=sha256_file(path), anomalies=anomalies,
                     route=default_route(cfg))


# --------------------------------------------------------------------------- prompt and parse


def choice_order(seed: int, uid: str, n: int) -> list[int]:
    """The ``choice`` route's display order: line j shows caption ``order[j]``, a permutation drawn
    from ``stable_seed(seed, uid)`` (numpy PCG64, :func:`mmkit.core.seeding.stable_rng`)."""
    from mmkit.core.seeding import stable_rng

    return [int(i) for i in stable_rng(seed, uid).permutation(n)]


def prompt(data: SnareData, cfg: SnareConfig) -> list[Request]:
    """``yesno``: one request per caption (uid ``{id}#{j}``), asking for the first-token yes/no
    log-probs; ``choice``: one per probe with the numbered captions; ``cosine``/``itm`` (answered by
    a predictions file with ``scores``): one per probe listing the captions."""
    route = data.route
    requests = []
    for p in data.records:
        if route == "yesno":
            requests += [Request(uid=f"{p.id}#{j}", text=f"{YESNO_PROMPT}\n{caption}", images=(p.image_ref,),
                                 extras={"route": route, "probe": p.id, "label": p.labels[j]},
                                 logprob_words=("yes", "no"))
                         for j, caption in enumerate(p.captions)]
        elif route == "choice":
            order = choice_order(cfg.seed, p.id, len(p.captions))
            lines = "\n".join(f"{j}. {p.captions[i]}" for j, i in enumerate(order))
            requests.append(Request(uid=p.id, text=f"{CHOICE_PROMPT}\n{lines}", images=(p.image_ref,),
                                    extras={"route": route, "order": order}))
        else:
            requests.append(Request(uid=p.id, text="\n".join(p.captions), images=(p.image_ref,),
                                    extras={"route": route}))
    return requests


def parse_yes_no(text: str) -> int:
    """The first word (letters only) of the lower-cased answer: ``yes`` → 1, ``no`` → 0, anything
    else → −1 (unparsed). No substring tests: ``not``, ``know``, ``cannot`` are not ``no``."""
    word = re.search(r"[a-z]+", text.lower())
    return {"yes": 1, "no": 0}.get(word.group() if word else "", -1)


def parse_choice(text: str, n: int) -> Optional[int]:
    """The first standalone integer in 0..n−1 (the chosen line number), else None."""
    return next((int(m) for m in re.findall(r"(?<![0-9])[0-9]+(?![0-9])", text) if int(m) < n), None)


def yesno_margin(logprobs: Optional[Mapping[str, Optional[float]]]) -> Optional[float]:
    """logsumexp(yes set) − logsumexp(no set) of the first token (a set the backend did not see
    counts as −inf); None when neither was seen (the answer text decides)."""
    if not logprobs:
        return None
    yes, no = logprobs.get("yes"), logprobs.get("no")
    if yes is None and no is None:
        return None
    margin = (-math.inf if yes is None else yes) - (-math.inf if no is None else no)
    return None if math.isnan(margin) else margin


def parse(text: str, request: Request) -> Any:
    """The ``parsed`` copy: ``yes``/``no`` (yesno), the chosen line number (choice), else None."""
    route = request.extras.get("route")
    if route == "yesno":
        return {1: "yes", 0: "no"}.get(parse_yes_no(text))
    if route == "choice":
        return parse_choice(text, len(request.extras["order"]))
    return None


# --------------------------------------------------------------------------- score


@dataclass(frozen=True)
class Outcome:
    """What one probe's answers say: caption ``scores`` (score routes) or the ``chosen`` caption
    (choice route, None when unparsed), the chosen line, per-caption yes answers, counts."""

    scores: Optional[np.ndarray] = None
    chosen: Optional[int] = None
    position: Optional[int] = None
    accepted: tuple[bool, ...] = ()
    unparsed: int = 0
    failed: bool = False


def _failed(line: Optional[Mapping[str, Any]]) -> bool:
    return line is None or line.get("error") is not None


def _line_scores(probe: Probe, line: Mapping[str, Any]) -> np.ndarray:
    scores = line["scores"]
    if (not isinstance(scores, list) or len(scores) != len(probe.captions)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in scores)):
        raise DataError(f"uid {probe.id}: expected scores = {len(probe.captions)} numbers (one per caption), "
                        f"got {scores!r}", file=getattr(line, "source", None), line=getattr(line, "loc", None),
                        field="scores")
    return np.asarray(scores, dtype=np.float64)


def outcome(probe: Probe, answers: Mapping[str, Mapping[str, Any]], route: str, seed: int) -> Outcome:
    """Read one probe's answers: a per-probe ``scores`` line wins; ``yesno`` takes the log-prob
    margins when every caption has one, else the first words; ``choice`` maps the line back through
    :func:`choice_order`. A missing or errored answer makes the probe wrong."""
    line = answers.get(probe.id)
    if line is not None and not _failed(line) and line.get("scores") is not None:
        return Outcome(scores=_line_scores(probe, line))
    if route == "yesno":
        lines = [answers.get(f"{probe.id}#{j}") for j in range(len(probe.captions))]
        if any(_failed(x) for x in lines):
            return Outcome(failed=True)
        words = [parse_yes_no(str(x.get("prediction") or "")) for x in lines]
        margins = [yesno_margin(x.get("logprobs")) for x in lines]
        by_logprob = all(m is not None for m in margins)
        return Outcome(scores=np.asarray(margins if by_logprob else words, dtype=np.float64),
                       accepted=tuple(w == 1 for w in words), unparsed=0 if by_logprob else sum(w == -1 for w in words))
    if _failed(line):
        return Outcome(failed=True)
    if route != "choice":
        raise DataError(f"uid {probe.id}: the {route} route needs scores (one number per caption), got a "
                        "prediction text", file=getattr(line, "source", None), line=getattr(line, "loc", None),
                        field="scores")
    order = choice_order(seed, probe.id, len(probe.captions))
    position = parse_choice(str(line.get("prediction") or ""), len(order))
    return Outcome(chosen=None if position is None else order[position], position=position,
                   unparsed=position is None)


def answer_ranks(scores: np.ndarray, answer: np.ndarray, tie_policy: str) -> np.ndarray:
    """1-based rank of the correct caption per probe (evaluate.md §5 "Metrics"): 1 + the captions
    scoring higher + the tied ones (``strict``: every tie; ``reference``: ties at a lower index).
    Top-k correct iff rank ≤ k; top-1 under ``strict`` is s_a > max_{j≠a} s_j."""
    rows = np.arange(len(scores))
    own = scores[rows, answer][:, None]
    tied = scores == own
    tied[rows, answer] = False
    if tie_policy == "reference":
        tied &= np.arange(scores.shape[1])[None, :] < answer[:, None]
    return 1 + (scores > own).sum(1) + tied.sum(1)


@dataclass(frozen=True)
class ProbeResult:
    """One probe, scored: its rank (n + 1 when failed or unparsed), winner label (``tie``,
    ``unparsed``, ``failed``), tie flag and the outcome's counts."""

    task: str
    subtask: str
    n: int
    rank: int
    winner: str
    tie: bool
    outcome: Outcome
    labels: tuple[str, ...]


def score_probes(probes: Sequence[Probe], outcomes: Sequence[Outcome], tie_policy: str) -> list[ProbeResult]:
    """Ranks and winners of every probe, vectorised over probes with the same number of captions."""
    ranks = np.zeros(len(probes), dtype=np.int64)
    winners = [""] * len(probes)
    ties = np.zeros(len(probes), dtype=bool)
    by_n: dict[int, list[int]] = {}
    for i, (p, o) in enumerate(zip(probes, outcomes)):
        if o.scores is not None:
            by_n.setdefault(len(p.captions), []).append(i)
        elif o.chosen is not None:
            ranks[i] = 1 if o.chosen == p.answer else 2
            winners[i] = p.labels[o.chosen]
        else:
            ranks[i] = len(p.captions) + 1
            winners[i] = "failed" if o.failed else "unparsed"
    for rows in by_n.values():
        s = np.stack([outcomes[i].scores for i in rows])
        r = answer_ranks(s, np.array([probes[i].answer for i in rows]), tie_policy)
        top = s.max(1, keepdims=True)
        tie = (s == top).sum(1) > 1
        for k, i in enumerate(rows):
            ranks[i], ties[i] = r[k], tie[k]
            winners[i] = "tie" if tie[k] else probes[i].labels[int(s[k].argmax())]
    return [ProbeResult(p.task, p.subtask, len(p.captions), int(ranks[i]), winners[i], bool(ties[i]), outcomes[i],
                        p.labels) for i, p in enumerate(probes)]


def _share(counts: Counter, n: int) -> dict[str, float]:
    return {k: 100.0 * v / n for k, v in counts.most_common()}


def block_metrics(results: Sequence[ProbeResult], route: str) -> dict[str, Any]:
    """A block's ``accuracy`` (top-1), ``top{k}_accuracy`` for 2 ≤ k < n (when scores exist), the
    ``winners`` distribution, ``acceptance`` per label (yesno: % answered yes), chosen ``positions``
    (choice answers) and the counts ``n``, ``n_ties``, ``n_unparsed``, ``n_failed`` (percentages in [0, 100])."""
    n = len(results)
    ranks = np.array([r.rank for r in results])
    has_scores = any(r.outcome.scores is not None for r in results)
    out: dict[str, Any] = {"accuracy": 100.0 * float((ranks == 1).mean())}
    if has_scores:
        for k in range(2, max(r.n for r in results)):
            out[f"top{k}_accuracy"] = 100.0 * float((ranks <= k).mean())
    out["winners"] = _share(Counter(r.winner for r in results), n)
    if route == "yesno":
        yes, seen = Counter(), Counter()
        for r in results:
            seen.update(r.labels)
            yes.update(label for label, ok in zip(r.labels, r.outcome.accepted) if ok)
        out["acceptance"] = {label: 100.0 * yes[label] / seen[label] for label in seen}
    if route == "choice" and not has_scores:
        out["positions"] = _share(Counter("failed" if r.outcome.failed else "unparsed" if r.outcome.position is None
                                          else str(r.outcome.position) for r in results), n)
    out.update(n=n, n_ties=sum(r.tie for r in results), n_unparsed=sum(r.outcome.unparsed for r in results),
               n_failed=sum(r.outcome.failed for r in results))
    return out


def _subtask_groups(results: Sequence[ProbeResult], min_size: int) -> dict[str, list[ProbeResult]]:
    """Results by subtask; subtasks with fewer than ``min_size`` probes pooled into ``other``."""
    sizes = Counter(r.subtask for r in results)
    groups: dict[str, list[ProbeResult]] = {}
    for r in results:
        groups.setdefault(r.subtask if sizes[r.subtask] >= min_size else OTHER, []).append(r)
    return groups


def score(data: SnareData, answers: Mapping[str, Mapping[str, Any]], cfg: SnareConfig) -> dict[str, Any]:
    """Per task (with its subtasks) and overall: accuracy, top-k, winners, ties, unparsed (evaluate.md §5);
    ``macro_accuracy`` is the mean over tasks, ``accuracy`` the mean over probes."""
    outcomes = [outcome(p, answers, data.route, cfg.seed) for p in data.records]
    results = score_probes(data.records, outcomes, cfg.tie_policy)
    per_task: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(r.task for r in results):
        members = [r for r in results if r.task == task]
        per_task[task] = {**block_metrics(members, data.route),
                          "subtasks": {name: block_metrics(group, data.route)
                                       for name, group in _subtask_groups(members, cfg.min_group_size).items()}}
    overall = block_metrics(results, data.route)
    metrics = {"accuracy": overall["accuracy"],
               "macro_accuracy": sum(b["accuracy"] for b in per_task.values()) / len(per_task),
               **{f"{task}_accuracy": b["accuracy"] for task, b in per_task.items()},
               **{k: overall[k] for k in ("n", "n_ties", "n_unparsed", "n_failed")},
               "n_degenerate": sum(a["kind"] == "degenerate" for a in data.anomalies)}
    return {"metrics": metrics, "per_category": per_task, "anomalies": list(data.anomalies), "warnings": [],
            "scoring": {"route": data.route, "tie_policy": cfg.tie_policy}}


# --------------------------------------------------------------------------- direct routes

#: route -> ``fn(probes, model_id, cfg) -> (per-probe caption scores, models entry)``.
DIRECT_SCORERS: Registry = Registry("SNARE scoring route")
DirectScorer = Callable[[Sequence[Probe], str, SnareConfig], tuple[list[np.ndarray], dict[str, Any]]]


def _unique_images(probes: Sequence[Probe]) -> tuple[list[Any], np.ndarray]:
    """The distinct (image, bbox) crops and, per caption (probe by probe), the index of its crop."""
    index: dict[tuple[str, Any], int] = {}
    refs: list[Any] = []
    per_caption = []
    for p in probes:
        key = (p.image, p.bbox)
        if key not in index:
            index[key] = len(refs)
            refs.append(p.image_ref)
        per_caption += [index[key]] * len(p.captions)
    return refs, np.asarray(per_caption, dtype=np.int64)


def _split(flat: np.ndarray, probes: Sequence[Probe]) -> list[np.ndarray]:
    return np.split(np.asarray(flat, dtype=np.float64), np.cumsum([len(p.captions) for p in probes])[:-1])


def _record(lm: Any) -> dict[str, Any]:
    return {**lm.record(), "backend": "hf", "class": type(lm.model).__name__,
            "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."), "server_models": None}


def _load(model_id: str, kind: str, cfg: SnareConfig) -> Any:
    from mmkit.core.models import load_model

    lm = load_model(model_id, kind, device=cfg.backend.device or "auto", dtype=cfg.backend.dtype or "auto",
                    revision=cfg.backend.revision, trust_remote_code=cfg.backend.trust_remote_code)
    lm.model.eval()
    return lm


def _itm_pairs(scorer: Any, images: Any, captions: list[str], image_of: Any, length: int, batch: int) -> Any:
    """The ITM head's score of each (crop, caption) pair."""
    import torch

    texts = scorer.encode_captions(captions, length, batch_size=batch)
    return scorer.pair_scores(images, texts, image_of, torch.arange(len(captions), device=image_of.device),
                              batch_size=batch)


def _contrastive_pairs(scorer: Any, images: Any, captions: list[str], image_of: Any, length: int, batch: int) -> Any:
    """Cosine of the ITM model's own contrastive embeddings (BLIP ``use_itm_head=False``)."""
    img, txt = scorer.contrastive_embeddings(images, captions, length, batch_size=batch)
    return (img[image_of] * txt).sum(-1)


def _by_chunks(probes: Sequence[Probe], lm: Any, cfg: SnareConfig, pairs: Callable[..., Any]) -> list[np.ndarray]:
    """Score an ITM-kind model chunk by chunk of probes (bounded memory): each chunk's distinct crops
    are encoded once by the model's image part, then ``pairs`` scores its captions against them."""
    import torch

    from mmkit.core.embed import resolve_max_length
    from mmkit.core.itm import itm_scorer

    scorer = itm_scorer(lm.model, lm.preprocessor, score="prob")
    length = resolve_max_length(lm.path, lm.model.config, scorer.tokenizer, None)
    batch = cfg.backend.batch_size or 32
    scores: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(probes), batch):
            chunk = probes[start:start + batch]
            refs, image_of = _unique_images(chunk)
            images = scorer.encode_image_files(refs, batch_size=batch)
            flat = pairs(scorer, images, [c for p in chunk for c in p.captions],
                         torch.as_tensor(image_of, device=images.feats.device), length, batch)
            scores += _split(flat.float().cpu().numpy(), chunk)
    return scores


@DIRECT_SCORERS.register("cosine")
def cosine_scores(probes: Sequence[Probe], model_id: str, cfg: SnareConfig) -> tuple[list[np.ndarray], dict]:
    """Cosine of L2-normalised crop and caption embeddings: a dual encoder through
    :func:`mmkit.core.embed.encode_images` / :func:`~mmkit.core.embed.encode_texts` (each crop embedded
    once, captions batched), an ITM model with a contrastive head (BLIP) through that head."""
    from mmkit.core.embed import encode_images, encode_texts
    from mmkit.core.itm import ITM_SCORERS
    from mmkit.evaluate import check_capability

    config = _model_config(model_id, cfg)
    check_capability(BENCHMARK, model_id, config, needs="embed")
    if config.model_type in ITM_SCORERS:
        lm = _load(model_id, "itm", cfg)
        return _by_chunks(probes, lm, cfg, _contrastive_pairs), _record(lm)
    lm = _load(model_id, "dual-encoder", cfg)
    refs, image_of = _unique_images(probes)
    opts = dict(loaded=lm, use_cache=False, batch_size=cfg.backend.batch_size or 32)
    img = encode_images(refs, **opts)
    txt = encode_texts([c for p in probes for c in p.captions], sorted_by_length=True, **opts)
    return _split(np.einsum("nd,nd->n", img[image_of], txt), probes), _record(lm)


@DIRECT_SCORERS.register("itm")
def itm_scores(probes: Sequence[Probe], model_id: str, cfg: SnareConfig) -> tuple[list[np.ndarray], dict]:
    """An ITM model's matching score per (crop, caption) pair through :mod:`mmkit.core.itm`: BLIP's
    softmax(ITM logits)[match], ViLT's single logit; a dual encoder's ``itm`` score is its cosine."""
    from mmkit.core.itm import ITM_SCORERS
    from mmkit.evaluate import check_capability

    config = _model_config(model_id, cfg)
    check_capability(BENCHMARK, model_id, config, needs="itm")
    if config.model_type not in ITM_SCORERS:
        return cosine_scores(probes, model_id, cfg)
    lm = _load(model_id, "itm", cfg)
    return _by_chunks(probes, lm, cfg, _itm_pairs), _record(lm)


def score_direct(data: SnareData, cfg: SnareConfig) -> Optional[dict[str, Any]]:
    """Score the ``cosine``/``itm`` routes with a local model (no generation); None for the
    generation routes and for a predictions file (its lines carry the scores). Each probe's
    ``{"uid", "scores", "route"}`` goes to predictions.jsonl (a valid ``--predictions`` file)."""
    from mmkit.core.backends import resolve_kind

    if data.route not in DIRECT_ROUTES or resolve_kind(cfg.backend, cfg.predictions) == "predictions":
        return None
    scorer: DirectScorer = DIRECT_SCORERS.resolve(data.route, field="--score")
    scores, model = scorer(data.records, _one_model(cfg), cfg)
    answers = {p.id: {"uid": p.id, "scores": s.tolist(), "route": data.route, "error": None}
               for p, s in zip(data.records, scores)}
    return {**score(data, answers, cfg), "models": {"model": model}, "predictions": list(answers.values())}


class _Snare:
    """The ``snare`` entry of the benchmark registry (the hooks of :mod:`mmkit.evaluate.base`)."""

    name = "snare"
    version = "1"
    needs = "generate"  # the yesno/choice routes; cosine/itm check embed/itm in score_direct
    config_class = SnareConfig
    flags = {"--score": "score", "--tie-policy": "tie_policy", "--min-group-size": "min_group_size",
             "--image-root": "image_root"}
    max_new_tokens = 16
    load = staticmethod(load)
    prompt = staticmethod(prompt)
    parse = staticmethod(parse)
    score = staticmethod(score)
    score_direct = staticmethod(score_direct)


BENCHMARK = _Snare()
