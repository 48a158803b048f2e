"""PESF-KD: parameter-efficient and student-friendly knowledge distillation (distill.md §2).

Rao et al. (IEEE TMM 2023; code 1170300319/PESF-KD) see the teacher-student mismatch as a gap in
the *sharpness* of their output distributions and close it with a small adapter on the frozen
teacher: the adapter's logits are added to the teacher classifier's, and the adapter trains
jointly with the student on a soft loss, both cross-entropies and a patient-KD [CLS] loss, so
the teacher's soft labels become smoother, i.e. student-friendly.

Faithful by default (teacher backbone and classifier frozen, eval mode, ``no_grad``; the adapter
in train mode; clipping over student and adapter). ``reproduce_released`` mimics the released
NLP code (§2.5): the whole teacher trains at ``teacher.lr``, the adapter's dropout is inactive
(the teacher never enters train mode) and only the student's gradients are clipped. The
reference bugs of §2.6 are never copied: d_t is read from the teacher config, [CLS] vectors are
taken at position 0 of each (dynamically padded) batch, token types come from the tokenizer,
the L2 normalisation has an epsilon and regression gets an MSE soft loss.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmkit.core.losses import ce_loss, is_regression
from mmkit.core.train import Callback, ParamGroup, TrainConfig, TrainState, train
from mmkit.distill import textcls
from mmkit.distill.common import StepStats, param_count, param_counts, saver
from mmkit.distill.teacher_cache import CacheConfig, Target, open_cache, text_key_parts, tokenizer_fingerprint
from mmkit.errors import ConfigError, ModelError
from mmkit.io import RunDir, atomic_dir, atomic_write, write_json

log = logging.getLogger("mmkit")

COMMAND = "distill pesf"
ADAPTER_WEIGHTS = "teacher_adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BEFORE_FILE = "pesf_before.json"  # teacher and initial-student evaluation, kept for resumed runs
STATE_FILE = "pesf_state.json"  # loss-term sums, saved with every checkpoint
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
TEACHER_PREFIX = "teacher_"  # batch keys of the teacher's own encoding when its tokenizer differs


# --------------------------------------------------------------------------- configuration


def _train_defaults() -> TrainConfig:
    """§2.4: AdamW (eps 1e-8, weight decay 0), student lr 5e-5, no warmup, linear decay to 0,
    gradient clip 1.0, 4 epochs, batch 8, seed 44."""
    return TrainConfig(epochs=4, batch_size=8, lr=5e-5, optimizer="adamw", weight_decay=0.0, eps=1e-8,
                       scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0, seed=44)


@dataclass
class TeacherConfig:
    id: str | None = None
    revision: str | None = None
    finetune: bool | str = "auto"  # auto: fine-tune first when the model has no classification head
    lr: float = 1e-5  # --reproduce-released only: the rate the whole teacher trains at
    train: TrainConfig = field(default_factory=textcls.finetune_defaults)


@dataclass
class StudentConfig:
    id: str | None = None
    revision: str | None = None
    num_layers: int | None = None  # keep the first N layers (None: all)


@dataclass
class AdapterConfig:
    r: int = 64
    dropout: float = 0.1
    lr: float = 1e-5


@dataclass
class LossConfig:
    alpha: float = 0.7  # the reference README run (the script's own default is 0.5)
    beta: float = 100.0
    temperature: float = 5.0


@dataclass
class PesfConfig:
    """Everything ``mmkit distill pesf`` takes (built by ``mmkit.config.load_config``)."""

    method: str = "pesf"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: textcls.DataConfig = field(default_factory=textcls.DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reproduce_released: bool = False
    train: TrainConfig = field(default_factory=_train_defaults)
    eval_batch_size: int = 64
    cache: CacheConfig = field(default_factory=CacheConfig)
    device: str = "auto"

    def validate(self) -> None:
        if self.method != "pesf":
            raise ConfigError(f"expected method pesf, got {self.method!r}", field="method")
        if not self.teacher.id:
            raise ConfigError("expected a teacher fine-tuned on the task (--teacher ID_OR_DIR)", field="teacher.id")
        if not self.student.id:
            raise ConfigError("expected a pretrained student (--student ID_OR_DIR)", field="student.id")
        if not self.data.task:
            raise ConfigError("expected a task: a GLUE name or a JSONL/CSV/parquet file (--task)", field="data.task")
        if isinstance(self.teacher.finetune, str) and self.teacher.finetune not in ("auto", "true", "false"):
            raise ConfigError(f"expected auto, true or false, got {self.teacher.finetune!r}", field="teacher.finetune")
        if self.student.num_layers is not None and self.student.num_layers < 1:
            raise ConfigError(f"expected an integer >= 1, got {self.student.num_layers}", field="student.num_layers")
        if not 0.0 <= self.loss.alpha <= 1.0:
            raise ConfigError(f"expected a weight in [0, 1], got {self.loss.alpha}", field="loss.alpha")
        if self.loss.beta < 0:
            raise ConfigError(f"expected a weight >= 0, got {self.loss.beta}", field="loss.beta")
        if self.loss.temperature <= 0:
            raise ConfigError(f"expected a positive temperature, got {self.loss.temperature}",
                              field="loss.temperature")
        if self.adapter.r < 1:
            raise ConfigError(f"expected an integer >= 1, got {self.adapter.r}", field="adapter.r")
        if not 0.0 <= self.adapter.dropout < 1.0:
            raise ConfigError(f"expected a probability in [0, 1), got {self.adapter.dropout}", field="adapter.dropout")
        for name, lr in (("adapter.lr", self.adapter.lr), ("teacher.lr", self.teacher.lr)):
            if lr <= 0:
                raise ConfigError(f"expected a positive learning rate, got {lr}", field=name)
        if self.reproduce_released and self.cache.mode == "on":
            raise ConfigError("--reproduce-released trains the teacher, so its targets cannot be cached: "
                              "drop --cache", field="cache.mode")


# --------------------------------------------------------------------------- the adapter (§2.3)


class Adapter(nn.Module):
    """The teacher adapter of §2.3: a linear branch plus a bottleneck branch with dropout on its
    output, ``(W_1 h + b_1) + Drop(W_3 ReLU(W_2 h + b_2) + b_3)``, added to the frozen teacher
    classifier's logits. W_1 ∈ R^{C×d_t}, W_2 ∈ R^{r×d_t}, W_3 ∈ R^{C×r}; BERT init
    (normal(0, 0.02) weights, zero biases)."""

    def __init__(self, hidden: int, num_labels: int, r: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, num_labels)  # W_1, b_1
        self.down = nn.Linear(hidden, r)  # W_2, b_2
        self.up = nn.Linear(r, num_labels)  # W_3, b_3
        self.dropout = nn.Dropout(dropout)
        self.settings = {"d_t": hidden, "r": r, "num_labels": num_labels, "dropout": dropout}
        for layer in (self.linear, self.down, self.up):
            nn.init.normal_(layer.weight, mean=0.0, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled) + self.dropout(self.up(torch.relu(self.down(pooled))))


def adapted_logits(teacher_logits: torch.Tensor, pooled: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """``z_t^a = (W_c h + b_c) + adapter(h)`` (§2.3): the frozen classifier's logits plus the adapter's."""
    return teacher_logits + adapter(pooled)


def save_adapter(adapter: Adapter, directory: str | os.PathLike, teacher: Mapping[str, Any]) -> None:
    """``teacher_adapter.safetensors`` + ``adapter_config.json`` (teacher id and revision, d_t, r, C)."""
    from safetensors.torch import save

    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    with atomic_write(directory / ADAPTER_WEIGHTS, "wb") as fh:
        fh.write(save(tensors))
    write_json(directory / ADAPTER_CONFIG, {"method": "pesf", "teacher": dict(teacher), **adapter.settings,
                                            "params": param_count(adapter)})


def load_adapter(directory: str | os.PathLike) -> Adapter:
    """The adapter saved by :func:`save_adapter` (in eval mode)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    settings = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    adapter = Adapter(settings["d_t"], settings["num_labels"], settings["r"], settings["dropout"])
    adapter.load_state_dict(load_file(str(directory / ADAPTER_WEIGHTS)))
    return adapter.eval()


