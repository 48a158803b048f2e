"""The proxy model and its training run, which records the training dynamics (prune.md sections 4, 8).

Training goes through :func:`mmkit.core.train.train` (accelerate: one process or many); the
recorder hooks in as a callback, so every example is recorded exactly once per epoch on
whichever rank holds it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmkit.core.train import Callback, TrainConfig, TrainState, train
from mmkit.errors import ConfigError, ModelError
from mmkit.prune.data import ImageSet, IndexedDataset, training_examples
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

RECORD_MODES = ("eval-pass", "inline", "train-forward")
DEFAULT_CHANNELS = ("p_true", "correct", "margin", "el2n", "entropy")


@dataclass
class ProxyConfig:
    """The proxy model and how it trains (prune.md section 8 defaults for the small presets)."""

    model: str = "auto"  # auto = the dataset preset's model
    init: str = "scratch"  # scratch | pretrained
    epochs: int | None = None  # None = the preset's K
    batch_size: int | None = None  # None = 64 for small images, else 256
    lr: float | None = None  # None = 0.05 for mlp/small-cnn, else 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    mixed_precision: str = "auto"  # auto = fp16 on CUDA, else no
    num_workers: int = 0
    eval_batch_size: int = 512
    record_mode: str = "eval-pass"
    channels: list[str] = field(default_factory=lambda: list(DEFAULT_CHANNELS))
    dtype: str = "float16"

    def validate(self) -> None:
        if self.record_mode not in RECORD_MODES:
            raise ConfigError(f"expected one of {', '.join(RECORD_MODES)}, got {self.record_mode!r}",
                              field="--record-mode")
        if self.init not in ("scratch", "pretrained"):
            raise ConfigError(f"expected scratch or pretrained, got {self.init!r}", field="--init")


# --------------------------------------------------------------------------- models

MODELS: Registry = Registry("proxy model")


class MLP(nn.Module):
    """Flatten, Linear(D, 256), ReLU, Linear(256, C)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


class SmallCNN(nn.Module):
    """Conv(c, 16, 3) ReLU MaxPool2, Conv(16, 32, 3) ReLU MaxPool2, Linear(32*H/4*W/4, 64) ReLU, Linear(64, C)."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (height // 4) * (width // 4), 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def _input_shape(data: ImageSet) -> tuple[int, int, int]:
    if data.arrays is not None:
        return tuple(data.arrays.shape[1:])  # type: ignore[return-value]
    return (3, data.view.size, data.view.size)


@MODELS.register("mlp")
def build_mlp(data: ImageSet, init: str) -> nn.Module:
    return MLP(int(np.prod(_input_shape(data))), data.num_classes)


@MODELS.register("small-cnn")
def build_small_cnn(data: ImageSet, init: str) -> nn.Module:
    c, h, w = _input_shape(data)
    if max(h, w) > 64:
        raise ConfigError(f"small-cnn is for images of 64 px or less, got {h}x{w} (use --model resnet-50 or "
                          "--image-size)", field="--model")
    # channels_last: 1.5x faster convolutions on this CPU (74 vs 109 ms per step at batch 64)
    return SmallCNN(c, h, w, data.num_classes).to(memory_format=torch.channels_last)


def _hf_from_config(config_class: str) -> Callable[[ImageSet, str], nn.Module]:
    def build(data: ImageSet, init: str) -> nn.Module:
        import transformers
        from transformers import AutoModelForImageClassification

        if init == "pretrained":
            raise ConfigError("built-in architectures have no weights; pass a checkpoint id or path for "
                              "--init pretrained", field="--init")
        c, h, _ = _input_shape(data)
        config = getattr(transformers, config_class)(num_labels=data.num_classes, num_channels=c, image_size=h)
        return AutoModelForImageClassification.from_config(config)
    return build


MODELS.register("resnet-50")(_hf_from_config("ResNetConfig"))
MODELS.register("convnext-tiny")(_hf_from_config("ConvNextConfig"))
MODELS.register("swin-tiny")(_hf_from_config("SwinConfig"))


def build_model(name: str, data: ImageSet, init: str = "scratch", seed: int | None = None) -> nn.Module:
    """A registered architecture, or any image classifier id/path through ``AutoConfig``; with
    ``seed``, the random initialisation is a function of the seed alone."""
    if seed is not None:
        from mmkit.core.seeding import seed_everything

        seed_everything(seed)
    if name in MODELS:
        return MODELS.resolve(name)(data, init)
    from transformers import AutoConfig, AutoModelForImageClassification

    from mmkit.core.models import resolve_source

    path = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=data.num_classes)
    except (OSError, ValueError) as exc:
        raise ModelError(f"not a registered proxy model ({', '.join(sorted(MODELS))}) and not a loadable "
                         f"image classifier: {str(exc).splitlines()[0]}", file=name, field="--model") from None
    if init == "pretrained":
        return AutoModelForImageClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    return AutoModelForImageClassification.from_config(config)


def logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Class logits of a built-in or ``transformers`` image classifier."""
    out = model(pixel_values=pixel_values)
    return out if torch.is_tensor(out) else out.logits


# --------------------------------------------------------------------------- training


