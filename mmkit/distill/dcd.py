"""DCD: dynamic contrastive distillation of an image-text matching model (distill.md section 3).

The student keeps the teacher's frozen unimodal encoders (shared, not copied) and deep copies of
a few of its fusion layers, poolers and head. Per example (an image with one of its captions)
N random negatives are drawn from captions of other images (and other groups); the teacher
scores all 1 + N pairs, keeps the positive plus its K - 1 hardest negatives, and the student is
trained on those K pairs with a weighted imitation loss and a weighted hard-label loss whose
per-example weights come from the teacher's entropy. The released code's bugs are fixed unless
``reproduce_released`` (which restores bugs 1, 2 and 4 and dropout in the frozen parts).

After training (or with ``eval_only``) the teacher and student are evaluated in ``full`` mode
(every pair fused) and ``rerank`` mode (a dual-encoder shortlist re-ranked by the fusion model)
with ``core/ranking.py``, timed side by side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmkit.core.data import load_image, pad_flat, tokenize_flat
from mmkit.core.imagetext import ImageTextSet, load_image_text
from mmkit.core.itm import Encoded, ItmScorer, check_layers, itm_scorer, preprocess_images
from mmkit.core.seeding import stable_rng
from mmkit.core.train import Callback, ParamGroup, TrainConfig, TrainState, train
from mmkit.distill.common import Checkpointed, Indices, saver
from mmkit.errors import ConfigError, MmkitError
from mmkit.io import RunDir, percent
from mmkit.progress import Progress

log = logging.getLogger("mmkit")

COMMAND = "distill dcd"
MODES = ("full", "rerank")
#: HF ViLT names its per-layer norms ``layernorm_before``/``layernorm_after``: no decay either.
NO_DECAY_EXTRA = ["layernorm_before.weight", "layernorm_after.weight"]
DIAGNOSTICS_FILE = "dcd_diagnostics.json"


# --------------------------------------------------------------------------- configuration


def _train_defaults() -> TrainConfig:
    """The reference optimisation (section 3.5): AdamW (0.9, 0.98), lr 5e-6, wd 0.01, linear
    schedule with 10% warmup, 10 epochs, 512 examples per step (32 x 16 accumulation), seed 12345."""
    return TrainConfig(epochs=10, batch_size=32, grad_accum=16, lr=5e-6, optimizer="adamw", weight_decay=0.01,
                       betas=(0.9, 0.98), eps=1e-8, scheduler="linear", warmup_ratio=0.1, seed=12345,
                       no_decay=[*TrainConfig().no_decay, *NO_DECAY_EXTRA])


@dataclass
class TeacherConfig:
    id: str | None = None
    revision: str | None = None


@dataclass
class DataConfig:
    path: str | None = None  # training image-caption set (--data)
    image_root: str | None = None
    split: str = "train"
    eval_path: str | None = None  # --eval-data
    eval_split: str = "test"
    captions_per_image: int | str = "all"
    max_len: int = 40
    image_size: int | None = None  # None: the processor's own size (384 for released ViLT/BLIP)


@dataclass
class EvalConfig:
    modes: list[str] | None = None  # None: full, plus rerank when a shortlist source exists
    shortlist: str | None = None  # dual encoder id/dir; default: the teacher's contrastive head
    shortlist_revision: str | None = None
    rerank_k: int | str | None = None  # None: 128, capped at each gallery; an explicit K must fit the gallery
    batch_size: int = 256  # pairs per fusion forward
    encode_batch_size: int = 32
    protocol: Literal["full", "1k", "both"] = "full"
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class DcdConfig:
    """Everything ``mmkit distill dcd`` takes (built by ``mmkit.config.load_config``)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    negatives: int = 15
    topk: int = 8
    student_layers: list[int] | None = None
    alpha: float = 0.2
    temperature: float = 1.0
    score: Literal["logit", "prob"] = "logit"
    global_norm: bool = False
    lr_mult_fusion: float = 5.0
    lr_mult_head: float = 1.0
    fusion_batch_size: int = 256  # teacher pairs per fusion forward during training
    reproduce_released: bool = False
    eval_only: bool = False
    student: str | None = None  # a saved student directory (--eval-only)
    device: str = "auto"
    train: TrainConfig = field(default_factory=_train_defaults)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.negatives < 1:
            raise ConfigError(f"expected an integer >= 1, got {self.negatives}", field="negatives")
        if not 2 <= self.topk <= self.negatives + 1:
            raise ConfigError(f"K = {self.topk} must be in 2..{self.negatives + 1} (the positive plus at most "
                              f"--negatives {self.negatives} candidates)", field="topk")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"expected a weight in [0, 1], got {self.alpha}", field="alpha")
        if self.temperature <= 0:
            raise ConfigError(f"expected a positive temperature, got {self.temperature}", field="temperature")
        rk = self.eval.rerank_k
        if not (rk is None or rk == "all" or (isinstance(rk, int) and rk >= 1)):
            raise ConfigError(f"expected a positive integer or 'all', got {rk!r}", field="eval.rerank_k")
        for mode in self.eval.modes or []:
            if mode not in MODES:
                raise ConfigError(f"unknown mode {mode!r}; expected full or rerank", field="eval.modes")
        if self.eval_only:
            if not self.student:
                raise ConfigError("--eval-only needs --student DIR (a saved student)", field="student")
            if not self.data.eval_path:
                raise ConfigError("--eval-only needs --eval-data", field="data.eval_path")
        else:
            if not self.teacher.id:
                raise ConfigError("expected a teacher model (--teacher ID_OR_DIR)", field="teacher.id")
            if not self.data.path:
                raise ConfigError("expected a training image-caption set (--data FILE)", field="data.path")


