"""``mmkit evaluate mmr``: robustness to leading questions (evaluate.md §3).

MMR pairs a positive question about an image with a negative, leading one built on a false
premise. ``load`` reads and checks ``MMR-benchmark.json`` (or a JSON/JSONL of the same records)
and groups the records into pairs **by id**, never by position; ``prompt`` sends each question
verbatim with the official instruction; ``score`` re-parses every raw answer
(:func:`mmkit.evaluate.metrics.choice.parse_mmr`, ``--parse-rule official|first``) and reports
RA, misleading rate and POS/NEG accuracy overall (micro over pairs), per level and per category.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from mmkit.errors import ConfigError, DataError
from mmkit.evaluate.base import EvalConfig, Loaded, Request
from mmkit.evaluate.metrics.choice import LETTERS, UNPARSED, Answer, parse_mmr, robustness_metrics
from mmkit.io import Record, read_records, sha256_file

#: The release's annotation file, looked up when ``--data`` is a folder.
DATA_FILE = "MMR-benchmark.json"
#: The official instruction appended to every question (byte-identical).
INSTRUCTION = "Answer with the option's letter from the given choices directly."
QUESTION_TYPES = ("POS", "NEG")
#: Totals of the release (a data set of another size is scored with a warning).
RELEASE_RECORDS, RELEASE_PAIRS = 600, 300
FIELDS = ("id", "image", "question", "ground_truth", "question_type")


@dataclass
class MMRConfig(EvalConfig):
    """``mmkit evaluate mmr`` options: the common ones plus the answer parser."""

    parse_rule: Literal["official", "first"] = "official"


@dataclass(frozen=True)
class Question:
    """One MMR record: ``uid = {id}#{k}`` (k = 0/1 in file order within the id)."""

    uid: str
    id: str
    image: str  # the resolved image path
    question: str
    ground_truth: str
    question_type: str
    qhash: str
    source: str
    line: int | str


@dataclass(frozen=True)
class Pair:
    """The two questions sharing an id (file order), the unit MMR scores and ``--limit`` counts."""

    id: str
    questions: tuple[Question, ...]

    @property
    def level(self) -> str:
        return self.id.split("/")[0]

    @property
    def category(self) -> str:
        return self.id.rsplit("/", 1)[0]


@dataclass
class MMRData(Loaded):
    """Loaded MMR data: ``records`` are :class:`Pair` objects; ``by_id`` indexes them."""

    by_id: dict[str, Pair] = field(default_factory=dict)

    def questions(self) -> list[Question]:
        return [q for pair in self.records for q in pair.questions]


