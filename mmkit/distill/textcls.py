"""Text-classification tasks shared by ``bert-kd`` and ``pesf`` (distill.md §0).

``--task`` is a GLUE name (:data:`GLUE`, loaded from the hub with ``datasets``), a built-in
offline task (:data:`BUILTIN_TASKS`: ``builtin:sharegpt-match[:train|test]``) or a JSONL/CSV/
parquet file (any source :func:`mmkit.io.read_records` reads) with fields ``text``, optional
``text_pair`` and ``label`` (names configurable). Label rules: integer labels are class ids;
a label column of floats means regression (C = 1); any other labels are strings, mapped to
ids in sorted order and kept as ``label_names`` (the model's ``id2label``). Token type ids come
from the tokenizer; batches are padded dynamically (to the longest row of the batch).

Also here because both methods need them: the ``data`` config section, task metrics, batched
prediction, and loading the teacher classifier with ``teacher.finetune`` (fine-tuning a teacher
that has no classification head for the task).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mmkit.core.data import TokenArrays, length_sorted_batches, pad_flat
from mmkit.distill.common import Indices
from mmkit.errors import ConfigError, DataError, ModelError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

GLUE_HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its hub config, field names, label names (None: regression), metrics, eval split."""

    name: str
    text: str
    text_pair: str | None
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    eval_split: str = "validation"
    label: str = "label"

    @property
    def source(self) -> str:
        """The ``read_records`` hub source, ``nyu-mll/glue:<config>``."""
        return f"{GLUE_HUB_ID}:{self.name}"


#: GLUE names accepted by ``--task`` (metrics follow the GLUE benchmark's own choices).
GLUE: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "sentence", None, ("unacceptable", "acceptable"), ("matthews", "accuracy")),
    GlueTask("sst2", "sentence", None, ("negative", "positive"), ("accuracy",)),
    GlueTask("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    GlueTask("qqp", "question1", "question2", ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    GlueTask("stsb", "sentence1", "sentence2", None, ("pearson", "spearman")),
    GlueTask("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"), ("accuracy",),
             eval_split="validation_matched"),
    GlueTask("mnli-mm", "premise", "hypothesis", ("entailment", "neutral", "contradiction"), ("accuracy",),
             eval_split="validation_mismatched"),
    GlueTask("qnli", "question", "sentence", ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("rte", "sentence1", "sentence2", ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("wnli", "sentence1", "sentence2", ("not_entailment", "entailment"), ("accuracy",)),
)}

#: ``builtin:<name>[:<split>]`` tasks mmkit builds from offline assets: name -> ``fn(split) -> record file``.
BUILTIN_TASKS: Registry = Registry("built-in text task")
BUILTIN_TASKS.register("sharegpt-match", "mmkit.distill.sharegpt_match:task_file")


def builtin_task(task: str, split: str) -> tuple[str, str]:
    """``builtin:<name>[:<split>]`` -> (the split's record file, built on first use; the split);
    any other task is returned unchanged."""
    kind, _, rest = task.partition(":")
    name, _, named_split = rest.partition(":")
    if kind != "builtin" or name not in BUILTIN_TASKS:
        return task, split
    split = named_split or split
    return str(BUILTIN_TASKS.resolve(name)(split)), split


# --------------------------------------------------------------------------- loading


@dataclass
class DataConfig:
    """The ``data`` section of a text-classification method's config."""

    task: str | None = None  # GLUE name or a JSONL/CSV/parquet file / hub id
    eval_task: str | None = None  # --eval-data; default: the GLUE task's validation split
    split: str = "train"
    eval_split: str | None = None
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    revision: str | None = None
    max_len: int = 128
    max_examples: int | None = None
    max_eval_examples: int | None = None


@dataclass
class TextClsSet:
    """A loaded split: texts, optional second texts, labels (int64 ids or float32 targets)."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray
    label_names: list[str] | None  # id order; None for regression
    source: str
    split: str
    fields: dict[str, str | None]
    data: dict[str, Any]  # results.json "data" entry (path, sha256 or fingerprint, n)
    glue: GlueTask | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """C: the number of classes, 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    def id2label(self) -> dict[int, str]:
        return {} if self.label_names is None else dict(enumerate(self.label_names))

    def metric_names(self) -> tuple[str, ...]:
        """GLUE's metrics for its tasks; else Pearson/Spearman (regression) or accuracy."""
        if self.glue is not None:
            return self.glue.metrics
        return ("pearson", "spearman") if self.regression else ("accuracy",)