def classification_loss(record_mode: str) -> Callable[[nn.Module, dict], dict]:
    """Cross-entropy, plus the logits the recorder reads in ``train-forward`` / ``inline`` mode."""

    def loss_fn(model: nn.Module, batch: dict) -> dict:
        logits = logits_of(model, batch["pixel_values"])
        out: dict[str, Any] = {"loss": F.cross_entropy(logits.float(), batch["labels"])}
        if record_mode == "train-forward":
            out["record_logits"] = logits.detach()
        elif record_mode == "inline":  # a no-grad eval-mode pass on the clean view, before the step
            model.eval()
            with torch.no_grad():
                out["record_logits"] = logits_of(model, batch["pixel_values_clean"])
            model.train()
        return out

    return loss_fn


def rank_loader(data: ImageSet, rank: int, world_size: int, batch_size: int, num_workers: int = 0):
    """The un-augmented view of this rank's examples (``rank::world_size``: each exactly once)."""
    from torch.utils.data import DataLoader, Subset

    ds = IndexedDataset(data, train=False)
    return DataLoader(Subset(ds, range(rank, len(ds), world_size)), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers)


class RecordCallback(Callback):
    """Feeds :class:`~mmkit.prune.dynamics.DynamicsRecorder` from the training loop."""

    def __init__(self, make_recorder: Callable[[int, int], Any], data: ImageSet, record_mode: str,
                 eval_batch_size: int, num_workers: int = 0) -> None:
        self.make_recorder, self.data, self.mode = make_recorder, data, record_mode
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.recorder = None
        self.done: set[int] = set()
        self.open_epoch: int | None = None

    def on_train_begin(self, state: TrainState) -> None:
        from mmkit.prune.dynamics import completed_epochs

        acc = state.accelerator
        self.recorder = self.make_recorder(acc.process_index, acc.num_processes)
        self.done = set(completed_epochs(self.recorder.out_dir))

    def on_batch_end(self, state: TrainState, batch: dict, outputs: dict) -> None:
        if self.mode == "eval-pass" or state.epoch in self.done:
            return
        if self.open_epoch != state.epoch:
            self.recorder.begin_epoch(state.epoch)
            self.open_epoch = state.epoch
        self.recorder.update(batch["index"], outputs["record_logits"], batch["labels"])

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch in self.done:
            return
        if self.mode == "eval-pass":
            self.recorder.begin_epoch(state.epoch)
            acc = state.accelerator
            loader = rank_loader(self.data, acc.process_index, acc.num_processes, self.eval_batch_size,
                                 self.num_workers)
            self.recorder.record_pass(state.model, loader)
        self.recorder.end_epoch()
        self.done.add(state.epoch)
        self.open_epoch = None

    def on_train_end(self, state: TrainState) -> None:
        self.recorder.close()
        state.accelerator.wait_for_everyone()  # every rank's epoch files are complete on return


def accuracy(model: nn.Module, data: ImageSet, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent on the un-augmented view (no grad, eval mode)."""
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    correct = total = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for _, x, y in DataLoader(IndexedDataset(data, train=False), batch_size=batch_size):
            correct += int((logits_of(model, x.to(device)).argmax(-1).cpu() == y).sum())
            total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def train_config(cfg: ProxyConfig, data: ImageSet, epochs: int, seed: int) -> TrainConfig:
    """The proxy trainer's settings (SGD 0.9, cosine, wd 5e-4; batch 64 / lr 0.05 for small inputs)."""
    small = data.arrays is not None
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("fp16" if torch.cuda.is_available() else "no")
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size or (64 if small else 256),
                       lr=cfg.lr or (0.05 if small else 0.1), optimizer=cfg.optimizer, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, scheduler=cfg.scheduler, warmup_ratio=cfg.warmup_ratio,
                       max_grad_norm=0.0, mixed_precision=mp, seed=seed, drop_last=False,
                       num_workers=cfg.num_workers, no_decay=[], log_every=10)


def record_dynamics(data: ImageSet, cfg: ProxyConfig, model_name: str, epochs: int, out: Path, seed: int,
                    meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the proxy for ``epochs`` epochs under ``out/proxy`` and record dynamics into
    ``out/dynamics``. A rerun resumes training and recording after the last complete epoch."""
    from mmkit.prune.dynamics import DynamicsRecorder, completed_epochs

    cfg.validate()
    dyn_dir = out / "dynamics"
    if len(completed_epochs(dyn_dir)) >= epochs:
        log.info("dynamics for %d epochs already recorded in %s", epochs, dyn_dir)
        return {"resumed": True}
    model = build_model(model_name, data, cfg.init, seed=seed)
    meta = {"dataset": data.describe(), "model": model_name, "seed": seed, "epochs_planned": epochs,
            "proxy": asdict(cfg), **(meta or {})}

    def make_recorder(rank: int, world_size: int) -> DynamicsRecorder:
        return DynamicsRecorder(dyn_dir, num_samples=len(data), num_classes=data.num_classes, labels=data.labels,
                                channels=tuple(cfg.channels), dtype=cfg.dtype, record_mode=cfg.record_mode,
                                rank=rank, world_size=world_size, meta=meta, classes=data.classes)

    callback = RecordCallback(make_recorder, data, cfg.record_mode, cfg.eval_batch_size, cfg.num_workers)
    eval_fn = (lambda m: {"test_acc": accuracy(m, data.test, cfg.eval_batch_size)}) if data.test is not None else None
    result = train(model, classification_loss(cfg.record_mode),
                   training_examples(data, both=cfg.record_mode == "inline"),
                   train_config(cfg, data, epochs, seed), out / "proxy", callbacks=[callback], eval_fn=eval_fn)
    final = result.evaluations[-1] if result.evaluations else {}
    return {"steps": result.step, "test_acc": final.get("test_acc"), "resumed": result.resumed_from is not None}