def qhash(question: str) -> str:
    """The first 12 hex digits of SHA-256 of the question text (stored in each prediction line)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def annotation_file(data: Optional[str]) -> Path:
    """The annotation file ``--data`` names: the file itself, or ``MMR-benchmark.json`` in a folder."""
    if not data:
        raise ConfigError("give --data: the MMR folder or its MMR-benchmark.json", field="--data")
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / DATA_FILE
        if not path.is_file():
            raise DataError(f"no {DATA_FILE} in this folder", file=data, field="--data")
    elif not path.is_file():
        raise DataError("no such file or directory", file=data, field="--data")
    return path


def _check(rec: Record) -> None:
    """The per-record rules of evaluate.md §3 "Validation"."""
    for name in FIELDS:
        rec.require(name, str)
    if rec["ground_truth"] not in LETTERS:
        raise rec.error("ground_truth", f"expected one of {', '.join(LETTERS)}, got {rec['ground_truth']!r}")
    if rec["question_type"] not in QUESTION_TYPES:
        raise rec.error("question_type", f"expected POS or NEG, got {rec['question_type']!r}")
    if len(parts := rec["id"].split("/")) != 3 or not all(parts):
        raise rec.error("id", f"expected level/category/NN (three '/' segments), got {rec['id']!r}")


def _image_path(rec: Record, folder: Path, check: bool) -> str:
    """``<folder>/<image>`` or ``<folder>/images/<image>``, whichever exists; with ``check``, neither
    is a :class:`DataError` naming the record (without it, e.g. scoring a predictions file, the first)."""
    candidates = [folder / rec["image"], folder / "images" / rec["image"]]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and check:
        raise rec.error("image", f"image file not found: {candidates[0]} (nor {candidates[1]})")
    return str(found or candidates[0])


def _anomalies(pair: Pair) -> list[dict[str, Any]]:
    """Pairs the release does not lead one to expect: differing images, or not one POS + one NEG."""
    first = pair.questions[0]
    where = {"id": pair.id, "uids": [q.uid for q in pair.questions], "file": first.source, "line": first.line}
    found = []
    types = sorted(q.question_type for q in pair.questions)
    if types != ["NEG", "POS"]:
        found.append({"kind": "question_types", **where, "question_types": [q.question_type for q in pair.questions],
                      "message": f"{pair.id}: pair typed {'/'.join(types)}, not one POS and one NEG; "
                                 "misled = exactly one right and that one typed POS"})
    if len({q.image for q in pair.questions}) > 1:
        found.append({"kind": "images_differ", **where, "images": [q.image for q in pair.questions],
                      "message": f"{pair.id}: the two questions show different images"})
    return found


def load(cfg: MMRConfig) -> MMRData:
    """Read, check and pair the MMR records (evaluate.md §3 "Data", "Validation"); ``cfg.limit``
    keeps the first N pairs (file order of their first record)."""
    path = annotation_file(cfg.data)
    folder = path.parent
    groups: dict[str, list[Record]] = defaultdict(list)
    for rec in read_records(str(path)):
        _check(rec)
        group = groups[rec["id"]]
        if len(group) == 2:
            first = group[0]
            raise rec.error("id", f"a third record for id {rec['id']!r} (others at {first.source}:{first.loc} "
                                  f"and line {group[1].loc}); every id needs exactly two")
        group.append(rec)
    pairs = []
    for pid, group in groups.items():
        if len(group) != 2:
            raise group[0].error("id", f"id {pid!r} has one record; every id needs exactly two (POS and NEG)")
        questions = tuple(
            Question(uid=f"{pid}#{k}", id=pid, image=_image_path(rec, folder, check=not cfg.predictions),
                     question=rec["question"], ground_truth=rec["ground_truth"], question_type=rec["question_type"],
                     qhash=qhash(rec["question"]), source=rec.source, line=rec.loc)
            for k, rec in enumerate(group))
        pairs.append(Pair(pid, questions))
    if cfg.limit is not None:
        pairs = pairs[:cfg.limit]
    if not pairs:
        raise DataError("no MMR records", file=str(path), field="--data")
    return MMRData(records=pairs, path=str(path), sha256=sha256_file(path),
                   anomalies=[a for pair in pairs for a in _anomalies(pair)], by_id={p.id: p for p in pairs})


def prompt(data: MMRData, cfg: MMRConfig) -> list[Request]:
    """One request per question: the image, then the question verbatim, a newline and the official
    instruction (evaluate.md §3 "Prompt"). Prediction lines carry ``question_type`` and ``qhash``."""
    return [Request(uid=q.uid, text=f"{q.question}\n{INSTRUCTION}", images=(q.image,),
                    extras={"question_type": q.question_type, "qhash": q.qhash, "parse_rule": cfg.parse_rule})
            for q in data.questions()]


def parse(text: str, request: Request) -> str:
    """The ``parsed`` copy of an answer: its letter under the request's parse rule, ``E`` if none."""
    return parse_mmr(text, request.extras.get("parse_rule", "official"))


