"""bert-kd: BERT teacher -> smaller BERT student, with a CCA diagnostic (distill.md §1).

Fan et al. (ACL 2025) report that standard KD fails to exploit larger BERT teachers and diagnose
it with CCA; only their abstract is public, so **their method is not implemented**. This is a
standard, configurable BERT KD (CE, logit KD with temperature, hidden-state MSE through a learned
projection, attention transfer by map MSE or MiniLMv2 relations, a uniform or explicit layer map)
plus a CCA-alignment term that is **mmkit's stand-in** for the paper's improvement, and the
CCA/SVCCA/PWCCA/CKA diagnostic of every student layer against every teacher layer before and
after training. The frozen teacher's targets come from the teacher cache when it applies (§5).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mmkit.core import losses
from mmkit.core.train import Callback, TrainConfig, TrainState, train
from mmkit.distill import textcls
from mmkit.distill.common import StepStats, param_counts, saver
from mmkit.distill.teacher_cache import CacheConfig, Target, open_cache, text_key_parts
from mmkit.errors import ConfigError, ModelError
from mmkit.io import RunDir, write_json

log = logging.getLogger("mmkit")

COMMAND = "distill bert-kd"
CCA_TERM = "mmkit stand-in"
HEADS_FILE = "distill_heads.safetensors"
STATE_FILE = "bert_kd_state.json"
TOKEN_TERMS = ("hid", "att", "cca")  # terms that compare token positions: one tokenizer needed
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
DIAGNOSE_ONLY_TEACHER = "--diagnose-only: the teacher is not fine-tuned (the diagnostic reads hidden states only)"


# --------------------------------------------------------------------------- configuration


def _train_defaults() -> TrainConfig:
    """§1.6: AdamW lr 5e-5, 3 epochs, batch 32, linear schedule with 10% warmup, wd 0.01, clip 1.0, seed 42."""
    return TrainConfig(epochs=3, batch_size=32, lr=5e-5, weight_decay=0.01, warmup_ratio=0.1,
                       max_grad_norm=1.0, seed=42, optimizer="adamw", scheduler="linear")


@dataclass
class TeacherConfig:
    id: str | None = None
    revision: str | None = None
    finetune: bool | str = "auto"  # auto: fine-tune first when the model has no classification head
    train: TrainConfig = field(default_factory=textcls.finetune_defaults)


@dataclass
class StudentConfig:
    id: str | None = None  # init pretrained
    revision: str | None = None
    num_layers: int | None = None  # pretrained: keep the first N; teacher_layers/config: L_s
    init: Literal["pretrained", "teacher_layers", "config"] = "pretrained"
    config: dict = field(default_factory=dict)  # init config: overrides of the teacher's config


@dataclass
class WeightConfig:
    weight: float = 0.5


@dataclass
class KdConfig:
    weight: float = 0.5
    temperature: float = 2.0


@dataclass
class HiddenConfig:
    weight: float = 1.0
    include_embeddings: bool = True
    shared_projection: bool = True


@dataclass
class AttentionConfig:
    weight: float = 1.0
    mode: Literal["auto", "mse", "relation"] = "auto"
    relation_heads: int = 12


@dataclass
class CcaConfig:
    weight: float = 0.1
    objective: Literal["cca", "cka"] = "cca"
    eps: float = 1e-4
    min_ratio: float = 2.0
    top_k: int | None = None
    layers: list[int] | None = None  # student layers (default: every mapped layer)


@dataclass
class LossConfig:
    ce: WeightConfig = field(default_factory=WeightConfig)
    kd: KdConfig = field(default_factory=KdConfig)
    hidden: HiddenConfig = field(default_factory=HiddenConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    cca: CcaConfig = field(default_factory=CcaConfig)

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce.weight, "kd": self.kd.weight, "hid": self.hidden.weight,
                "att": self.attention.weight, "cca": self.cca.weight}


@dataclass
class DiagnosticConfig:
    enabled: bool = True
    unit: Literal["token", "cls", "mean"] = "token"
    max_samples: int = 10000
    max_examples: int = 2000  # examples run through both models
    metrics: list[str] = field(default_factory=lambda: ["cca", "svcca", "pwcca", "cka"])
    eps: float = 1e-6
    batch_size: int = 32
    plots: bool = True


@dataclass
class BertKdConfig:
    """Everything ``mmkit distill bert-kd`` takes (built by ``mmkit.config.load_config``)."""

    method: str = "bert-kd"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: textcls.DataConfig = field(default_factory=textcls.DataConfig)
    layer_map: str | list[int] = "uniform"
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: Literal["joint", "two_stage"] = "joint"
    stage1_epochs: int = 1
    train: TrainConfig = field(default_factory=_train_defaults)
    eval_batch_size: int = 64
    diagnostic: DiagnosticConfig = field(default_factory=DiagnosticConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    diagnose_only: bool = False
    device: str = "auto"

    def validate(self) -> None:
        if self.method != "bert-kd":
            raise ConfigError(f"expected method bert-kd, got {self.method!r}", field="method")
        if not self.teacher.id:
            raise ConfigError("expected a teacher model (--teacher ID_OR_DIR)", field="teacher.id")
        if not self.data.task:
            raise ConfigError("expected a task: a GLUE name or a JSONL/CSV/parquet file (--task)", field="data.task")
        if isinstance(self.teacher.finetune, str) and self.teacher.finetune != "auto":
            raise ConfigError(f"expected auto, true or false, got {self.teacher.finetune!r}", field="teacher.finetune")
        if self.student.init == "pretrained" and not self.student.id:
            raise ConfigError("student.init pretrained needs --student ID_OR_DIR (or student.init teacher_layers "
                              "/ config)", field="student.id")
        if self.student.init == "teacher_layers" and not self.student.num_layers:
            raise ConfigError("student.init teacher_layers needs --student-layers N", field="student.num_layers")
        if self.student.num_layers is not None and self.student.num_layers < 1:
            raise ConfigError(f"expected an integer >= 1, got {self.student.num_layers}", field="student.num_layers")
        weights = self.loss.weights()
        for name, w in weights.items():
            if w < 0:
                raise ConfigError(f"expected a weight >= 0, got {w}", field=f"loss.{name}.weight")
        if not any(weights.values()):
            raise ConfigError("every loss weight is 0: enable at least one term", field="loss")
        if self.loss.kd.temperature <= 0:
            raise ConfigError(f"expected a positive temperature, got {self.loss.kd.temperature}",
                              field="loss.kd.temperature")
        if self.loss.attention.relation_heads < 1:
            raise ConfigError("expected an integer >= 1", field="loss.attention.relation_heads")
        if self.loss.cca.min_ratio <= 0 or self.loss.cca.eps < 0:
            raise ConfigError("expected min_ratio > 0 and eps >= 0", field="loss.cca")
        if self.schedule == "two_stage" and not 1 <= self.stage1_epochs < self.train.epochs:
            raise ConfigError(f"two_stage needs 1 <= stage1_epochs < epochs ({self.train.epochs}), got "
                              f"{self.stage1_epochs}", field="stage1_epochs")
        if self.data.max_len < 2:
            raise ConfigError(f"expected max_len >= 2, got {self.data.max_len}", field="data.max_len")
        if isinstance(self.layer_map, str) and self.layer_map != "uniform":
            try:
                self.layer_map = [int(x) for x in self.layer_map.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"expected 'uniform' or a list of teacher layers, got {self.layer_map!r}",
                                  field="layer_map") from None
        self.train.validate()
        self.teacher.train.validate()


# --------------------------------------------------------------------------- layer map (§1.3)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """m(j) = floor(j·L_t/L_s + 1/2) for j = 1..L_s, in exact integer arithmetic (never banker's rounding)."""
    return [(2 * j * teacher_layers + student_layers) // (2 * student_layers) for j in range(1, student_layers + 1)]


def resolve_layer_map(spec: str | Sequence[int], student_layers: int, teacher_layers: int) -> list[int]:
    """``uniform``, or an explicit list of L_s distinct teacher layers in 1..L_t, strictly increasing."""
    if isinstance(spec, str):
        if spec != "uniform":
            raise ConfigError(f"expected 'uniform' or a list of teacher layers, got {spec!r}", field="layer_map")
        return uniform_layer_map(student_layers, teacher_layers)
    layers = [int(x) for x in spec]
    if len(layers) != student_layers:
        raise ConfigError(f"expected {student_layers} teacher layers (one per student layer), got {len(layers)}: "
                          f"{layers}", field="layer_map")
    bad = [m for m in layers if not 1 <= m <= teacher_layers]
    if bad:
        raise ConfigError(f"teacher layer {bad[0]} is out of range 1..{teacher_layers}", field="layer_map")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"expected strictly increasing teacher layers, got {layers}", field="layer_map")
    return layers


# --------------------------------------------------------------------------- models


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-compatible model (``base_model.encoder.layer``)."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__} is not BERT-compatible: expected base_model.encoder.layer",
                         field="model")
    return layers