# --------------------------------------------------------------------------- losses and sharpness (§2.3)


def soft_loss(adapted_teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """``L_soft = T² · mean_{b,c} (softmax(z_t^a/T) − softmax(z_s/T))²`` (§2.3), neither side
    detached (its gradient trains the adapter and the student). Regression (C = 1):
    ``MSE(z_t^a, z_s)`` (a softmax over one logit is constant)."""
    z_t, z_s = adapted_teacher.float(), student.float()
    if is_regression(z_s):
        return F.mse_loss(z_s, z_t)
    t = float(temperature)
    return t * t * (torch.softmax(z_t / t, dim=-1) - torch.softmax(z_s / t, dim=-1)).pow(2).mean()


def ce_pair(student: torch.Tensor, adapted_teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``L_ce = CE(z_s, y) + CE(z_t^a, y)`` (§2.3); MSE for both under regression."""
    return ce_loss(student.float(), labels) + ce_loss(adapted_teacher.float(), labels)


def pkd_layer_map(teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Patient-KD pairs (§2.3): student layer j ↔ teacher layer j·g, g = ⌊L_t/L_s⌋, j = 1..L_s−1
    (12→6: (1,2) … (5,10); the last layers are left to the logit terms)."""
    if student_layers > teacher_layers:
        raise ConfigError(f"the student has more layers ({student_layers}) than the teacher ({teacher_layers}); "
                          "patient KD maps student layer j to teacher layer j * floor(L_t / L_s)",
                          field="student.num_layers")
    g = teacher_layers // student_layers
    return [(j, j * g) for j in range(1, student_layers)]


def pkd_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``L_pkd`` (§2.3): the [CLS] vectors [J, B, d] of the mapped layers, each L2-normalised
    (``max(‖x‖, ε)``), then the mean over (j, b, width) of the squared differences. Not detached."""
    s = F.normalize(student_cls.float(), dim=-1, eps=eps)
    t = F.normalize(teacher_cls.float(), dim=-1, eps=eps)
    return (s - t).pow(2).mean()


def pesf_loss(student: torch.Tensor, adapted_teacher: torch.Tensor, labels: torch.Tensor,
              student_cls: torch.Tensor | None, teacher_cls: torch.Tensor | None, alpha: float = 0.7,
              beta: float = 100.0, temperature: float = 5.0) -> dict[str, torch.Tensor]:
    """``L = α L_soft + (1 − α) L_ce + β L_pkd`` (§2.3); ``L_pkd`` is 0 without [CLS] states
    (β = 0, or a one-layer student). Returns the loss and its three terms."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        soft = soft_loss(adapted_teacher, student, temperature)
        ce = ce_pair(student, adapted_teacher, labels)
        pkd = pkd_loss(student_cls, teacher_cls) if student_cls is not None and len(student_cls) else soft.new_zeros(())
        return {"loss": alpha * soft + (1.0 - alpha) * ce + beta * pkd, "soft": soft, "ce": ce, "pkd": pkd}


def sharpness(logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """``s(z) = log Σ_c exp(z_c / t)`` per example (§2.3), in float32."""
    return torch.logsumexp(torch.as_tensor(logits).float() / t, dim=-1)


def sharpness_gap(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float = 1.0) -> float:
    """``gap = mean_b (s(teacher) − s(student))`` at temperature t (§2.3)."""
    return float((sharpness(teacher_logits, t) - sharpness(student_logits, t)).mean())


def sharpness_means(logits: np.ndarray | torch.Tensor, temperature: float) -> dict[str, float]:
    """Mean sharpness at t = 1 and t = T: ``{"t1", "tT"}``. Gaps are differences of these means."""
    return {"t1": float(sharpness(logits, 1.0).mean()), "tT": float(sharpness(logits, temperature).mean())}


def _gap(teacher: Mapping[str, float], student: Mapping[str, float]) -> dict[str, float]:
    return {k: teacher[k] - student[k] for k in ("t1", "tT")}


# --------------------------------------------------------------------------- teacher outputs and the trained module


def check_bert_classifier(model: nn.Module, name: str, what: str = "teacher") -> None:
    """PESF needs BERT-style classifiers: a pooler in the base model and a ``classifier`` linear head."""
    base = getattr(model, "base_model", None)
    if getattr(base, "pooler", None) is None or not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise ModelError(f"{type(model).__name__} is not a BERT-style classifier (PESF needs the pooled "
                         "[CLS] output and a linear classifier on it)", file=name, field=what)


def teacher_targets(teacher: nn.Module, inputs: Mapping[str, torch.Tensor],
                    pkd_layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """The teacher's pooled output h = tanh(W_p h_[CLS] + b_p) (``pooled``), its own classifier's
    logits W_c h + b_c (``logits``) and the [CLS] state of each teacher layer m in ``pkd_layers``
    (``cls.L{m}``, position 0 of ``hidden_states[m]``). The teacher is in eval mode in every mode
    (§2.5), so the classifier's dropout is the identity and is skipped."""
    out = teacher.base_model(**inputs, output_hidden_states=bool(pkd_layers), return_dict=True)
    pooled = out.pooler_output
    targets = {"pooled": pooled, "logits": teacher.classifier(pooled)}
    for m in pkd_layers:
        targets[f"cls.L{m}"] = out.hidden_states[m][:, 0]
    return targets


class PesfModule(nn.Module):
    """What the loop optimises: the student and the adapter (and, in reproduce mode, the teacher).

    A frozen teacher is held outside the module's parameters (not optimised, not checkpointed,
    not wrapped in DDP). ``train()`` keeps the teacher in eval mode; in reproduce mode the adapter
    stays in eval mode too (its dropout inactive, as in the released code).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, adapter: Adapter,
                 pkd_map: Sequence[tuple[int, int]], train_teacher: bool = False) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.train_teacher = train_teacher
        if train_teacher:
            self.teacher = teacher
        else:
            self._frozen = (teacher,)  # a tuple: not registered as a submodule
        self.pkd_map = [tuple(p) for p in pkd_map]

    @property
    def teacher_model(self) -> nn.Module:
        return self.teacher if self.train_teacher else self._frozen[0]

    def train(self, mode: bool = True) -> "PesfModule":
        super().train(mode)
        self.teacher_model.eval()
        if self.train_teacher:
            self.adapter.eval()
        return self

    def forward(self, inputs: Mapping[str, torch.Tensor], teacher_inputs: Mapping[str, torch.Tensor] | None = None,
                cached: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Student logits, adapted teacher logits z_t^a and the mapped [CLS] states [J, B, d].

        The teacher runs live on ``teacher_inputs`` (with gradients only when it trains) unless
        its targets come ``cached``.
        """
        if cached is None:
            with torch.set_grad_enabled(self.train_teacher and torch.is_grad_enabled()):
                cached = teacher_targets(self.teacher_model, teacher_inputs, [m for _, m in self.pkd_map])
        out = self.student(**inputs, output_hidden_states=bool(self.pkd_map), return_dict=True)
        result = {"student": out.logits, "teacher_adapted": adapted_logits(cached["logits"], cached["pooled"],
                                                                           self.adapter)}
        if self.pkd_map:
            result["cls_student"] = torch.stack([out.hidden_states[j][:, 0] for j, _ in self.pkd_map])
            result["cls_teacher"] = torch.stack([cached[f"cls.L{m}"] for _, m in self.pkd_map])
        return result


def param_groups(cfg: PesfConfig) -> list[ParamGroup]:
    """Learning rates by module (§2.4): the student at ``train.lr``, the adapter at ``adapter.lr``
    and, in reproduce mode, the teacher at ``teacher.lr`` (as multipliers of ``train.lr``)."""
    return [ParamGroup(r"^adapter\.", cfg.adapter.lr / cfg.train.lr),
            ParamGroup(r"^teacher\.", cfg.teacher.lr / cfg.train.lr)]


def student_parameters(module: PesfModule) -> Any:
    """What reproduce mode clips: the student's parameters only (§2.5)."""
    return module.student.parameters()


# --------------------------------------------------------------------------- one training step


class PesfStep(Callback):
    """The loss the loop calls (teacher live or from the cache) plus the hooks it needs: the
    device of a frozen teacher and the loss statistics saved with every checkpoint."""

    def __init__(self, loss: LossConfig, reader: Any = None, teacher_prefix: str = "") -> None:
        self.loss, self.reader, self.prefix = loss, reader, teacher_prefix
        self.stats = StepStats()

    def on_train_begin(self, state: TrainState) -> None:
        state.accelerator.unwrap_model(state.model).teacher_model.to(state.accelerator.device)
        self.stats = StepStats.resume(state.out, STATE_FILE) or self.stats

    def on_save(self, state: TrainState, checkpoint: Path) -> None:
        self.stats.save(state, checkpoint / STATE_FILE)

    def on_epoch_end(self, state: TrainState) -> None:
        means = self.stats.end_epoch()
        log.info("epoch %d loss means: %s", state.epoch, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

    def __call__(self, module: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in INPUT_KEYS if k in batch}
        if self.reader is not None:
            device = batch["input_ids"].device
            out = module(inputs, cached={k: v.to(device) for k, v in self.reader.get(batch["index"]).items()})
        else:
            out = module(inputs, teacher_inputs={k: batch[self.prefix + k] for k in INPUT_KEYS
                                                 if self.prefix + k in batch})
        terms = pesf_loss(out["student"], out["teacher_adapted"], batch["labels"], out.get("cls_student"),
                          out.get("cls_teacher"), self.loss.alpha, self.loss.beta, self.loss.temperature)
        self.stats.add(terms)
        return {"loss": terms["loss"], **{k: terms[k].detach() for k in ("soft", "ce", "pkd")}}


# --------------------------------------------------------------------------- models and data


def new_classifier(model: nn.Module) -> None:
    """Re-initialise the classification head (BERT init: normal(0, initializer_range), zero bias)."""
    std = getattr(model.config, "initializer_range", 0.02)
    nn.init.normal_(model.classifier.weight, mean=0.0, std=std)
    nn.init.zeros_(model.classifier.bias)


def build_student(cfg: PesfConfig, data: textcls.TextClsSet) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``--student ID --student-layers N``: the first N layers of the pretrained model with a new
    classifier for the task (§2.2; as in the reference, not copied from the teacher)."""
    from mmkit.core.models import load_model

    sc = cfg.student
    config = textcls.model_config(sc.id, sc.revision, "student.id")
    have = getattr(config, "num_hidden_layers", None)
    kwargs: dict[str, Any] = {}
    if sc.num_layers is not None:
        if have is None or sc.num_layers > have:
            raise ConfigError(f"--student-layers {sc.num_layers} but the student has {have} layers",
                              field="student.num_layers")
        kwargs["num_hidden_layers"] = sc.num_layers
    lm = load_model(sc.id, "sequence-classifier", revision=sc.revision, device=cfg.device, dtype="float32",
                    ignore_mismatched_sizes=True, **kwargs, **textcls.label_kwargs(data))
    model = lm.model
    check_bert_classifier(model, sc.id, "student")
    new_classifier(model)
    model.requires_grad_(True).train()
    return model, lm.preprocessor, lm.record()


@dataclass
class Setup:
    """Everything a run (or ``build-cache``) prepares before training."""

    train_set: textcls.TextClsSet
    eval_set: textcls.TextClsSet | None
    teacher: nn.Module
    teacher_tokenizer: Any
    teacher_path: str
    student: nn.Module
    student_tokenizer: Any
    adapter: Adapter
    pkd_map: list[tuple[int, int]]
    s_train: textcls.Encoded
    t_train: textcls.Encoded
    shared_tokens: bool
    records: dict[str, dict[str, Any]]
    finetune: dict[str, Any] | None = None


def prepare(cfg: PesfConfig, run_dir: Path | None) -> Setup:
    """Load data, the teacher (fine-tuned first if asked) and the student, build the adapter,
    resolve the PKD map (checking widths) and tokenise the training split for both models."""
    train_set, eval_set = textcls.load_task(cfg.data)
    lm, t_path, ft_metrics = textcls.load_teacher(
        cfg.teacher, train_set, run_dir, eval_set, command="pesf", max_len=cfg.data.max_len, device=cfg.device,
        trainable=cfg.reproduce_released, check=lambda model: check_bert_classifier(model, cfg.teacher.id))
    teacher = lm.model
    student, s_tok, s_record = build_student(cfg, train_set)
    pkd_map: list[tuple[int, int]] = []
    if cfg.loss.beta > 0:
        pkd_map = pkd_layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
        d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
        if pkd_map and d_s != d_t:
            raise ConfigError(f"L_pkd compares [CLS] vectors and needs equal widths, but the student has {d_s} "
                              f"and the teacher {d_t}: use mmkit distill bert-kd (hidden-state loss through a "
                              "projection) or set loss.beta=0", field="student.id")
    adapter = Adapter(teacher.config.hidden_size, train_set.num_labels, cfg.adapter.r, cfg.adapter.dropout)
    adapter.to(next(teacher.parameters()).device)
    shared = tokenizer_fingerprint(lm.preprocessor) == tokenizer_fingerprint(s_tok)
    s_train, t_train = textcls.encode_both(s_tok, lm.preprocessor, train_set, cfg.data.max_len, shared)
    records = {"teacher": {"id": cfg.teacher.id, "revision": lm.revision}, "student": s_record}
    if ft_metrics is not None:
        records["teacher_finetuned"] = {"id": t_path, "revision": None}
    return Setup(train_set, eval_set, teacher, lm.preprocessor, t_path, student, s_tok, adapter, pkd_map,
                 s_train, t_train, shared, records, ft_metrics)


# --------------------------------------------------------------------------- teacher cache (§5, faithful mode only)


def cache_targets(setup: Setup, dtype: str) -> list[Target]:
    """pooled h, the frozen classifier's logits (always float32) and the PKD layers' [CLS] states."""
    d_t, c = setup.teacher.config.hidden_size, setup.train_set.num_labels
    return [Target("pooled", "example", d_t, dtype), Target("logits", "example", c, "float32"),
            *(Target(f"cls.L{m}", "example", d_t, dtype) for _, m in setup.pkd_map)]


def teacher_cache(cfg: PesfConfig, setup: Setup) -> tuple[Any, str]:
    """A reader over the cached teacher targets, built if needed, and the cache status (``hit``,
    ``built`` or ``disabled: why``); ``(None, status)`` when the teacher runs live."""
    collate = textcls.Collate(setup.t_train, setup.train_set.labels)
    device = next(setup.teacher.parameters()).device
    layers = [m for _, m in setup.pkd_map]

    def compute(rows: np.ndarray) -> dict[str, torch.Tensor]:
        batch = collate(rows.tolist())
        return teacher_targets(setup.teacher, {k: batch[k].to(device) for k in INPUT_KEYS if k in batch}, layers)

    return open_cache("pesf", cfg.cache, cache_targets(setup, cfg.cache.dtype), setup.t_train.lengths, compute,
                      lambda: text_key_parts(setup.teacher_path, setup.records["teacher"]["revision"],
                                             setup.teacher_tokenizer, setup.train_set, cfg.data.max_len),
                      frozen=not cfg.reproduce_released)


# --------------------------------------------------------------------------- evaluation


class Evaluator:
    """Task metrics and sharpness on the evaluation split for the teacher (with and without the
    adapter) and the student. A frozen teacher's logits and pooled outputs are computed once."""

    def __init__(self, setup: Setup, cfg: PesfConfig) -> None:
        es = setup.eval_set
        self.data, self.cfg, self.setup = es, cfg, setup
        self.s_enc, self.t_enc = textcls.encode_both(setup.student_tokenizer, setup.teacher_tokenizer, es,
                                                     cfg.data.max_len, setup.shared_tokens)
        self._teacher: tuple[torch.Tensor, torch.Tensor] | None = None

    def teacher_outputs(self, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's own logits [N, C] and pooled outputs [N, d_t] (cached while it is frozen)."""
        if self._teacher is not None and not self.cfg.reproduce_released:
            return self._teacher
        c = self.data.num_labels

        def forward(model: nn.Module, batch: dict) -> torch.Tensor:
            t = teacher_targets(model, batch)
            return torch.cat([t["logits"], t["pooled"]], dim=-1)

        both = torch.from_numpy(textcls.predict(teacher, self.t_enc, self.cfg.eval_batch_size, forward))
        self._teacher = (both[:, :c], both[:, c:])
        return self._teacher

    def adapted(self, teacher: nn.Module, adapter: Adapter) -> np.ndarray:
        """z_t^a on the evaluation split (adapter in eval mode)."""
        logits, pooled = self.teacher_outputs(teacher)
        device = next(adapter.parameters()).device
        was_training = adapter.training
        adapter.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(logits), self.cfg.eval_batch_size):
                rows = slice(start, start + self.cfg.eval_batch_size)
                out.append(adapted_logits(logits[rows].to(device), pooled[rows].to(device), adapter).float().cpu())
        adapter.train(was_training)
        return torch.cat(out).numpy()

    def student(self, student: nn.Module) -> np.ndarray:
        return textcls.predict(student, self.s_enc, self.cfg.eval_batch_size)

    def metrics(self, logits: np.ndarray) -> dict[str, Any]:
        return textcls.task_metrics(logits, self.data)

    def epoch(self, module: nn.Module) -> dict[str, Any]:
        """The per-epoch evaluation (``eval_fn``): student and adapted-teacher metrics and the gap."""
        m = getattr(module, "module", module)
        z_s, z_ta = self.student(m.student), self.adapted(m.teacher_model, m.adapter)
        gap = _gap(sharpness_means(z_ta, self.cfg.loss.temperature), sharpness_means(z_s, self.cfg.loss.temperature))
        out = {"student": self.metrics(z_s), "teacher_adapted": self.metrics(z_ta), "gap": gap}
        log.info("evaluation: student %s, adapted teacher %s; sharpness gap (adapted teacher - student) t=1 %.4f, "
                 "t=%g %.4f", _fmt(out["student"]), _fmt(out["teacher_adapted"]), gap["t1"],
                 self.cfg.loss.temperature, gap["tT"])
        return out


def _fmt(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def evaluate_before(ev: Evaluator, setup: Setup, path: Path) -> dict[str, Any]:
    """The original teacher's metrics and sharpness and the initial student's (step 0), written to
    ``pesf_before.json`` so a resumed run reports the same values."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    temperature = ev.cfg.loss.temperature
    z_t = ev.teacher_outputs(setup.teacher)[0].numpy()
    z_s = ev.student(setup.student)
    before = {"teacher": ev.metrics(z_t), "student_init": ev.metrics(z_s),
              "sharpness": {"teacher": sharpness_means(z_t, temperature),
                            "student_init": sharpness_means(z_s, temperature)}}
    before["gap_before"] = _gap(before["sharpness"]["teacher"], before["sharpness"]["student_init"])
    log.info("before training: teacher %s; sharpness gap (teacher - student) t=1 %.4f, t=%g %.4f",
             _fmt(before["teacher"]), before["gap_before"]["t1"], temperature, before["gap_before"]["tT"])
    write_json(path, before)
    return before


# --------------------------------------------------------------------------- the command


def run(cfg: PesfConfig, out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``mmkit distill pesf``: (fine-tune the teacher,) evaluate teacher and initial student,
    train student and adapter (resumable), save them, evaluate again and write ``results.json``."""
    from mmkit.config import config_dict
    from mmkit.core.seeding import seed_everything
    from mmkit.io import start_run, write_results

    if cfg.data.eval_task is None and cfg.data.task.lower() not in textcls.GLUE:
        raise ConfigError("PESF reports sharpness and task metrics on an evaluation split: pass --eval-data "
                          "FILE (a GLUE --task uses its validation split)", field="data.eval_task")
    run_dir: RunDir = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with run_dir.guard():
        seed_everything(cfg.train.seed)
        setup = prepare(cfg, run_dir.path)
        metrics = distil(cfg, setup, run_dir)
        data = {"train": setup.train_set.data, "eval": setup.eval_set.data}
        results = write_results(run_dir, method="pesf", config=config_dict(cfg), metrics=metrics,
                                seed=cfg.train.seed, models=dict(setup.records), data=data)
        results["out"] = str(run_dir.path)
        return results


def distil(cfg: PesfConfig, setup: Setup, run_dir: RunDir) -> dict[str, Any]:
    """Train student and adapter with ``core.train.train``; write ``checkpoint/``, the adapter
    files (and, in reproduce mode, the trained ``teacher/``); return the §2.8 metrics."""
    ev = Evaluator(setup, cfg)
    before = evaluate_before(ev, setup, run_dir / BEFORE_FILE)
    reader, cache_status = teacher_cache(cfg, setup)
    module = PesfModule(setup.student, setup.teacher, setup.adapter, setup.pkd_map,
                        train_teacher=cfg.reproduce_released)
    step = PesfStep(cfg.loss, reader, "" if setup.shared_tokens else TEACHER_PREFIX)
    extra = {} if setup.shared_tokens or reader is not None else {TEACHER_PREFIX: setup.t_train}
    tcfg = replace(cfg.train, param_groups=[*param_groups(cfg), *cfg.train.param_groups])
    record = {"method": "pesf", "teacher": setup.records["teacher"], "pkd_map": setup.pkd_map,
              "reproduce_released": cfg.reproduce_released}
    mode = "reproduce-released" if cfg.reproduce_released else "faithful"
    log.info("pesf (%s): %d training examples, PKD map %s, adapter %d parameters", mode, len(setup.train_set),
             setup.pkd_map, param_count(setup.adapter))
    result = train(module, step, textcls.Indices(len(setup.train_set)), tcfg, run_dir.path,
                   collate_fn=textcls.Collate(setup.s_train, setup.train_set.labels, extra),
                   eval_fn=ev.epoch, callbacks=[step], save_fn=saver(setup.student_tokenizer, record, "student"),
                   final_dir="checkpoint", clip_parameters=student_parameters if cfg.reproduce_released else None)
    module.eval()
    save_adapter(setup.adapter, run_dir.path, {**setup.records["teacher"], "finetuned": setup.records.get(
        "teacher_finetuned", {}).get("id"), "trained": "teacher" if cfg.reproduce_released else None})
    if cfg.reproduce_released:
        with atomic_dir(run_dir / "teacher", overwrite=True) as tmp:
            setup.teacher.save_pretrained(tmp, safe_serialization=True)
            setup.teacher_tokenizer.save_pretrained(tmp)

    temperature = cfg.loss.temperature
    z_s, z_ta = ev.student(setup.student), ev.adapted(setup.teacher, setup.adapter)
    sharp = {"temperature": temperature, "teacher": before["sharpness"]["teacher"],
             "teacher_adapted": sharpness_means(z_ta, temperature),
             "student_init": before["sharpness"]["student_init"], "student_final": sharpness_means(z_s, temperature)}
    metrics: dict[str, Any] = {
        "mode": mode, "student": ev.metrics(z_s), "teacher": before["teacher"], "teacher_adapted": ev.metrics(z_ta),
        "student_init": before["student_init"], "sharpness": sharp, "gap_before": before["gap_before"],
        "gap_after": _gap(sharp["teacher_adapted"], sharp["student_final"]),
        "gap_after_original_teacher": _gap(sharp["teacher"], sharp["student_final"]),
        "adapter_params": param_count(setup.adapter), "loss_final": step.stats.means(),
        "params": param_counts(setup.teacher, setup.student),
        "pkd_map": [list(p) for p in setup.pkd_map], "cache": cache_status, "steps": result.step,
        "epochs": result.epoch, "train_examples": len(setup.train_set), "eval_examples": len(setup.eval_set),
    }
    if setup.finetune is not None:
        metrics["teacher_finetune"] = setup.finetune
    log.info("after training: student %s, adapted teacher %s; sharpness gap t=1 %.4f (before %.4f), t=%g %.4f "
             "(before %.4f)", _fmt(metrics["student"]), _fmt(metrics["teacher_adapted"]), metrics["gap_after"]["t1"],
             metrics["gap_before"]["t1"], temperature, metrics["gap_after"]["tT"], metrics["gap_before"]["tT"])
    return metrics


def build_cache(file: str | None = None, sets: Sequence[str] = (), flags: Mapping[str, Any] | None = None,
                out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``mmkit distill build-cache`` for pesf: fill the teacher cache (faithful mode) and exit.
    The teacher must already be a classifier for the task (fine-tuning happens inside a run)."""
    from mmkit.config import config_dict, load_config
    from mmkit.io import start_run, write_results

    cfg = load_config(PesfConfig, file=file, flags=flags or {}, sets=list(sets))
    if cfg.cache.mode == "off":
        raise ConfigError("cache.mode is off: nothing to build", field="cache.mode")
    run_dir = start_run(out, "distill build-cache", cfg, overwrite=overwrite)
    with run_dir.guard():
        setup = prepare(cfg, None)
        _, status = teacher_cache(cfg, setup)
        if status.startswith("disabled"):
            raise ConfigError(f"the teacher cache cannot be used: {status[len('disabled: '):]}", field="cache")
        metrics = {"cache": status, "examples": len(setup.train_set),
                   "targets": [t.name for t in cache_targets(setup, cfg.cache.dtype)]}
        results = write_results(run_dir, method="pesf", config=config_dict(cfg), metrics=metrics,
                                seed=cfg.train.seed, models=dict(setup.records), data={"train": setup.train_set.data})
        results["out"] = str(run_dir.path)
        return results