def uid_of(line: Mapping[str, Any], data: MMRData) -> Optional[str]:
    """The uid a predictions line without ``uid`` names by ``id`` + ``question_type`` (evaluate.md
    §2.3): ``None`` if it gives neither; a uid unknown to the data if no record matches; an error if
    two do (the POS/POS pair needs ``uid``)."""
    pid, qtype = line.get("id"), line.get("question_type")
    if pid is None or qtype is None:
        return None
    pair = data.by_id.get(str(pid))
    matches = [q.uid for q in pair.questions if q.question_type == qtype] if pair else []
    if len(matches) > 1:
        raise DataError(f"id {pid!r} with question_type {qtype!r} names {len(matches)} records "
                        f"({', '.join(matches)}); give their uid instead",
                        file=getattr(line, "source", None), line=getattr(line, "loc", None), field="question_type")
    return matches[0] if matches else f"{pid}#{qtype}"


def _check_line(q: Question, line: Mapping[str, Any], cfg: MMRConfig) -> None:
    """A prediction line must agree with the data on ``question_type`` and ``qhash`` when it gives them."""
    for name, expected in (("question_type", q.question_type), ("qhash", q.qhash)):
        got = line.get(name)
        if got is not None and got != expected:
            raise DataError(f"uid {q.uid}: {got!r} does not match the data's {expected!r} (data changed since "
                            "this answer? use --overwrite or another --out)",
                            file=getattr(line, "source", None) or cfg.predictions or "predictions.jsonl",
                            line=getattr(line, "loc", None), field=name)


def _score_question(q: Question, line: Optional[Mapping[str, Any]], cfg: MMRConfig) -> tuple[Answer, bool]:
    """(the question's :class:`Answer`, whether a delivered answer named no letter); a missing or
    errored answer is wrong but not "unparsed"."""
    if line is None or line.get("error") is not None:
        return Answer(False, q.question_type), False
    _check_line(q, line, cfg)
    letter = parse_mmr(str(line.get("prediction") or ""), cfg.parse_rule)
    return Answer(letter == q.ground_truth, q.question_type), letter == UNPARSED


def score(data: MMRData, answers: Mapping[str, Mapping[str, Any]], cfg: MMRConfig) -> dict[str, Any]:
    """RA, misleading rate, POS/NEG accuracy and the unparsed count, overall (micro over pairs),
    per category and per level (evaluate.md §3 "Metrics"); undefined rates are ``None`` with a warning."""
    names = ["overall", *dict.fromkeys(p.category for p in data.records), *dict.fromkeys(p.level for p in data.records)]
    groups: dict[str, list[tuple[Answer, ...]]] = {name: [] for name in names}
    unparsed = dict.fromkeys(names, 0)
    for pair in data.records:
        scored = [_score_question(q, answers.get(q.uid), cfg) for q in pair.questions]
        for name in ("overall", pair.category, pair.level):
            groups[name].append(tuple(answer for answer, _ in scored))
            unparsed[name] += sum(flag for _, flag in scored)
    blocks = {name: {**robustness_metrics(pairs), "n_unparsed": unparsed[name]} for name, pairs in groups.items()}
    warnings = [f"{name}: {key} is undefined (zero denominator); reported as null"
                for name, block in blocks.items() for key, value in block.items() if value is None]
    n_questions = sum(len(p.questions) for p in data.records)
    if (n_questions, len(data.records)) != (RELEASE_RECORDS, RELEASE_PAIRS):
        warnings.insert(0, f"{n_questions} records / {len(data.records)} pairs, not the release's "
                           f"{RELEASE_RECORDS} / {RELEASE_PAIRS} (a subset or another version)")
    overall = blocks.pop("overall")
    return {"metrics": overall, "per_category": blocks, "anomalies": list(data.anomalies), "warnings": warnings}


class _MMR:
    """The ``mmr`` entry of the benchmark registry (the hooks of :mod:`mmkit.evaluate.base`)."""

    name = "mmr"
    version = "1"
    needs = "generate"
    config_class = MMRConfig
    flags = {"--parse-rule": "parse_rule"}
    max_new_tokens = 32
    load = staticmethod(load)
    prompt = staticmethod(prompt)
    parse = staticmethod(parse)
    uid_of = staticmethod(uid_of)
    score = staticmethod(score)


BENCHMARK = _MMR()