def self_attention(model: nn.Module, layer: int) -> nn.Module:
    """The self-attention module (with ``query``/``key``/``value``) of layer ``layer`` (1-based)."""
    return encoder_layers(model)[layer - 1].attention.self


class QkvCapture:
    """Forward hooks keeping the query/key/value projection outputs [B, L, d] of chosen layers
    (MiniLMv2 relations; the teacher's Q, K from which attention maps are recomputed)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], parts: str) -> None:
        self.values: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        names = {"q": "query", "k": "key", "v": "value"}
        for layer in layers:
            attn = self_attention(model, layer)
            for p in parts:
                self.handles.append(getattr(attn, names[p]).register_forward_hook(self._hook(p, layer)))

    def _hook(self, part: str, layer: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self.values[(part, layer)] = output
        return hook

    def pop(self) -> dict[tuple[str, int], torch.Tensor]:
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        """Detach the hooks, leaving the model as it was."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.values.clear()


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """BERT's post-softmax maps [B, H, L, L] from query/key projections [B, L, d]:
    softmax(Q_h K_hᵀ / √(d/H)) with padded keys masked (what eager attention returns, eval mode)."""
    b, n, d = q.shape
    qh = q.reshape(b, n, heads, d // heads).transpose(1, 2)
    kh = k.reshape(b, n, heads, d // heads).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) * (d // heads) ** -0.5
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


class KdStudent(nn.Module):
    """What the loop trains: the student and the hidden-state projection(s) W_h (d_s -> d_t;
    one shared, or one per hidden pair; none when the widths agree)."""

    def __init__(self, model: nn.Module, d_s: int, d_t: int, n_projections: int, qkv_layers: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.projections = nn.ModuleList(nn.Linear(d_s, d_t, bias=False) for _ in range(n_projections if d_s != d_t else 0))
        for p in self.projections:
            nn.init.normal_(p.weight, mean=0.0, std=0.02)
        self.capture = QkvCapture(model, qkv_layers, "qkv") if qkv_layers else None

    def projection(self, i: int) -> nn.Module | None:
        if not len(self.projections):
            return None
        return self.projections[min(i, len(self.projections) - 1)]

    def forward(self, inputs: Mapping[str, torch.Tensor], hidden: bool, attentions: bool) -> Any:
        return self.model(**inputs, output_hidden_states=hidden, output_attentions=attentions, return_dict=True)


# --------------------------------------------------------------------------- what the losses need


@dataclass
class LossPlan:
    """The resolved loss set-up: weights per stage, the layer pairs each term uses, head counts."""

    weights: dict[str, float]
    layer_map: list[int]
    hidden_pairs: list[tuple[int, int]]  # (student layer, teacher layer), 0 = embeddings
    cca_pairs: list[tuple[int, int]]
    att_mode: str  # mse | relation | off
    teacher_heads: int
    relation_heads: int
    temperature: float
    cca: CcaConfig
    schedule: str = "joint"
    stage1_epochs: int = 0

    def stage_weights(self, epoch: int) -> dict[str, float]:
        """two_stage: hid/att/cca for the first ``stage1_epochs``, then ce/kd (TinyBERT's order)."""
        if self.schedule != "two_stage":
            return self.weights
        first = epoch < self.stage1_epochs
        return {k: w if (k in TOKEN_TERMS) == first else 0.0 for k, w in self.weights.items()}

    @property
    def att_pairs(self) -> list[tuple[int, int]]:
        return list(zip(range(1, len(self.layer_map) + 1), self.layer_map)) if self.att_mode != "off" else []

    @property
    def needs_teacher(self) -> bool:
        """Whether any enabled term reads teacher targets (CE alone does not)."""
        return any(self.weights[k] for k in ("kd", *TOKEN_TERMS))

    def teacher_hidden_layers(self) -> list[int]:
        return sorted({m for _, m in self.hidden_pairs if self.weights["hid"]}
                      | {m for _, m in self.cca_pairs if self.weights["cca"]})


def make_plan(cfg: BertKdConfig, layer_map: list[int], student_cfg: Any, teacher_cfg: Any) -> LossPlan:
    """Resolve the attention mode (auto = mse when head counts agree) and every layer pair."""
    weights = cfg.loss.weights()
    att = cfg.loss.attention
    mode = att.mode
    if mode == "auto":
        mode = "mse" if student_cfg.num_attention_heads == teacher_cfg.num_attention_heads else "relation"
    if mode == "mse" and student_cfg.num_attention_heads != teacher_cfg.num_attention_heads:
        raise ConfigError(f"attention mode mse needs equal head counts (student {student_cfg.num_attention_heads}, "
                          f"teacher {teacher_cfg.num_attention_heads}); use mode relation or auto",
                          field="loss.attention.mode")
    if mode == "relation" and weights["att"]:
        for who, width in (("student", student_cfg.hidden_size), ("teacher", teacher_cfg.hidden_size)):
            if width % att.relation_heads:
                raise ConfigError(f"relation heads ({att.relation_heads}) must divide the {who} width ({width})",
                                  field="loss.attention.relation_heads")
    l_s = len(layer_map)
    pairs = list(zip(range(1, l_s + 1), layer_map))
    hidden = ([(0, 0)] if cfg.loss.hidden.include_embeddings else []) + pairs
    cca_layers = cfg.loss.cca.layers or list(range(1, l_s + 1))
    bad = [j for j in cca_layers if not 1 <= j <= l_s]
    if bad:
        raise ConfigError(f"student layer {bad[0]} is out of range 1..{l_s}", field="loss.cca.layers")
    return LossPlan(weights, layer_map, hidden, [(j, layer_map[j - 1]) for j in cca_layers],
                    mode if weights["att"] else "off", teacher_cfg.num_attention_heads, att.relation_heads,
                    cfg.loss.kd.temperature, cfg.loss.cca, cfg.schedule, cfg.stage1_epochs)


class TeacherTargets:
    """The teacher's targets for a batch, live: logits, token-level hidden states of the mapped
    layers and the Q/K(/V) projections attention transfer needs (maps are recomputed from Q, K,
    so live and cached targets take the same path). Runs under ``no_grad`` in eval mode."""

    def __init__(self, model: nn.Module, plan: LossPlan, prefix: str = "", dtype: str = "float16") -> None:
        self.model, self.plan, self.prefix = model, plan, prefix
        self.hidden_layers = plan.teacher_hidden_layers()
        self.parts = {"mse": "qk", "relation": "qkv"}.get(plan.att_mode, "")
        self.att_layers = sorted({m for _, m in plan.att_pairs})
        self.capture = QkvCapture(model, self.att_layers, self.parts) if self.parts else None
        cfg = model.config
        self.targets = [Target("logits", "example", cfg.num_labels, "float32")]
        self.targets += [Target(f"tok.h.L{m}", "token", cfg.hidden_size, dtype) for m in self.hidden_layers]
        self.targets += [Target(f"tok.{p}.L{m}", "token", cfg.hidden_size, dtype)
                         for m in self.att_layers for p in self.parts]

    def close(self) -> None:
        """Detach the teacher hooks (after training; the teacher is then evaluated hook-free)."""
        if self.capture is not None:
            self.capture.remove()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Targets for a training batch (the teacher's own inputs under ``prefix``)."""
        return self.run({k: batch[self.prefix + k] for k in INPUT_KEYS if self.prefix + k in batch})

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Targets for teacher inputs (``input_ids``, ``attention_mask``, ``token_type_ids``)."""
        device = next(self.model.parameters()).device
        inputs = {k: inputs[k].to(device) for k in INPUT_KEYS if k in inputs}
        with torch.no_grad():
            out = self.model(**inputs, output_hidden_states=bool(self.hidden_layers), return_dict=True)
            targets = {"logits": out.logits.float()}
            for m in self.hidden_layers:
                targets[f"tok.h.L{m}"] = out.hidden_states[m]
            if self.capture is not None:
                for (part, m), value in self.capture.pop().items():
                    targets[f"tok.{part}.L{m}"] = value
        return targets


class CachedTargets:
    """The same targets read from a teacher cache by ``batch["index"]``."""

    def __init__(self, reader: Any, device: torch.device | str) -> None:
        self.reader, self.device = reader, device

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.reader.get(batch["index"]).items()}


# --------------------------------------------------------------------------- the losses of one step (§1.4)


def kd_terms(plan: LossPlan, module: KdStudent, batch: Mapping[str, Any], teacher: Mapping[str, torch.Tensor],
             weights: Mapping[str, float], forward: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Every enabled loss term of one batch and whether the CCA term was skipped (too few tokens).

    ``forward`` is the module the loop prepared (a DDP wrapper of ``module`` when distributed).
    """
    inputs = {k: batch[k] for k in INPUT_KEYS if k in batch}
    mask = batch["attention_mask"]
    want_states = bool(weights["hid"] or weights["cca"])
    out = (forward or module)(inputs, hidden=want_states, attentions=bool(weights["att"]) and plan.att_mode == "mse")
    logits = out.logits
    terms: dict[str, torch.Tensor] = {}
    if weights["ce"]:
        terms["ce"] = losses.ce_loss(logits, batch["labels"])
    if weights["kd"]:
        terms["kd"] = losses.kd_loss(logits, teacher["logits"], plan.temperature)
    if weights["hid"]:
        terms["hid"] = sum(losses.hidden_mse(out.hidden_states[j], teacher[f"tok.h.L{m}"], mask, module.projection(i))
                           for i, (j, m) in enumerate(plan.hidden_pairs))
    if weights["att"]:
        terms["att"] = _attention_term(plan, module, out, teacher, mask)
    skipped = False
    if weights["cca"]:
        keep = mask.bool()
        n = int(keep.sum())
        d_t = teacher[f"tok.h.L{plan.cca_pairs[0][1]}"].shape[-1]
        if n >= plan.cca.min_ratio * max(out.hidden_states[0].shape[-1], d_t):
            term = losses.cka_loss if plan.cca.objective == "cka" else (
                lambda x, y: losses.cca_loss(x, y, plan.cca.eps, plan.cca.top_k))
            terms["cca"] = torch.stack([term(out.hidden_states[j][keep], teacher[f"tok.h.L{m}"][keep])
                                        for j, m in plan.cca_pairs]).mean()
        else:
            skipped = True
    return terms, skipped


def _attention_term(plan: LossPlan, module: KdStudent, out: Any, teacher: Mapping[str, torch.Tensor],
                    mask: torch.Tensor) -> torch.Tensor:
    """Σ_j attention MSE of the maps (equal head counts) or Σ_j Σ_X relation KL (MiniLMv2)."""
    if plan.att_mode == "mse":
        return sum(losses.attention_mse(out.attentions[j - 1],
                                        attention_probs(teacher[f"tok.q.L{m}"], teacher[f"tok.k.L{m}"], mask,
                                                        plan.teacher_heads), mask)
                   for j, m in plan.att_pairs)
    student = module.capture.pop()
    return sum(losses.relation_kl(student[(p, j)], teacher[f"tok.{p}.L{m}"], mask, plan.relation_heads)
               for j, m in plan.att_pairs for p in "qkv")


@dataclass
class KdStats(StepStats):
    """The loss-term statistics plus how many batches skipped the CCA term."""

    cca_skipped: int = 0
    cca_batches: int = 0


class BertKdStep(Callback):
    """The loss function the loop calls, plus the hooks it needs (epoch for two_stage, device for
    the live teacher, statistics saved with every checkpoint)."""

    def __init__(self, plan: LossPlan, teacher: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]],
                 teacher_model: nn.Module | None = None) -> None:
        self.plan, self.teacher, self.teacher_model = plan, teacher, teacher_model
        self.stats = KdStats()
        self.state: TrainState | None = None

    def on_train_begin(self, state: TrainState) -> None:
        self.state = state
        if self.teacher_model is not None:
            self.teacher_model.to(state.accelerator.device)
        if isinstance(self.teacher, CachedTargets):
            self.teacher.device = state.accelerator.device
        self.stats = KdStats.resume(state.out, STATE_FILE) or self.stats

    def on_save(self, state: TrainState, checkpoint: Path) -> None:
        self.stats.save(state, checkpoint / STATE_FILE)

    def on_epoch_end(self, state: TrainState) -> None:
        self.stats.end_epoch()

    def __call__(self, module: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        weights = self.plan.stage_weights(self.state.epoch if self.state is not None else 0)
        unwrapped = getattr(module, "module", module)
        terms, skipped = kd_terms(self.plan, unwrapped, batch, self.teacher(batch), weights, forward=module)
        if unwrapped.capture is not None:
            unwrapped.capture.pop()  # release the student's Q/K/V of this batch
        if weights["cca"]:
            self.stats.cca_batches += 1
            self.stats.cca_skipped += int(skipped)
        loss = sum(weights[k] * v for k, v in terms.items())
        if not torch.is_tensor(loss):  # every enabled term skipped (only CCA on, too few tokens)
            loss = sum(p.sum() * 0.0 for p in unwrapped.parameters() if p.requires_grad)
        out = {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
        self.stats.add(out)
        return out


# --------------------------------------------------------------------------- building models


@dataclass
class Models:
    teacher: nn.Module
    teacher_tokenizer: Any
    teacher_path: str
    student: nn.Module
    student_tokenizer: Any
    records: dict[str, dict[str, Any]]
    finetune: dict[str, Any] | None = None


def keep_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` with only encoder ``layers`` (1-based), its embeddings, pooler and head."""
    model = copy.deepcopy(teacher)  # one copy, so every layer keeps sharing the copy's config
    copied = encoder_layers(model)
    model.base_model.encoder.layer = nn.ModuleList(copied[m - 1] for m in layers)
    model.config.num_hidden_layers = len(layers)
    return model


def build_student(cfg: BertKdConfig, teacher: nn.Module, teacher_tokenizer: Any, data: textcls.TextClsSet,
                  eager: bool) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The student by ``student.init`` (§1.2): ``pretrained`` (first N layers of --student, a new
    head when its own does not fit), ``teacher_layers`` (embeddings, the mapped teacher layers,
    pooler and head copied) or ``config`` (random init from the teacher's config + overrides)."""
    from transformers import AutoModelForSequenceClassification

    from mmkit.core.models import load_model

    sc = cfg.student
    attn = "eager" if eager else None
    if sc.init == "pretrained":
        lm = load_model(sc.id, "sequence-classifier", revision=sc.revision, device=cfg.device, dtype="float32",
                        attn_implementation=attn, ignore_mismatched_sizes=True, **textcls.label_kwargs(data))
        model, tokenizer, record = lm.model, lm.preprocessor, lm.record()
        if sc.num_layers:
            layers = encoder_layers(model)
            if sc.num_layers > len(layers):
                raise ConfigError(f"--student-layers {sc.num_layers} but the student has {len(layers)} layers",
                                  field="student.num_layers")
            model.base_model.encoder.layer = nn.ModuleList(list(layers)[:sc.num_layers])
            model.config.num_hidden_layers = sc.num_layers
    elif sc.init == "teacher_layers":
        t_layers = encoder_layers(teacher)
        layer_map = resolve_layer_map(cfg.layer_map, sc.num_layers, len(t_layers))
        model = keep_layers(teacher, layer_map)
        if eager:
            model.set_attn_implementation("eager")
        tokenizer, record = teacher_tokenizer, {"id": f"teacher layers {layer_map}", "revision": None}
    else:
        overrides = dict(sc.config)
        if sc.num_layers:
            overrides["num_hidden_layers"] = sc.num_layers
        unknown = [k for k in overrides if not hasattr(teacher.config, k)]
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} for {type(teacher.config).__name__}",
                              field=f"student.config.{unknown[0]}")
        values = {**teacher.config.to_dict(), **overrides, **textcls.label_kwargs(data)}
        try:
            config = type(teacher.config).from_dict(values)
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn or "sdpa")
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0], field="student.config") from None
        model.to(next(teacher.parameters()).device)
        tokenizer, record = teacher_tokenizer, {"id": f"teacher config + {overrides}", "revision": None}
    model.requires_grad_(True).train()
    textcls.check_head(model.config, data, "student")
    encoder_layers(model)
    return model, tokenizer, record


def same_tokenizer(a: Any, b: Any, texts: Sequence[str], pairs: Sequence[str] | None) -> bool:
    """Whether two tokenizers give the same inputs: equal vocabularies and equal encodings of a sample."""
    if a is b:
        return True
    if a.get_vocab() != b.get_vocab():
        return False
    n = min(len(texts), 64)
    ea = a(list(texts[:n]), list(pairs[:n]) if pairs else None, truncation=True, max_length=128)
    eb = b(list(texts[:n]), list(pairs[:n]) if pairs else None, truncation=True, max_length=128)
    return ea["input_ids"] == eb["input_ids"] and ea.get("token_type_ids") == eb.get("token_type_ids")


# --------------------------------------------------------------------------- diagnostic (§1.5)


def diagnose(student: nn.Module, teacher: nn.Module, s_enc: textcls.Encoded, t_enc: textcls.Encoded,
             layer_map: Sequence[int], cfg: DiagnosticConfig, seed: int, out: Path, tag: str,
             shared_tokens: bool) -> dict[str, Any]:
    """Every metric of every student layer 0..L_s against every teacher layer 0..L_t; writes
    ``cca_<tag>.json`` and (``plots``) ``cca_<tag>_<metric>.png``; returns the JSON."""
    from mmkit.core import similarity as sim

    if cfg.unit == "token" and not shared_tokens:
        raise ConfigError("diagnostic unit token needs one tokenizer for both models; use unit cls or mean",
                          field="diagnostic.unit")
    n = min(len(s_enc), cfg.max_examples)
    s_tok = sim.Tokenized(_head(s_enc.input_ids, n), _head(s_enc.token_type_ids, n))
    t_tok = sim.Tokenized(_head(t_enc.input_ids, n), _head(t_enc.token_type_ids, n))
    selection = sim.select_samples(s_tok, cfg.unit, cfg.max_samples, seed)
    l_s, l_t = len(encoder_layers(student)), len(encoder_layers(teacher))
    acts_s = sim.hidden_states(student, s_tok, selection, range(l_s + 1), pad_id=s_enc.pad_id,
                               batch_size=cfg.batch_size, description=f"student states ({tag})")
    acts_t = sim.hidden_states(teacher, t_tok, selection, range(l_t + 1), pad_id=t_enc.pad_id,
                               batch_size=cfg.batch_size, description=f"teacher states ({tag})")
    grid = sim.similarity_grid(acts_s, acts_t, metrics=cfg.metrics, options=sim.SimilarityOptions(eps=cfg.eps))
    mapped = [(0, 0)] + list(zip(range(1, l_s + 1), layer_map))
    report: dict[str, Any] = {m: grid.values[m].tolist() for m in grid.metrics}
    report.update(student_layers=list(range(l_s + 1)), teacher_layers=list(range(l_t + 1)),
                  mapped_pairs=[list(p) for p in mapped], n_samples=grid.n_samples, unit=cfg.unit,
                  mapped_mean={m: float(np.mean([grid.values[m][i, j] for i, j in mapped[1:]])) for m in grid.metrics},
                  rho={f"{i},{j}": {k: v.tolist() for k, v in grid.rho.get((i, j), {}).items()} for i, j in mapped})
    write_json(out / f"cca_{tag}.json", report)
    if cfg.plots:
        for m in grid.metrics:
            sim.plot_heatmap(out / f"cca_{tag}_{m}.png", grid.values[m], report["student_layers"],
                             report["teacher_layers"], title=f"{m} {tag} training", row_title="student layer",
                             col_title="teacher layer", outline=mapped)
    return report


def _head(tokens: Any, n: int) -> Any:
    """The first ``n`` sequences of a TokenArrays (None stays None)."""
    if tokens is None:
        return None
    from mmkit.core.data import TokenArrays

    return TokenArrays(tokens.flat, tokens.offsets[:n], tokens.lengths[:n])


# --------------------------------------------------------------------------- the command


@dataclass
class Setup:
    """Everything a run (or ``build-cache``) prepares before training."""

    train_set: textcls.TextClsSet
    eval_set: textcls.TextClsSet | None
    models: Models
    layer_map: list[int]
    plan: LossPlan
    s_train: textcls.Encoded
    t_train: textcls.Encoded
    shared_tokens: bool


def prepare(cfg: BertKdConfig, run_dir: Path | None) -> Setup:
    """Load data and models, resolve the layer map and the losses, tokenise, check shared inputs."""
    train_set, eval_set = textcls.load_task(cfg.data)
    if eval_set is None:
        log.warning("no --eval-data: task metrics are not computed")
    lm, t_path, ft_metrics = textcls.load_teacher(
        cfg.teacher, train_set, run_dir, eval_set, command="bert-kd", max_len=cfg.data.max_len, device=cfg.device,
        check=encoder_layers, skip_finetune=DIAGNOSE_ONLY_TEACHER if cfg.diagnose_only else None)
    teacher = lm.model
    l_t = len(encoder_layers(teacher))
    attn_mse = cfg.loss.attention.weight > 0 and cfg.loss.attention.mode in ("auto", "mse")
    student, s_tok, s_record = build_student(cfg, teacher, lm.preprocessor, train_set, eager=attn_mse)
    layer_map = resolve_layer_map(cfg.layer_map, len(encoder_layers(student)), l_t)
    plan = make_plan(cfg, layer_map, student.config, teacher.config)
    if plan.att_mode != "mse" and student.config._attn_implementation == "eager":
        student.set_attn_implementation("sdpa")
    shared = same_tokenizer(lm.preprocessor, s_tok, train_set.texts, train_set.pairs)
    token_terms = [t for t in TOKEN_TERMS if plan.weights[t]]
    if token_terms and not shared:
        raise ConfigError(f"the teacher and student tokenizers differ, but loss terms {', '.join(token_terms)} "
                          "compare token positions; use a student with the teacher's tokenizer or set their "
                          "weights to 0", field="student.id")
    s_train, t_train = textcls.encode_both(s_tok, lm.preprocessor, train_set, cfg.data.max_len, shared)
    records = {"teacher": {"id": cfg.teacher.id, "revision": lm.revision}, "student": s_record}
    if ft_metrics is not None:
        records["teacher_finetuned"] = {"id": t_path, "revision": None}
    models = Models(teacher, lm.preprocessor, t_path, student, s_tok, records, ft_metrics)
    return Setup(train_set, eval_set, models, layer_map, plan, s_train, t_train, shared)


def teacher_source(cfg: BertKdConfig, setup: Setup) -> tuple[Callable, str, TeacherTargets]:
    """Live or cached teacher targets and the cache status (``hit``, ``built``, ``disabled: why``)."""
    live = TeacherTargets(setup.models.teacher, setup.plan, prefix="" if setup.shared_tokens else "teacher_",
                          dtype=cfg.cache.dtype)
    if not setup.plan.needs_teacher:
        return lambda batch: {}, "disabled: no loss term needs the teacher", live
    collate = textcls.Collate(setup.t_train, setup.train_set.labels)
    m = setup.models
    reader, status = open_cache(
        "bert-kd", cfg.cache, live.targets, setup.t_train.lengths, lambda rows: live.run(collate(rows.tolist())),
        lambda: text_key_parts(m.teacher_path, m.records["teacher"]["revision"], m.teacher_tokenizer, setup.train_set,
                               cfg.data.max_len),
        frozen=True)
    if reader is None:
        return live, status, live
    return CachedTargets(reader, next(m.teacher.parameters()).device), status, live


def _save_heads(module: KdStudent, path: Path) -> None:
    from safetensors.torch import save

    from mmkit.io import atomic_write

    tensors = {f"projections.{i}.weight": p.weight.detach().cpu().contiguous() for i, p in enumerate(module.projections)}
    with atomic_write(path, "wb") as fh:
        fh.write(save(tensors, metadata={"shared": str(len(module.projections) <= 1)}))


def _eval_metrics(setup: Setup, cfg: BertKdConfig, student: nn.Module) -> dict[str, Any]:
    es = setup.eval_set
    if es is None:
        return {}
    m = setup.models
    s_enc, t_enc = textcls.encode_both(m.student_tokenizer, m.teacher_tokenizer, es, cfg.data.max_len,
                                       setup.shared_tokens)
    return {"teacher": textcls.evaluate_classifier(m.teacher, t_enc, es, cfg.eval_batch_size),
            "student": textcls.evaluate_classifier(student, s_enc, es, cfg.eval_batch_size),
            "eval_examples": len(es)}


def _diagnostic(setup: Setup, cfg: BertKdConfig, student: nn.Module, out: Path, tag: str) -> dict[str, Any] | None:
    """The CCA grid on the evaluation split (else the training split); reuses ``cca_<tag>.json``
    when a resumed run already wrote it (``before`` describes the initial student)."""
    if not cfg.diagnostic.enabled:
        return None
    path = out / f"cca_{tag}.json"
    if tag == "before" and path.is_file():
        return json.loads(path.read_text())
    data = setup.eval_set or setup.train_set
    m = setup.models
    if data is setup.train_set:
        s_enc, t_enc = setup.s_train, setup.t_train
    else:
        s_enc, t_enc = textcls.encode_both(m.student_tokenizer, m.teacher_tokenizer, data, cfg.data.max_len,
                                           setup.shared_tokens)
    return diagnose(student, m.teacher, s_enc, t_enc, setup.layer_map, cfg.diagnostic, cfg.train.seed, out, tag,
                    setup.shared_tokens)


def run(cfg: BertKdConfig, out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``mmkit distill bert-kd``: (fine-tune the teacher,) diagnose, distil, evaluate, diagnose again."""
    from mmkit.config import config_dict
    from mmkit.core.seeding import seed_everything
    from mmkit.io import start_run, write_results

    run_dir: RunDir = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with run_dir.guard():
        seed_everything(cfg.train.seed)
        setup = prepare(cfg, run_dir.path)
        m = setup.models
        write_json(run_dir / "layer_map.json", {
            "student_layers": len(setup.layer_map), "teacher_layers": len(encoder_layers(m.teacher)),
            "map": setup.layer_map, "pairs": [[0, 0]] + [[j, t] for j, t in enumerate(setup.layer_map, 1)],
            "rule": "uniform: m(j) = floor(j * L_t / L_s + 1/2)" if cfg.layer_map == "uniform" else "explicit"})
        before = _diagnostic(setup, cfg, m.student, run_dir.path, "before")
        metrics: dict[str, Any] = {"cca_term": CCA_TERM, "layer_map": setup.layer_map,
                                   "attention_mode": setup.plan.att_mode,
                                   "params": param_counts(m.teacher, m.student)}
        if m.finetune is not None:
            metrics["teacher_finetune"] = m.finetune
        if not cfg.diagnose_only:
            metrics.update(distil(cfg, setup, run_dir))
            after = _diagnostic(setup, cfg, m.student, run_dir.path, "after")
        else:
            after = None
        for tag, report in (("before", before), ("after", after)):
            if report is not None:
                metrics[f"cca_mapped_mean_{tag}"] = report["mapped_mean"]
        data = {"train": setup.train_set.data, "eval": setup.eval_set.data if setup.eval_set else None}
        results = write_results(run_dir, method="bert-kd", config=config_dict(cfg), metrics=metrics,
                                seed=cfg.train.seed, models=dict(setup.models.records), data=data, cca_term=CCA_TERM)
        results["out"] = str(run_dir.path)
        return results


def distil(cfg: BertKdConfig, setup: Setup, run_dir: RunDir) -> dict[str, Any]:
    """Train the student (resumable), save ``checkpoint/`` and the projection heads, evaluate."""
    m, plan_ = setup.models, setup.plan
    source, cache_status, live = teacher_source(cfg, setup)
    qkv = [j for j, _ in plan_.att_pairs] if plan_.att_mode == "relation" else []
    n_proj = (1 if cfg.loss.hidden.shared_projection else len(plan_.hidden_pairs)) if plan_.weights["hid"] else 0
    module = KdStudent(m.student, m.student.config.hidden_size, m.teacher.config.hidden_size, n_proj, qkv)
    step = BertKdStep(plan_, source, m.teacher)
    extra = {} if setup.shared_tokens else {"teacher_": setup.t_train}
    record = {"method": "bert-kd", "teacher": m.records["teacher"], "layer_map": setup.layer_map, "cca_term": CCA_TERM}
    try:
        result = train(module, step, textcls.Indices(len(setup.train_set)), cfg.train, run_dir.path,
                       collate_fn=textcls.Collate(setup.s_train, setup.train_set.labels, extra),
                       callbacks=[step], save_fn=saver(m.student_tokenizer, record), final_dir="checkpoint")
    finally:  # the hooks must not outlive the run (repeated runs in one process would pile them up)
        live.close()
        if module.capture is not None:
            module.capture.remove()
    _save_heads(module, run_dir / HEADS_FILE)
    module.eval()
    stats = step.stats
    metrics: dict[str, Any] = {
        "cache": cache_status, "steps": result.step, "epochs": result.epoch, "train_examples": len(setup.train_set),
        "loss_final": stats.means(), "cca_skipped_batches": stats.cca_skipped, "cca_batches": stats.cca_batches,
    }
    if stats.cca_batches and stats.cca_skipped * 2 > stats.cca_batches:
        log.warning("the CCA term was skipped in %d of %d batches (fewer than %.1f x width tokens); use larger "
                    "batches or lower loss.cca.min_ratio", stats.cca_skipped, stats.cca_batches, plan_.cca.min_ratio)
    metrics.update(_eval_metrics(setup, cfg, m.student))
    return metrics


def build_cache(file: str | None = None, sets: Sequence[str] = (), flags: Mapping[str, Any] | None = None,
                out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``mmkit distill build-cache`` for bert-kd: fill the teacher cache and exit (the teacher must
    already be a classifier for the task: fine-tuning happens inside a bert-kd run)."""
    from mmkit.config import config_dict, load_config
    from mmkit.io import start_run, write_results

    cfg = load_config(BertKdConfig, file=file, flags=flags or {}, sets=list(sets))
    if cfg.cache.mode == "off":
        raise ConfigError("cache.mode is off: nothing to build", field="cache.mode")
    run_dir = start_run(out, "distill build-cache", cfg, overwrite=overwrite)
    with run_dir.guard():
        setup = prepare(cfg, None)
        _, status, live = teacher_source(cfg, setup)
        live.close()
        if status.startswith("disabled"):
            raise ConfigError(f"the teacher cache cannot be used: {status[len('disabled: '):]}", field="cache")
        metrics = {"cache": status, "examples": len(setup.train_set), "targets": [t.name for t in live.targets]}
        results = write_results(run_dir, method="bert-kd", config=config_dict(cfg), metrics=metrics,
                                seed=cfg.train.seed, models=dict(setup.models.records),
                                data={"train": setup.train_set.data})
        results["out"] = str(run_dir.path)
        return results