@dataclass
class TaskFields:
    """Field names in the user's records (``None`` for ``text_pair``: use ``text_pair`` if present)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _label_kind(values: Sequence[Any]) -> str:
    """``int`` (class ids), ``float`` (regression) or ``str`` (names, sorted into ids).

    Python floats always mean regression; CSV cells are parsed as numbers when they look like
    numbers; anything else makes the whole column string labels.
    """
    kinds = set()
    for v in values:
        if isinstance(v, bool) or isinstance(v, (int, np.integer)):
            kinds.add("int")
        elif isinstance(v, (float, np.floating)):
            kinds.add("float")
        elif isinstance(v, str) and _INT.match(v.strip()):
            kinds.add("int")
        elif isinstance(v, str) and _FLOAT.match(v.strip()):
            kinds.add("float")
        else:
            kinds.add("str")
    if "str" in kinds:
        return "str"
    return "float" if "float" in kinds else "int"


def load_textcls(task: str, split: str = "train", *, fields: TaskFields | None = None,
                 label_names: Sequence[str] | None = None, regression: bool | None = None,
                 revision: str | None = None, limit: int | None = None) -> TextClsSet:
    """Load a split of ``task`` (a GLUE name or a record file / hub id).

    ``label_names`` (the training split's) fixes the id mapping of another split; a label not in
    it is a :class:`DataError` at its record. ``regression`` (the training split's) makes an
    evaluation split follow the training split. ``limit`` keeps the first rows.
    """
    from mmkit.io import fingerprint, read_records

    fields = fields or TaskFields()
    glue = GLUE.get(task.lower())
    source, split = (glue.source, split) if glue else builtin_task(task, split)
    text_f = fields.text or (glue.text if glue else "text")
    pair_f = fields.text_pair or (glue.text_pair if glue else None)
    label_f = fields.label or (glue.label if glue else "label")
    required = [text_f, label_f] + ([pair_f] if pair_f else [])
    records = read_records(source, required=required, split=split, revision=revision)
    texts, pairs, labels, where = [], [], [], []
    auto_pair = pair_f is None
    for rec in records:
        if auto_pair and not texts and rec.get("text_pair") is not None:
            pair_f = "text_pair"  # the optional default field, present in the first record
        texts.append(_text(rec, text_f))
        if pair_f:
            pairs.append(_text(rec, pair_f))
        labels.append(rec[label_f])
        where.append(rec)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise DataError(f"no records in split {split!r}", file=source, field="--task")
    names, ids = _labels(labels, where, label_f, label_names, regression,
                         glue.label_names if glue else None)
    data = fingerprint(source, n=len(texts), revision=revision)
    data["split"] = split
    return TextClsSet(texts, pairs if pair_f else None, ids, names, source, split,
                      {"text": text_f, "text_pair": pair_f, "label": label_f}, data, glue)


def load_task(d: DataConfig) -> tuple[TextClsSet, TextClsSet | None]:
    """The training split and the evaluation split (``--eval-data``, else the GLUE validation
    split or a built-in task's test split; ``None`` for a file task without ``--eval-data``),
    which follows the training labels."""
    fields = TaskFields(d.text_field, d.text_pair_field, d.label_field)
    train_set = load_textcls(d.task, d.split, fields=fields, revision=d.revision, limit=d.max_examples)
    builtin = (d.task or "").startswith("builtin:")
    eval_source = d.eval_task or (d.task if train_set.glue else _builtin_name(d.task) if builtin else None)
    if eval_source is None:
        return train_set, None
    if d.eval_split:
        eval_split = d.eval_split
    elif train_set.glue and not d.eval_task:
        eval_split = train_set.glue.eval_split
    else:  # a built-in task's held-out split; a file's only one
        eval_split = "test" if eval_source.startswith("builtin:") else "train"
    eval_set = load_textcls(eval_source, eval_split, fields=fields, revision=d.revision,
                            label_names=train_set.label_names, regression=train_set.regression,
                            limit=d.max_eval_examples)
    return train_set, eval_set


def _builtin_name(task: str) -> str:
    """``builtin:<name>[:<split>]`` -> ``builtin:<name>`` (the evaluation split is chosen apart)."""
    return ":".join(task.split(":")[:2])


def _text(rec: Any, name: str) -> str:
    value = rec[name]
    if not isinstance(value, str):
        raise rec.error(name, f"expected text, got {type(value).__name__}")
    return value


def _labels(values: list[Any], records: list[Any], field_name: str, names: Sequence[str] | None,
            regression: bool | None, glue_names: Sequence[str] | None) -> tuple[list[str] | None, np.ndarray]:
    """(label names in id order or None for regression, label array)."""
    kind = "float" if regression else _label_kind(values)
    if regression is False and kind == "float":
        kind = "str"
    if kind == "float":
        return None, np.asarray([float(v) for v in values], dtype=np.float32)
    if kind == "int":
        ids = np.asarray([int(v) for v in values], dtype=np.int64)
        bad = np.flatnonzero(ids < 0)
        if len(bad):
            raise records[bad[0]].error(field_name, f"expected a class id >= 0, got {ids[bad[0]]} "
                                        "(unlabelled test splits carry -1: use a labelled split)")
        known = list(names or glue_names or [])
        top = int(ids.max())
        if known and top >= len(known):
            raise records[int(np.argmax(ids))].error(
                field_name, f"class id {top} is outside the {len(known)} labels {known}")
        return known or [str(i) for i in range(top + 1)], ids
    strings = [str(v) for v in values]
    vocab = list(names) if names is not None else sorted(set(strings))
    lookup = {s: i for i, s in enumerate(vocab)}
    ids = np.fromiter((lookup.get(s, -1) for s in strings), dtype=np.int64, count=len(strings))
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        raise records[bad[0]].error(field_name, f"label {strings[bad[0]]!r} is not one of the training "
                                    f"labels {vocab}")
    return vocab, ids


# --------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    """A tokenised split: ids and token type ids (None when the tokenizer has none), unpadded."""

    input_ids: TokenArrays
    token_type_ids: TokenArrays | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.input_ids.lengths

    def batch(self, rows: np.ndarray, prefix: str = "") -> dict[str, Any]:
        """``input_ids``, ``attention_mask`` (and ``token_type_ids``) of ``rows``, padded to their longest."""
        ids, mask = pad_flat(self.input_ids, rows, self.pad_id)
        out = {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask}
        if self.token_type_ids is not None:
            out[f"{prefix}token_type_ids"] = pad_flat(self.token_type_ids, rows, 0)[0]
        return out


def encode(tokenizer: Any, data: TextClsSet, max_len: int, chunk: int = 8192) -> Encoded:
    """Tokenise once (truncation to ``max_len``, no padding); token types from the tokenizer."""
    ids, types = [], []
    has_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    for start in range(0, len(data), chunk):
        stop = start + chunk
        enc = tokenizer(data.texts[start:stop], data.pairs[start:stop] if data.pairs else None,
                        truncation=True, max_length=max_len, padding=False,
                        return_attention_mask=False, return_token_type_ids=has_types)
        ids.append(TokenArrays.from_lists(enc["input_ids"]))
        if has_types:
            types.append(TokenArrays.from_lists(enc["token_type_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(TokenArrays.concat(ids), TokenArrays.concat(types) if has_types else None, pad_id)


def encode_both(student_tokenizer: Any, teacher_tokenizer: Any, data: TextClsSet, max_len: int,
                shared: bool) -> tuple[Encoded, Encoded]:
    """``data`` encoded for the student and for the teacher (the same arrays when ``shared``)."""
    s_enc = encode(student_tokenizer, data, max_len)
    return s_enc, s_enc if shared else encode(teacher_tokenizer, data, max_len)


class Collate:
    """Example indices -> a dynamically padded batch plus ``labels``; ``extra`` encodings of the
    same rows are added under their prefix (e.g. ``teacher_`` for a teacher with its own tokenizer)."""

    def __init__(self, encoded: Encoded, labels: np.ndarray, extra: Mapping[str, Encoded] | None = None) -> None:
        self.encoded, self.labels, self.extra = encoded, labels, dict(extra or {})

    def __call__(self, rows: list[int]) -> dict[str, Any]:
        import torch

        rows_a = np.asarray(rows, dtype=np.int64)
        out = self.encoded.batch(rows_a)
        for prefix, enc in self.extra.items():
            out.update(enc.batch(rows_a, prefix))
        out["labels"] = torch.from_numpy(self.labels[rows_a])
        return out


# --------------------------------------------------------------------------- metrics

METRICS: Registry = Registry("text-classification metric")


def _classes(pred: np.ndarray) -> np.ndarray:
    return pred.argmax(-1) if pred.ndim == 2 and pred.shape[1] > 1 else pred.reshape(-1)


@METRICS.register("accuracy")
def accuracy(pred: np.ndarray, labels: np.ndarray) -> float | None:
    """Accuracy in percent."""
    from mmkit.io import percent

    return percent(float((_classes(pred) == labels).sum()), len(labels), "accuracy")


@METRICS.register("f1")
def f1(pred: np.ndarray, labels: np.ndarray) -> float | None:
    """Binary F1 of class 1 in percent (null when class 1 is never predicted nor present)."""
    from mmkit.io import percent

    c = _classes(pred)
    tp = float(((c == 1) & (labels == 1)).sum())
    return percent(2 * tp, float((c == 1).sum() + (labels == 1).sum()), "f1")


@METRICS.register("matthews")
def matthews(pred: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA), in [-1, 1]."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, _classes(pred)))


@METRICS.register("pearson")
def pearson(pred: np.ndarray, labels: np.ndarray) -> float | None:
    """Pearson correlation of the raw outputs (STS-B); null for constant inputs."""
    from scipy.stats import pearsonr

    x = pred.reshape(-1).astype(np.float64)
    return None if np.ptp(x) == 0 or np.ptp(labels) == 0 else float(pearsonr(x, labels)[0])


@METRICS.register("spearman")
def spearman(pred: np.ndarray, labels: np.ndarray) -> float | None:
    """Spearman rank correlation of the raw outputs (STS-B); null for constant inputs."""
    from scipy.stats import spearmanr

    x = pred.reshape(-1).astype(np.float64)
    return None if np.ptp(x) == 0 or np.ptp(labels) == 0 else float(spearmanr(x, labels)[0])


def task_metrics(outputs: np.ndarray, data: TextClsSet) -> dict[str, float | None]:
    """The task's metrics (:meth:`TextClsSet.metric_names`) of model outputs [N, C] against its labels."""
    return {name: METRICS.resolve(name)(outputs, data.labels) for name in data.metric_names()}


def predict(model: Any, encoded: Encoded, batch_size: int = 64,
            forward: Callable[[Any, dict], Any] | None = None) -> np.ndarray:
    """Model outputs [N, C] (float32) in input order, in length-sorted batches under inference_mode.

    ``forward(model, batch)`` returns logits (default: ``model(**batch).logits``).
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows in length_sorted_batches(encoded.lengths, batch_size):
            batch = {k: v.to(device) for k, v in encoded.batch(rows).items()}
            logits = forward(model, batch) if forward else model(**batch).logits
            logits = logits.float().cpu().numpy()
            if out is None:
                out = np.empty((len(encoded), logits.shape[-1]), dtype=np.float32)
            out[rows] = logits
    model.train(was_training)
    return out


def evaluate_classifier(model: Any, encoded: Encoded, data: TextClsSet, batch_size: int = 64) -> dict[str, Any]:
    """The task metrics of a sequence classifier on an encoded split."""
    return task_metrics(predict(model, encoded, batch_size), data)


# --------------------------------------------------------------------------- teacher head and fine-tuning


def label_kwargs(data: TextClsSet) -> dict[str, Any]:
    """``from_pretrained``/config keywords giving a classifier the task's head and label names."""
    out: dict[str, Any] = {"num_labels": data.num_labels,
                           "problem_type": "regression" if data.regression else "single_label_classification"}
    if data.label_names is not None:
        out["id2label"] = data.id2label()
        out["label2id"] = {v: k for k, v in out["id2label"].items()}
    return out


def model_config(name: str, revision: str | None, field_name: str) -> Any:
    """A model's ``AutoConfig`` (hub id, directory or ``bundled:`` name); a :class:`ModelError`
    naming ``field_name`` when it cannot be read."""
    from transformers import AutoConfig

    from mmkit.core.models import resolve_source

    path, _ = resolve_source(name)
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config: {str(exc).splitlines()[0]}", file=name,
                         field=field_name) from exc


def has_classification_head(config: Any) -> bool:
    """Whether a saved model is a sequence classifier (``config.architectures``)."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def check_head(config: Any, data: TextClsSet, what: str = "teacher", file: str | None = None) -> None:
    """An existing head must have the task's label count (C = 1 for regression)."""
    have = int(getattr(config, "num_labels", 0))
    if have != data.num_labels:
        raise ModelError(f"the {what}'s classification head has {have} labels but the task "
                             f"{data.source} has {data.num_labels}"
                             f"{' (regression)' if data.regression else ''}", file=file, field=what)


def needs_finetune(mode: str, config: Any) -> bool:
    """``teacher.finetune``: ``auto`` fine-tunes only a model without a sequence-classification head."""
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"expected auto, true or false, got {mode!r}", field="teacher.finetune")
    return mode == "true" or (mode == "auto" and not has_classification_head(config))


def finetune_defaults() -> Any:
    """Plain fine-tuning as in distill.md §1.2/§2.2: lr 2e-5, 4 epochs, batch 8 (AdamW, linear, 10% warmup)."""
    from mmkit.core.train import TrainConfig

    return TrainConfig(epochs=4, batch_size=8, lr=2e-5, weight_decay=0.01, warmup_ratio=0.1, seed=42)


@dataclass
class FinetuneResult:
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def finetune_classifier(model_id: str, revision: str | None, train_set: TextClsSet, out: Path,
                        train_cfg: Any, max_len: int, eval_set: TextClsSet | None = None,
                        device: str = "auto") -> FinetuneResult:
    """Fine-tune ``model_id`` as a sequence classifier for the task (CE, or MSE for regression)
    with ``core.train.train``; resumable in ``out``; the model is saved in ``out/model``."""
    from mmkit.core.losses import ce_loss
    from mmkit.core.models import load_model
    from mmkit.core.train import train

    lm = load_model(model_id, "sequence-classifier", revision=revision, device=device, dtype="float32",
                    ignore_mismatched_sizes=True, **label_kwargs(train_set))
    encoded = encode(lm.preprocessor, train_set, max_len)

    def loss(model: Any, batch: dict) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        value = ce_loss(model(**inputs).logits, batch["labels"])
        return {"loss": value}

    log.info("fine-tuning the teacher %s on %s (%d examples, %d epochs)", model_id, train_set.source,
             len(train_set), train_cfg.epochs)
    result = train(lm.model, loss, Indices(len(train_set)), train_cfg, out,
                   collate_fn=Collate(encoded, train_set.labels), preprocessor=lm.preprocessor)
    metrics: dict[str, Any] = {"steps": result.step}
    if eval_set is not None:
        metrics["eval"] = evaluate_classifier(lm.model, encode(lm.preprocessor, eval_set, max_len), eval_set)
    return FinetuneResult(result.model_dir, metrics)


def load_teacher(teacher: Any, data: TextClsSet, run_dir: Path | None, eval_set: TextClsSet | None = None, *,
                 command: str, max_len: int, device: str = "auto", trainable: bool = False,
                 check: Callable[[Any], Any] | None = None,
                 skip_finetune: str | None = None) -> tuple[Any, str, dict[str, Any] | None]:
    """The teacher classifier ``(LoadedModel, path, fine-tuning metrics)`` in eval mode, frozen
    unless ``trainable``, from a method's ``teacher`` section (``id``, ``revision``, ``finetune``,
    ``train``): fine-tuned first into ``run_dir/teacher_finetune`` when ``teacher.finetune`` asks
    for it (distill.md §1.2, §2.2), its head checked against the task, then ``check(model)`` (the
    method's own model check). ``skip_finetune``: a teacher that needs fine-tuning is loaded with a
    new head instead, and this reason is logged. ``command`` names the method in errors."""
    from mmkit.core.models import load_model

    config = model_config(teacher.id, teacher.revision, "teacher.id")
    mode = {True: "true", False: "false"}.get(teacher.finetune, teacher.finetune)
    path, revision, metrics, new_head = teacher.id, teacher.revision, None, {}
    if needs_finetune(mode, config) and skip_finetune:
        log.info("%s", skip_finetune)
        new_head = {"ignore_mismatched_sizes": True, **label_kwargs(data)}
    elif needs_finetune(mode, config):
        if run_dir is None:
            raise ConfigError("the teacher has no classification head for the task and must be fine-tuned "
                              f"first: run mmkit distill {command} (which fine-tunes it), or pass a fine-tuned "
                              "teacher", field="teacher.finetune")
        result = finetune_classifier(teacher.id, teacher.revision, data, run_dir / "teacher_finetune",
                                     teacher.train, max_len, eval_set, device=device)
        path, revision, metrics = str(result.path), None, result.metrics
    else:
        check_head(config, data, "teacher", file=teacher.id)
    lm = load_model(path, "sequence-classifier", revision=revision, device=device, dtype="float32", **new_head)
    check_head(lm.model.config, data, "teacher", file=teacher.id)
    if check is not None:
        check(lm.model)
    lm.model.eval().requires_grad_(trainable)
    return lm, path, metrics
