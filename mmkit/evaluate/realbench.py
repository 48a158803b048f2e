"""``mmkit evaluate realbench``: Chinese multi-image understanding (evaluate.md §4).

The record schema is mmkit's own and is defined once, here (:func:`check_record`); ``build-dataset
realbench`` validates against the same function. ``load`` reads ``samples.jsonl`` (images relative
to the file), ``prompt`` numbers the images ``图1：`` … before the question, options and the
instruction of the answer type, and ``score`` re-parses every raw answer with the pure functions
of :mod:`mmkit.evaluate.metrics.text`: choice / image-index accuracy, exact-order accuracy and
Kendall τ, character F1 and ROUGE-L (optional jieba word F1) for text. Blocks per task and overall
(``macro`` over task primaries, ``micro`` over samples) carry n, unparsed, partial and failed counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from mmkit.errors import ConfigError, DataError, MissingExtraError, suggest
from mmkit.evaluate.base import EvalConfig, Loaded, Request
from mmkit.evaluate.metrics import text as tm
from mmkit.io import Record, read_records, sha256_file

TASKS: tuple[str, ...] = ("retrieval", "ranking", "extraction", "reasoning")
ANSWER_TYPES: tuple[str, ...] = ("choice", "image_index", "order", "text")
#: The instruction closing each prompt, by answer type (evaluate.md §4 "Prompt").
INSTRUCTIONS = {
    "choice": "请直接回答选项字母。",
    "image_index": "请直接回答图片编号。",
    "order": "请按顺序列出全部图片编号，用英文逗号分隔，例如 2,1,3。",
    "text": "请直接给出答案，不要解释。",
}
#: Generation budget by answer type (evaluate.md §4).
MAX_NEW_TOKENS = {"choice": 64, "image_index": 64, "order": 64, "text": 256}
#: Each task's primary metric (evaluate.md §4); a sample whose answer type lacks it counts by correctness.
PRIMARY = {"retrieval": "accuracy", "ranking": "exact_order_accuracy", "extraction": "char_f1",
           "reasoning": "accuracy"}
#: The 0/100 correctness metric of each answer type.
CORRECTNESS = {"choice": "accuracy", "image_index": "accuracy", "order": "exact_order_accuracy", "text": "accuracy"}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class RealBenchConfig(EvalConfig):
    """``mmkit evaluate realbench`` options: the common ones plus the task subset and word F1."""

    tasks: list[str] = field(default_factory=list)  # empty: every task in the data
    word_f1: bool = False

    def validate(self) -> None:
        """``--tasks`` may repeat or hold a comma-separated list; each must be a known task."""
        self.tasks = [t.strip() for item in self.tasks for t in item.split(",") if t.strip()]
        for task in self.tasks:
            if task not in TASKS:
                raise ConfigError(f"expected one of {', '.join(TASKS)}, got {task!r}{suggest(task, TASKS)}",
                                  field="--tasks")


@dataclass(frozen=True)
class Sample:
    """One checked RealBench record; ``answer`` is a letter, a 1-based index, a tuple of indices or text."""

    id: str
    task: str
    images: tuple[str, ...]  # resolved paths
    question: str
    options: Optional[tuple[str, ...]]
    answer_type: str
    answer: Any
    references: tuple[str, ...] = ()
    meta: Optional[Mapping[str, Any]] = None

    @property
    def golds(self) -> tuple[str, ...]:
        """Accepted texts of a text answer: the answer, then the references."""
        return (self.answer, *self.references)


# --------------------------------------------------------------------------- schema


def _strings(rec: Record, name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise rec.error(name, f"expected a non-empty list of strings, got {value!r}")
    for k, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise rec.error(f"{name}[{k}]", f"expected a non-empty string, got {item!r}")
    return tuple(value)


def _answer(rec: Record, answer_type: str, n_images: int, options: Optional[tuple[str, ...]]) -> Any:
    """The checked ``answer`` of each answer type (evaluate.md §4 "Checks")."""
    answer = rec.get("answer")
    if answer_type == "choice":
        if options is None:
            raise rec.error("options", "a choice answer needs options (a list of strings)")
        valid = LETTERS[:len(options)]
        if not isinstance(answer, str) or len(answer) != 1 or answer not in valid:
            raise rec.error("answer", f"expected an option letter {valid[0]}-{valid[-1]}, got {answer!r}")
        return answer
    if answer_type == "image_index":
        k = int(answer) if isinstance(answer, str) and answer.isascii() and answer.isdigit() else answer
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_images:
            raise rec.error("answer", f"expected an image index \"1\"..\"{n_images}\", got {answer!r}")
        return k
    if answer_type == "order":
        if n_images < 2:
            raise rec.error("images", "an order answer needs at least 2 images")
        if (not isinstance(answer, list) or any(isinstance(k, bool) or not isinstance(k, int) for k in answer)
                or sorted(answer) != list(range(1, n_images + 1))):
            raise rec.error("answer", f"expected a permutation of 1..{n_images}, got {answer!r}")
        return tuple(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise rec.error("answer", f"expected a non-empty text, got {answer!r}")
    return answer


def check_record(rec: Record, root: Path, check_files: bool = True) -> Sample:
    """Check one record against the RealBench schema (evaluate.md §4) and resolve its images under
    ``root`` (the file's folder); every mistake is a :class:`DataError` naming file, line and field."""
    rid = rec.require("id", str)
    task = rec.require("task", str)
    if task not in TASKS:
        raise rec.error("task", f"expected one of {', '.join(TASKS)}, got {task!r}")
    images = tuple(str(root / p) for p in _strings(rec, "images", rec.get("images")))
    if check_files:
        for k, path in enumerate(images):
            if not Path(path).is_file():
                raise rec.error(f"images[{k}]", f"image file not found: {path}")
    question = rec.require("question", str)
    options = rec.get("options")
    options = None if options is None else _strings(rec, "options", options)
    answer_type = rec.require("answer_type", str)
    if answer_type not in ANSWER_TYPES:
        raise rec.error("answer_type", f"expected one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
    answer = _answer(rec, answer_type, len(images), options)
    references = rec.get("references")
    references = () if references is None else _strings(rec, "references", references)
    meta = rec.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise rec.error("meta", f"expected an object, got {type(meta).__name__}")
    return Sample(rid, task, images, question, options, answer_type, answer, references, meta)


# --------------------------------------------------------------------------- hooks


def load(cfg: RealBenchConfig) -> Loaded:
    """Read and check ``--data`` (a samples JSONL); keep ``--tasks`` and the first ``--limit`` samples."""
    if not cfg.data:
        raise ConfigError("give --data: a RealBench samples.jsonl", field="--data")
    path = Path(cfg.data).expanduser()
    if not path.is_file():
        raise DataError("no such file", file=cfg.data, field="--data")
    samples: list[Sample] = []
    first_line: dict[str, Any] = {}
    for rec in read_records(str(path)):
        sample = check_record(rec, path.parent)
        if sample.id in first_line:
            raise rec.error("id", f"duplicate id {sample.id!r} (first at line {first_line[sample.id]})")
        first_line[sample.id] = rec.loc
        if not cfg.tasks or sample.task in cfg.tasks:
            samples.append(sample)
    if cfg.limit is not None:
        samples = samples[:cfg.limit]
    if not samples:
        wanted = f" of the tasks {', '.join(cfg.tasks)}" if cfg.tasks else ""
        raise DataError(f"no RealBench samples{wanted}", file=cfg.data, field="--data")
    return Loaded(records=samples, path=str(path), sha256=sha256_file(path))


def prompt_text(sample: Sample) -> str:
    """The question, its ``A. …`` option lines and the answer type's instruction (evaluate.md §4)."""
    lines = [sample.question]
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(sample.options or ())]
    lines.append(INSTRUCTIONS[sample.answer_type])
    return "\n".join(lines)


def prompt(data: Loaded, cfg: RealBenchConfig) -> list[Request]:
    """One request per sample interleaving ``图{i}：`` and image i, then :func:`prompt_text`
    (a backend in ``tile`` mode sends one numbered grid instead, evaluate.md §2.4)."""
    requests = []
    for s in data.records:
        parts: list[tuple[str, Any]] = []
        for i, image in enumerate(s.images, 1):
            parts += [("text", f"图{i}：" if i == 1 else f"\n图{i}："), ("image", image)]
        parts.append(("text", "\n" + prompt_text(s)))
        extras = {"task": s.task, "answer_type": s.answer_type, **({"options": list(s.options)} if s.options else {})}
        requests.append(Request.from_parts(s.id, parts, extras=extras, max_new_tokens=MAX_NEW_TOKENS[s.answer_type]))
    return requests


def _parse(text: str, answer_type: str, n_images: int, options: tuple[str, ...]) -> tuple[Any, bool]:
    """(parsed answer or None, partial) for an answer type (evaluate.md §4 "Parsing")."""
    if answer_type == "choice":
        return tm.parse_letter(text, options), False
    if answer_type == "image_index":
        return tm.parse_image_index(text, n_images), False
    if answer_type == "order":
        return tm.parse_order(text, n_images)
    return text.strip(), False


def parse(text: str, request: Request) -> Any:
    """The ``parsed`` copy: a letter, an index, an order list or the stripped text (None: unparsed)."""
    return _parse(text, request.extras["answer_type"], len(request.images),
                  tuple(request.extras.get("options", ())))[0]


# --------------------------------------------------------------------------- score


@dataclass(frozen=True)
class SampleScore:
    """One sample's metrics (0-100, Kendall τ in [-1, 1]) and flags."""

    task: str
    metrics: dict[str, float]
    primary: float
    unparsed: bool = False
    partial: bool = False
    failed: bool = False


def score_sample(sample: Sample, line: Optional[Mapping[str, Any]], word_f1: bool = False) -> SampleScore:
    """Score one answer (evaluate.md §4 "Metrics"); a missing, errored or unparsed answer scores 0
    everywhere (τ = 0)."""
    failed = line is None or line.get("error") is not None
    text = "" if failed else str(line.get("prediction") or "")
    parsed, partial = (None, False) if failed else _parse(text, sample.answer_type, len(sample.images),
                                                          sample.options or ())
    if sample.answer_type == "text":
        golds = sample.golds
        metrics = {"accuracy": 100.0 * any(tm.normalize_text(text) == tm.normalize_text(g) for g in golds),
                   "char_f1": max(tm.char_f1(text, g) for g in golds),
                   "rouge_l": max(tm.rouge_l(text, g) for g in golds)}
        if word_f1:
            metrics["word_f1"] = max(tm.word_f1(text, g) for g in golds)
        if failed:
            metrics = dict.fromkeys(metrics, 0.0)
    else:
        got = tuple(parsed) if isinstance(parsed, list) else parsed  # an order answer is a tuple
        metrics = {CORRECTNESS[sample.answer_type]: 100.0 * (got is not None and got == sample.answer)}
        if sample.answer_type == "order":
            metrics["kendall_tau"] = 0.0 if parsed is None else tm.kendall_tau(parsed, sample.answer)
    primary = metrics.get(PRIMARY[sample.task], metrics[CORRECTNESS[sample.answer_type]])
    return SampleScore(sample.task, metrics, primary, unparsed=not failed and parsed is None, partial=partial,
                       failed=failed)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def block_metrics(scores: list[SampleScore]) -> dict[str, Any]:
    """A block's means of every metric its samples carry, ``kendall_tau_percent`` = 100·(mean τ + 1)/2,
    ``primary`` (mean per-sample primary) and the counts ``n``, ``n_unparsed``, ``n_partial``, ``n_failed``."""
    keys = list(dict.fromkeys(k for s in scores for k in s.metrics))
    out: dict[str, Any] = {k: _mean([s.metrics[k] for s in scores if k in s.metrics]) for k in keys}
    if "kendall_tau" in out:
        out["kendall_tau_percent"] = 100.0 * (out["kendall_tau"] + 1) / 2
    out["primary"] = _mean([s.primary for s in scores])
    out.update(n=len(scores), n_unparsed=sum(s.unparsed for s in scores), n_partial=sum(s.partial for s in scores),
               n_failed=sum(s.failed for s in scores))
    return out


def score(data: Loaded, answers: Mapping[str, Mapping[str, Any]], cfg: RealBenchConfig) -> dict[str, Any]:
    """Per-task blocks and the overall block: ``macro`` (mean of the task primaries present),
    ``micro`` (mean per-sample primary), ``<task>_<primary>`` and the counts (evaluate.md §4)."""
    extra: dict[str, Any] = {}
    if cfg.word_f1:
        try:
            import jieba
        except ImportError:
            raise MissingExtraError("jieba", "zh", "--word-f1") from None
        extra["word_f1_tokenizer"] = f"jieba {jieba.__version__} (cut_all=False)"
    scores = [score_sample(s, answers.get(s.id), cfg.word_f1) for s in data.records]
    per_task = {task: block_metrics([s for s in scores if s.task == task])
                for task in TASKS if any(s.task == task for s in scores)}
    overall = block_metrics(scores)
    metrics = {"macro": _mean([b["primary"] for b in per_task.values()]), "micro": overall["primary"],
               **{f"{task}_{PRIMARY[task]}": b["primary"] for task, b in per_task.items()},
               **{k: overall[k] for k in ("n", "n_unparsed", "n_partial", "n_failed")}}
    return {"metrics": metrics, "per_category": per_task, "anomalies": list(data.anomalies), "warnings": [], **extra}


class _RealBench:
    """The ``realbench`` entry of the benchmark registry (the hooks of :mod:`mmkit.evaluate.base`)."""

    name = "realbench"
    version = "1"
    needs = "generate"
    config_class = RealBenchConfig
    flags = {"--tasks": "tasks", "--word-f1": "word_f1"}
    max_new_tokens = 64
    #: every task: a predictions file's lines for tasks ``--tasks`` leaves out are ignored, not extra
    unfiltered = {"tasks": []}
    load = staticmethod(load)
    prompt = staticmethod(prompt)
    parse = staticmethod(parse)
    score = staticmethod(score)


BENCHMARK = _RealBench()