# --------------------------------------------------------------------------- student layers


def default_student_layers(n: int, s: int | None = None) -> list[int]:
    """Evenly spaced fusion layers, first and last included (section 3.2): s = ceil(n/2) layers
    at 0-based positions floor(i (n-1)/(s-1) + 1/2), i = 0..s-1 (exact integer arithmetic)."""
    s = math.ceil(n / 2) if s is None else s
    if not 1 <= s <= n:
        raise ConfigError(f"expected 1..{n} student layers, got {s}", field="student_layers")
    if s == 1:
        return [0]
    return [(2 * i * (n - 1) + (s - 1)) // (2 * (s - 1)) for i in range(s)]


def build_student(teacher: ItmScorer, layers: Sequence[int]) -> ItmScorer:
    """The student of section 3.2: the teacher's class with the fusion stack cut to ``layers``.

    Its unimodal part is the teacher's own modules (shared, frozen); the fusion layers, poolers
    and head are deep copies (own memory) and the only trainable parameters.
    """
    teacher.model.requires_grad_(False)
    model = teacher.cut(check_layers(layers, teacher.num_fusion_layers))
    student = itm_scorer(model, teacher.processor, teacher.score_mode)
    for module in student.fusion_modules():
        module.requires_grad_(True)
    return student


def student_param_groups(student: ItmScorer, fusion_mult: float, head_mult: float,
                         prefix: str = "model.") -> list[ParamGroup]:
    """lr multipliers of section 3.5: fusion layers and poolers x ``fusion_mult``, head x ``head_mult``."""
    paths = [(student.layers_path, fusion_mult), *((p, fusion_mult) for p in student.pooler_paths),
             (student.head_path, head_mult)]
    return [ParamGroup(rf"^{re.escape(prefix + path)}\.", mult) for path, mult in paths]


class DcdStudent(nn.Module):
    """The module the training loop optimises: ``forward(encoded pairs) -> student scores``.

    ``train()`` keeps the shared frozen encoders in eval mode (no dropout) unless
    ``frozen_dropout`` (``--reproduce-released``).
    """

    def __init__(self, student: ItmScorer, frozen: Sequence[nn.Module], frozen_dropout: bool = False) -> None:
        super().__init__()
        self.model = student.model
        self.scorer = student
        self._frozen = list(frozen)
        self._frozen_dropout = frozen_dropout

    def forward(self, img_feats: torch.Tensor, img_mask: torch.Tensor, txt_feats: torch.Tensor,
                txt_mask: torch.Tensor) -> torch.Tensor:
        return self.scorer.fused_scores(Encoded(img_feats, img_mask), Encoded(txt_feats, txt_mask))

    def train(self, mode: bool = True) -> "DcdStudent":
        super().train(mode)
        if not self._frozen_dropout:
            for module in self._frozen:
                module.eval()
        return self


# --------------------------------------------------------------------------- negatives and selection


class NegativeSampler:
    """N negatives per example, uniformly without replacement from captions whose ``key``
    differs from the example's (its image, or its group), seeded by (seed, epoch, example).

    Captions are sorted by key once, so each example's candidates are everything outside one
    contiguous block: draw j in [0, N_t - block) and skip the block.
    """

    def __init__(self, key: np.ndarray, n: int, seed: int, unit: str = "image") -> None:
        key = np.asarray(key)
        self.order = np.argsort(key, kind="stable")
        uniq, first, counts = np.unique(key[self.order], return_index=True, return_counts=True)
        block = np.searchsorted(uniq, key)
        self.start, self.size = first[block], counts[block]
        self.n, self.seed = int(n), int(seed)
        pool = len(key) - self.size
        if len(key) and int(pool.min()) < n:
            e = int(np.argmin(pool))
            raise MmkitError(f"{n} negatives per example, but caption {e} has only {int(pool[e])} captions "
                             f"outside its {unit} ({len(key)} captions in all); lower --negatives or add data",
                             field="--negatives")

    def sample(self, examples: np.ndarray, epoch: int) -> np.ndarray:
        """Caption indices ``[len(examples), N]`` (one seeded draw per example)."""
        examples = np.asarray(examples, dtype=np.int64)
        total = len(self.order)
        j = np.empty((len(examples), self.n), dtype=np.int64)
        for row, e in enumerate(examples):
            rng = stable_rng(self.seed, "dcd-negatives", epoch, int(e))
            j[row] = rng.choice(total - int(self.size[e]), self.n, replace=False)
        j += self.size[examples][:, None] * (j >= self.start[examples][:, None])
        return self.order[j]


def select_candidates(s_t: torch.Tensor, k: int) -> torch.Tensor:
    """idx = [0, the K-1 negatives the teacher scores highest] (section 3.3, step 3; ties by index).

    ``s_t`` is [B, 1 + N] with the positive in column 0, which stays column 0 even when the
    teacher ranks it outside its top K (then its K-th best negative is dropped).
    """
    order = torch.sort(s_t[:, 1:], dim=1, descending=True, stable=True).indices[:, :k - 1] + 1
    return torch.cat([torch.zeros_like(order[:, :1]), order], dim=1)


def released_teacher_scores(s_t: torch.Tensor, k: int) -> torch.Tensor:
    """Bug (2) of section 3.6: the teacher's top-K scores kept in sorted order (misaligned with the
    student's positive-first columns whenever the teacher does not rank the positive first)."""
    return torch.sort(s_t, dim=1, descending=True, stable=True).values[:, :k]


# --------------------------------------------------------------------------- losses (section 3.4)


def teacher_entropy(t: torch.Tensor) -> torch.Tensor:
    """H_b = -sum_k p_bk log p_bk with p = softmax_k(t_b); 0 log 0 = 0 (``torch.special.entr``)."""
    return torch.special.entr(torch.softmax(t, dim=-1)).sum(-1)


def difficulty(entropy: torch.Tensor) -> torch.Tensor:
    """h_b = H_b / sum_b' H_b' (uniform 1/B when the sum is 0)."""
    total = entropy.sum()
    return torch.where(total > 0, entropy / total.clamp_min(torch.finfo(entropy.dtype).tiny),
                       torch.full_like(entropy, 1.0 / len(entropy)))


def kd_weights(h: torch.Tensor) -> torch.Tensor:
    """w_b = softmax_b((1 - h_b)^2): confident rows (low h) weigh more in L_KD."""
    return torch.softmax((1.0 - h) ** 2, dim=0)


def kd_loss(t: torch.Tensor, s: torch.Tensor, w: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_KD = T^2 sum_b w_b (1/K) sum_k (t_bk/T - s_bk/T)^2: per-example MSE, then weighted."""
    per_example = ((t / temperature - s / temperature) ** 2).mean(dim=1)
    return temperature ** 2 * (w * per_example).sum()


def released_kd_loss(t: torch.Tensor, s: torch.Tensor, w: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Bug (1) of section 3.6: the MSE is averaged to a scalar before the weights (which sum to 1)
    multiply it, so L_KD is the plain mean: T^2 mean_bk (t/T - s/T)^2 sum_b w_b."""
    return temperature ** 2 * ((t / temperature - s / temperature) ** 2).mean() * w.sum()


def hard_loss(s: torch.Tensor, h: torch.Tensor, probabilities: bool = False) -> torch.Tensor:
    """L_hard = sum_b h_b (1/K) sum_k BCEWithLogits(s_bk, y_k), y = (1, 0, ..., 0).

    With ``probabilities`` (``score: prob``) s is already sigmoid(l1 - l0) = softmax(itm)[1], and
    the same loss is the plain BCE on it.
    """
    y = torch.zeros_like(s)
    y[:, 0] = 1.0
    bce = F.binary_cross_entropy if probabilities else F.binary_cross_entropy_with_logits
    return (h * bce(s, y, reduction="none").mean(dim=1)).sum()


def _gather_entropy(entropy: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """All processes' entropies (``global_norm``) and this process's slice of them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return entropy, slice(0, len(entropy))
    n = torch.tensor([len(entropy)], device=entropy.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    parts = [torch.zeros(width, device=entropy.device, dtype=entropy.dtype) for _ in sizes]
    dist.all_gather(parts, F.pad(entropy, (0, width - len(entropy))))
    start = sum(int(s.item()) for s in sizes[:dist.get_rank()])
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]), slice(start, start + len(entropy))


def dcd_loss(t: torch.Tensor, s: torch.Tensor, alpha: float = 0.2, temperature: float = 1.0, *,
             released: bool = False, probabilities: bool = False, global_norm: bool = False) -> dict[str, torch.Tensor]:
    """L = alpha L_KD + (1 - alpha) L_hard (section 3.4) on teacher scores ``t`` and student scores
    ``s`` [B, K] (positive first); p, H, h and w come from ``t`` and carry no gradient. Runs in
    float32 with autocast off. Returns the loss, both terms and H, h, w."""
    with torch.autocast(device_type=s.device.type, enabled=False):
        t, s = t.detach().float(), s.float()
        entropy = teacher_entropy(t)
        pool, mine = _gather_entropy(entropy) if global_norm else (entropy, slice(0, len(entropy)))
        h_all = difficulty(pool)
        h, w = h_all[mine], kd_weights(h_all)[mine]
        kd = (released_kd_loss if released else kd_loss)(t, s, w, temperature)
        hard = hard_loss(s, h, probabilities)
        return {"loss": alpha * kd + (1.0 - alpha) * hard, "kd": kd, "hard": hard, "entropy": entropy,
                "h": h, "w": w}


# --------------------------------------------------------------------------- one training step


@dataclass
class Diagnostics(Checkpointed):
    """Training diagnostics (section 3.9): where the teacher ranked positives, mean H, w/h ranges."""

    examples: int = 0
    positive_first: int = 0
    positive_outside: int = 0
    entropy_sum: float = 0.0
    w_min: float = math.inf
    w_max: float = -math.inf
    h_min: float = math.inf
    h_max: float = -math.inf

    def update(self, s_t: torch.Tensor, k: int, out: dict[str, torch.Tensor]) -> None:
        rank = (s_t[:, 1:] > s_t[:, :1]).sum(1)  # ties go to the positive (column 0)
        self.examples += len(rank)
        self.positive_first += int((rank == 0).sum())
        self.positive_outside += int((rank >= k).sum())
        self.entropy_sum += float(out["entropy"].sum())
        self.w_min, self.w_max = min(self.w_min, float(out["w"].min())), max(self.w_max, float(out["w"].max()))
        self.h_min, self.h_max = min(self.h_min, float(out["h"].min())), max(self.h_max, float(out["h"].max()))

    def metrics(self) -> dict[str, Any]:
        n = self.examples
        finite = (lambda v: v if math.isfinite(v) else None)
        return {"examples_seen": n,
                "teacher_positive_first_pct": percent(self.positive_first, n, "teacher_positive_first_pct"),
                "teacher_positive_outside_topk_pct": percent(self.positive_outside, n,
                                                             "teacher_positive_outside_topk_pct"),
                "mean_entropy": self.entropy_sum / n if n else None,
                "w_min": finite(self.w_min), "w_max": finite(self.w_max),
                "h_min": finite(self.h_min), "h_max": finite(self.h_max)}


class DcdStep(Callback):
    """The training loss of one DCD step (section 3.3) plus the hooks it needs from the loop:
    the current epoch (for the negatives), the device, and diagnostics saved with checkpoints."""

    def __init__(self, teacher: ItmScorer, tokens: Any, sampler: NegativeSampler, cfg: DcdConfig) -> None:
        self.teacher, self.tokens, self.sampler, self.cfg = teacher, tokens, sampler, cfg
        self.pad_id = teacher.pad_id()
        self.state: TrainState | None = None  # set by the loop; epoch 0 when called directly
        self.diagnostics = Diagnostics()

    def on_train_begin(self, state: TrainState) -> None:
        self.state = state
        self.teacher.model.to(state.accelerator.device)
        self.diagnostics = Diagnostics.resume(state.out, DIAGNOSTICS_FILE) or self.diagnostics

    def on_save(self, state: TrainState, checkpoint: Path) -> None:
        self.diagnostics.save(state, checkpoint / DIAGNOSTICS_FILE)

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        cfg, n1, k = self.cfg, self.cfg.negatives + 1, self.cfg.topk
        examples = batch["index"].cpu().numpy()
        b = len(examples)
        epoch = self.state.epoch if self.state is not None else 0
        captions = np.concatenate([examples[:, None], self.sampler.sample(examples, epoch)], axis=1)
        ids, mask = pad_flat(self.tokens, captions.reshape(-1), self.pad_id)
        pixels = batch["pixel_values"]
        device = pixels.device
        with torch.no_grad():
            images = self.teacher.encode_image(pixels, batch.get("pixel_mask"))  # once per image
            texts = self.teacher.encode_text(ids.to(device), mask.to(device))
            pairs = torch.arange(b * n1, device=device)
            s_t = self.teacher.pair_scores(images, texts, pairs // n1, pairs, batch_size=cfg.fusion_batch_size)
            s_t = s_t.view(b, n1)
            idx = select_candidates(s_t, k)
            t = released_teacher_scores(s_t, k) if cfg.reproduce_released else s_t.gather(1, idx)
        rows = (torch.arange(b, device=device)[:, None] * n1 + idx).reshape(-1)
        img_rows = torch.arange(b, device=device).repeat_interleave(k)
        s = model(images.feats[img_rows], images.mask[img_rows], texts.feats[rows], texts.mask[rows]).view(b, k)
        out = dcd_loss(t, s, cfg.alpha, cfg.temperature, released=cfg.reproduce_released,
                       probabilities=cfg.score == "prob", global_norm=cfg.global_norm)
        self.diagnostics.update(s_t, k, out)
        return {"loss": out["loss"], "kd": out["kd"].detach(), "hard": out["hard"].detach(),
                "entropy": out["entropy"].mean(), "w_max": out["w"].max()}


class _ImageCollate:
    """Loads and preprocesses the examples' images (picklable: holds the processor, not the model)."""

    def __init__(self, images: Sequence[Any], text_to_image: np.ndarray, processor: Any) -> None:
        self.images, self.text_to_image, self.processor = images, text_to_image, processor

    def __call__(self, examples: list[int]) -> dict[str, torch.Tensor]:
        return preprocess_images(self.processor, [load_image(self.images[self.text_to_image[e]]) for e in examples])


def train_student(teacher: ItmScorer, data: ImageTextSet, cfg: DcdConfig, out: Path,
                  teacher_record: dict[str, Any] | None = None) -> tuple[ItmScorer, dict[str, Any]]:
    """Build the student, train it with ``core.train.train`` (resumable) and save ``out/student``.

    Returns the trained student (sharing the teacher's encoders) and the training metrics.
    """
    layers = list(cfg.student_layers) if cfg.student_layers else default_student_layers(teacher.num_fusion_layers)
    layers = check_layers(layers, teacher.num_fusion_layers)
    student = build_student(teacher, layers)
    teacher.model.train(cfg.reproduce_released)
    module = DcdStudent(student, teacher.unimodal_modules(), frozen_dropout=cfg.reproduce_released)
    if cfg.reproduce_released:
        key, unit = np.arange(data.n_texts), "own caption"  # bug (4): same-image captions allowed
    elif data.text_group is not None:
        key, unit = data.text_group, "group"
    else:
        key, unit = data.text_to_image, "image"
    sampler = NegativeSampler(key, cfg.negatives, cfg.train.seed, unit)
    tokens = tokenize_flat(teacher.tokenizer, data.captions, max_length=cfg.data.max_len)
    step = DcdStep(teacher, tokens, sampler, cfg)
    tcfg = dataclasses.replace(cfg.train, param_groups=[
        *student_param_groups(student, cfg.lr_mult_fusion, cfg.lr_mult_head), *cfg.train.param_groups])
    record = {"method": "dcd", "teacher": teacher_record or {}, "student_layers": layers,
              "teacher_fusion_layers": teacher.num_fusion_layers}
    log.info("student: fusion layers %s of %d; %d examples, N = %d negatives, K = %d",
             layers, teacher.num_fusion_layers, data.n_texts, cfg.negatives, cfg.topk)
    result = train(module, step, Indices(data.n_texts), tcfg, out,  # one example per (image, caption) pair
                   collate_fn=_ImageCollate(data.images, data.text_to_image, teacher.processor),
                   callbacks=[step], save_fn=saver(teacher.processor, record), final_dir="student")
    module.eval()
    teacher.model.eval()
    metrics = {"steps": result.step, "epochs": result.epoch, "examples": data.n_texts, "negatives": cfg.negatives,
               "topk": cfg.topk, "student_layers": layers, "teacher_fusion_layers": teacher.num_fusion_layers,
               **step.diagnostics.metrics()}
    if result.history:
        metrics["final_loss"] = result.history[-1].get("loss")
    return student, metrics


# --------------------------------------------------------------------------- evaluation (section 3.7)


@dataclass
class Timer:
    """Wall-clock seconds of a block, CUDA synchronised on both ends."""

    seconds: float = 0.0

    def __enter__(self) -> "Timer":
        _sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync()
        self.seconds += time.perf_counter() - self._t0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def full_scores(scorer: ItmScorer, images: Encoded, texts: Encoded, batch_size: int = 256) -> torch.Tensor:
    """The fusion score of every image-caption pair, ``sims`` [N_i, N_t] (float32, CPU)."""
    n_i, n_t = len(images), len(texts)
    device = images.feats.device
    out = torch.empty(n_i * n_t, dtype=torch.float32)
    with Progress(n_i * n_t, "scoring every pair") as bar:
        for start in range(0, n_i * n_t, batch_size):
            pairs = torch.arange(start, min(start + batch_size, n_i * n_t), device=device)
            out[start:start + len(pairs)] = scorer.pair_scores(images, texts, pairs // n_t, pairs % n_t,
                                                               batch_size=batch_size).float().cpu()
            bar.update(len(pairs))
    return out.view(n_i, n_t)


@dataclass
class EvalModel:
    """A model to evaluate: its scorer and, once encoded, its image and caption features."""

    name: str
    scorer: ItmScorer
    images: Encoded | None = None
    texts: Encoded | None = None


def _encode(models: Sequence[EvalModel], data: ImageTextSet, cfg: DcdConfig) -> float:
    """Encode the set once per distinct unimodal part (a student shares its teacher's); seconds."""
    done: dict[tuple[int, ...], EvalModel] = {}
    with Timer() as timer:
        for m in models:
            key = tuple(id(x) for x in m.scorer.unimodal_modules())
            if key in done:
                m.images, m.texts = done[key].images, done[key].texts
                continue
            m.images = m.scorer.encode_image_files(data.images, batch_size=cfg.eval.encode_batch_size)
            m.texts = m.scorer.encode_captions(data.captions, cfg.data.max_len, batch_size=cfg.eval.batch_size)
            done[key] = m
    return timer.seconds


def _shortlist(data: ImageTextSet, cfg: DcdConfig, teacher: EvalModel | None) -> tuple[Any, dict[str, Any]] | None:
    """The dual-encoder shortlist (``EmbeddingScores``) and its description, or None."""
    from mmkit.core.ranking import EmbeddingScores

    if cfg.eval.shortlist:
        from mmkit.core.embed import encode_images, encode_texts
        from mmkit.core.models import load_model

        lm = load_model(cfg.eval.shortlist, "dual-encoder", revision=cfg.eval.shortlist_revision,
                        device=str(teacher.scorer.device) if teacher else cfg.device)
        with Timer() as timer:
            img = encode_images(data.images, loaded=lm, batch_size=cfg.eval.encode_batch_size)
            txt = encode_texts(data.captions, loaded=lm, batch_size=cfg.eval.batch_size)
        return EmbeddingScores(img, txt), {"id": cfg.eval.shortlist, "revision": lm.revision,
                                           "encode_s": round(timer.seconds, 4)}
    if teacher is not None and teacher.scorer.has_contrastive:
        with Timer() as timer:
            img, txt = teacher.scorer.contrastive_embeddings(teacher.images, data.captions, cfg.data.max_len,
                                                             cfg.eval.batch_size)
        return EmbeddingScores(img.float().cpu(), txt.float().cpu()), {
            "id": "teacher contrastive head", "revision": None, "encode_s": round(timer.seconds, 4)}
    return None


def _save_scores(path: Path, tensors: dict[str, torch.Tensor], data: ImageTextSet) -> None:
    from safetensors.torch import save

    from mmkit.io import atomic_write

    tensors = dict(tensors, text_to_image=torch.as_tensor(data.text_to_image, dtype=torch.long))
    if data.image_group is not None:
        tensors.update(image_group=torch.as_tensor(data.image_group, dtype=torch.long),
                       text_group=torch.as_tensor(data.text_group, dtype=torch.long))
    with atomic_write(path, "wb") as fh:
        fh.write(save({k: v.contiguous() for k, v in tensors.items()}))


def _warm_up(m: EvalModel, batch_size: int) -> None:
    n = min(batch_size, len(m.texts))
    m.scorer.pair_scores(m.images, m.texts, torch.zeros(n, dtype=torch.long, device=m.images.feats.device),
                         torch.arange(n, device=m.images.feats.device), batch_size=batch_size)


def evaluate(models: Sequence[EvalModel], data: ImageTextSet, cfg: DcdConfig, out: Path | None = None,
             modes: Sequence[str] | None = None) -> dict[str, Any]:
    """R@K/RSUM of every model in every mode, timed side by side (section 3.7).

    ``modes`` (default ``cfg.eval.modes``; None: full, plus rerank when a shortlist exists).
    ``rerank`` uses ``cfg.eval.shortlist``, else the teacher's contrastive head. Writes
    ``scores_<model>_<mode>.safetensors`` into ``out`` when given.
    """
    from mmkit.core.ranking import rerank_metrics, retrieval_metrics

    explicit = modes if modes is not None else cfg.eval.modes
    relevance = data.relevance()
    k = rerank_k(cfg.eval.rerank_k, data)
    teacher = next((m for m in models if m.name == "teacher"), None)
    with torch.inference_mode():
        encode_s = _encode(models, data, cfg)
        shortlist = _shortlist(data, cfg, teacher) if explicit is None or "rerank" in explicit else None
        if shortlist is None and explicit is not None and "rerank" in explicit:
            raise MmkitError("rerank needs a shortlist: pass --shortlist DUAL_ENCODER (this model has no "
                             "contrastive head of its own)", field="--shortlist")
        run_modes = list(explicit) if explicit is not None else ["full"] + (["rerank"] if shortlist else [])
        if explicit is None and shortlist is None:
            log.warning("no shortlist model (--shortlist) and no contrastive head: rerank mode skipped")
        metrics: dict[str, Any] = {m.name: {} for m in models}
        timing: dict[str, Any] = {}
        queries = data.n_images + data.n_texts
        for m in models:
            _warm_up(m, cfg.eval.batch_size)
            for mode in run_modes:
                if mode == "full":
                    with Timer() as timer:
                        sims = full_scores(m.scorer, m.images, m.texts, cfg.eval.batch_size)
                    pairs = sims.numel()
                    result = retrieval_metrics(sims, relevance, protocol=cfg.eval.protocol, ks=cfg.eval.recall_k)
                    tensors = {"sims": sims}
                else:
                    scored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
                    score = m.scorer.score_fn(m.images, m.texts, batch_size=cfg.eval.batch_size)

                    def recording(i: torch.Tensor, t: torch.Tensor, score=score, scored=scored) -> torch.Tensor:
                        s = score(i, t).float().cpu()
                        scored.append((torch.as_tensor(i).cpu(), torch.as_tensor(t).cpu(), s))
                        return s

                    with Timer() as timer:
                        result = rerank_metrics(shortlist[0], recording, relevance, k=k, protocol=cfg.eval.protocol,
                                                ks=cfg.eval.recall_k, batch_size=cfg.eval.batch_size)
                    pairs = sum(len(s) for _, _, s in scored)
                    sl = shortlist[0]
                    tensors = {"shortlist": (sl.image_embeds @ sl.text_embeds.T).float().cpu(),
                               "itm_image": torch.cat([x[0] for x in scored]).long(),
                               "itm_text": torch.cat([x[1] for x in scored]).long(),
                               "itm_score": torch.cat([x[2] for x in scored])}
                metrics[m.name][mode] = result
                timing[f"{m.name}_{mode}"] = {"fusion_s": round(timer.seconds, 4), "pairs_scored": int(pairs),
                                              "queries": queries,
                                              "ms_per_query": 1000.0 * timer.seconds / queries,
                                              "queries_per_s": queries / timer.seconds if timer.seconds > 0 else None}
                if out is not None:
                    _save_scores(out / f"scores_{m.name}_{mode}.safetensors", tensors, data)
    timing["encoders_s"] = round(encode_s, 4)
    timing["device"] = str(models[0].scorer.device)
    timing["batch_size"] = cfg.eval.batch_size
    timing["ratios"] = speedups(timing)
    out_metrics: dict[str, Any] = {**metrics, "timing": timing, "modes": run_modes}
    if "rerank" in run_modes:
        out_metrics["rerank"] = {"k": k, "shortlist": shortlist[1]}
    return out_metrics


def rerank_k(k: int | str | None, data: ImageTextSet) -> int | str:
    """The re-ranking depth: ``None`` is 128 (capped at each gallery by the re-ranker); an explicit
    K larger than the smaller gallery is a user mistake (``all`` re-scores every pair)."""
    from mmkit.core.ranking import DEFAULT_RERANK_K

    if k is None or k == "all":
        return DEFAULT_RERANK_K if k is None else k
    smallest = min(data.n_images, data.n_texts)
    if k > smallest:
        raise MmkitError(f"K = {k} is larger than the gallery ({data.n_images} images, {data.n_texts} captions); "
                         "use a smaller K or 'all' to re-score every pair", file=data.source, field="--rerank-k")
    return k


def speedups(timing: dict[str, Any]) -> dict[str, float]:
    """Measured speed-ups (per-query time ratios): every run over the teacher's full scoring, and
    the student over the teacher in the same mode."""
    per_query = {name: t["ms_per_query"] for name, t in timing.items()
                 if isinstance(t, dict) and t.get("ms_per_query")}
    out = {f"teacher_full/{name}": per_query["teacher_full"] / v for name, v in per_query.items()
           if "teacher_full" in per_query and name != "teacher_full"}
    for mode in MODES:
        if f"teacher_{mode}" in per_query and f"student_{mode}" in per_query:
            out.setdefault(f"teacher_{mode}/student_{mode}",
                           per_query[f"teacher_{mode}"] / per_query[f"student_{mode}"])
    return out


# --------------------------------------------------------------------------- the command


def load_scorer(name: str, revision: str | None, cfg: DcdConfig) -> tuple[ItmScorer, dict[str, Any]]:
    """Load an ITM model (``core.models`` kind ``itm``) and its scorer; returns ``(scorer, record)``."""
    from mmkit.core.models import load_model

    lm = load_model(name, "itm", revision=revision, device=cfg.device, dtype="float32")
    scorer = itm_scorer(lm.model.eval(), lm.preprocessor, cfg.score)
    if cfg.data.image_size:
        scorer.set_image_size(cfg.data.image_size)
    return scorer, lm.record()


def run(cfg: DcdConfig, out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``mmkit distill dcd``: train (or load) a student, evaluate, write ``results.json``."""
    from mmkit.config import config_dict
    from mmkit.core.seeding import seed_everything
    from mmkit.io import start_run, write_results

    def load(path: str, split: str) -> ImageTextSet:
        return load_image_text(path, image_root=cfg.data.image_root, split=split,
                               captions_per_image=cfg.data.captions_per_image)

    run_dir: RunDir = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with run_dir.guard():
        seed_everything(cfg.train.seed)
        train_set = None if cfg.eval_only else load(cfg.data.path, cfg.data.split)
        eval_set = load(cfg.data.eval_path, cfg.data.eval_split) if cfg.data.eval_path else None
        if eval_set is not None:
            rerank_k(cfg.eval.rerank_k, eval_set)  # fail before training, not after
        models: dict[str, dict[str, Any]] = {}
        metrics: dict[str, Any] = {}
        to_eval: list[EvalModel] = []
        teacher = None
        if cfg.teacher.id:
            teacher, models["teacher"] = load_scorer(cfg.teacher.id, cfg.teacher.revision, cfg)
            to_eval.append(EvalModel("teacher", teacher))
        if cfg.eval_only:
            student, models["student"] = load_scorer(cfg.student, None, cfg)
        else:
            student, metrics["train"] = train_student(teacher, train_set, cfg, run_dir.path, models["teacher"])
            models["student"] = {"id": str(run_dir / "student"), "revision": None}
        to_eval.append(EvalModel("student", student))
        if eval_set is not None:
            modes = cfg.eval.modes
            metrics.update(evaluate(to_eval, eval_set, cfg, run_dir.path, modes))
            if "rerank" in metrics.get("modes", []):
                models["shortlist"] = {"id": metrics["rerank"]["shortlist"]["id"],
                                       "revision": metrics["rerank"]["shortlist"]["revision"]}
        else:
            log.info("no --eval-data: skipping retrieval evaluation")
        data = {"train": train_set.data if train_set else None, "eval": eval_set.data if eval_set else None}
        results = write_results(run_dir, method="dcd", config=config_dict(cfg), metrics=metrics,
                                seed=cfg.train.seed, models=models, data=data)
        results["out"] = str(run_dir.path)
        return results
