"""The one training loop, on accelerate. Methods plug in a loss; they do not write loops.

``train(model, loss_fn, data, config, out)`` runs: seeded epoch orders, gradient accumulation,
mixed precision, clipping, AdamW/SGD with per-group learning rates, warmup + constant/linear/
cosine decay, periodic evaluation, callbacks (per batch with example indices and outputs, per
optimizer step, per epoch), checkpoints (``save_pretrained`` safetensors + ``save_state``) and
resume from the latest checkpoint in ``out``, with rich progress on a terminal.

A killed run resumes to bitwise the same weights: epoch orders are pure functions of
(seed, epoch), the dataloader has its own generator, and accelerate restores the RNGs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmkit.core.seeding import stable_rng
from mmkit.errors import ConfigError, MmkitError
from mmkit.io import atomic_dir, write_json, write_jsonl
from mmkit.progress import Progress
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

LossFn = Callable[[torch.nn.Module, dict], Mapping[str, Any]]
CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------- configuration


@dataclass
class ParamGroup:
    """Parameters whose name matches ``pattern`` (a regex, ``re.search``) train at
    ``lr * lr_mult``, with their own weight decay when given. The first match wins."""

    pattern: str
    lr_mult: float = 1.0
    weight_decay: float | None = None


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`; methods set their papers' defaults."""

    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when set
    batch_size: int = 8  # per device; with several streams, each Stream's per_step counts instead
    grad_accum: int = 1
    lr: float = 5e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    drop_last: bool = False
    eval_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    save_every: int = 0  # optimizer steps, besides the checkpoint at every epoch end; 0 = epoch ends only
    keep_checkpoints: int = 2
    checkpoints: bool = True  # False: no checkpoints and no resume (short throwaway runs)
    log_every: int = 10
    num_workers: int = 0
    param_groups: list[ParamGroup] = field(default_factory=list)
    no_decay: list[str] = field(default_factory=lambda: ["bias", "LayerNorm.weight", "layer_norm.weight",
                                                         "layernorm.weight", "norm.weight"])

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected an integer >= 1, got {getattr(self, name)}", field=name)
        if self.lr <= 0:
            raise ConfigError(f"expected a positive learning rate, got {self.lr}", field="lr")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"expected a ratio in [0, 1), got {self.warmup_ratio}", field="warmup_ratio")
        OPTIMIZERS.resolve(self.optimizer, field="optimizer")
        SCHEDULERS.resolve(self.scheduler, field="scheduler")


# --------------------------------------------------------------------------- registries

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULERS: Registry = Registry("scheduler")


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _warmup(step: int, warmup: int) -> float | None:
    return (step + 1) / (warmup + 1) if step < warmup else None


@SCHEDULERS.register("constant")
def constant_schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup from ~0 to 1, then 1."""
    return _warmup(step, warmup) or 1.0


@SCHEDULERS.register("linear")
def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 0 at ``total``."""
    w = _warmup(step, warmup)
    return w if w is not None else max(0.0, (total - step) / max(1, total - warmup))


@SCHEDULERS.register("cosine")
def cosine_schedule(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then half a cosine from 1 to 0 at ``total``."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by (learning rate, weight decay), with names for logs."""
    patterns = [(re.compile(g.pattern), g) for g in cfg.param_groups]
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = next((g for rx, g in patterns if rx.search(name)), None)
        lr = cfg.lr * (group.lr_mult if group else 1.0)
        decay = group.weight_decay if group and group.weight_decay is not None else cfg.weight_decay
        if any(nd in name for nd in cfg.no_decay):
            decay = 0.0
        entry = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": decay})
        entry["params"].append(p)
        entry["names"].append(name)
    if not groups:
        raise MmkitError("no trainable parameters (every parameter has requires_grad=False)",
                         field="trainable")
    return list(groups.values())


# --------------------------------------------------------------------------- data


@dataclass
class Stream:
    """One named source of examples in each batch (design.md, "several sampler streams").

    The stream that ``defines_epoch`` is read once per epoch in a seeded order; the others are
    endless and draw a fresh seeded order each time they run out. Each gives ``per_step``
    examples to every batch, whose ``stream`` column says which came from where.
    """

    name: str
    dataset: Dataset
    per_step: int
    defines_epoch: bool = False


class StreamBatchSampler(Sampler):
    """Batches of ``(stream, index)`` pairs; the order is a pure function of (seed, epoch, batch).

    Endless streams take positions ``[g * n, (g + 1) * n)`` of an infinite sequence of seeded
    permutations, ``g`` counting batches since the start of training, so their positions are
    part of the saved (epoch, batch) state and resume exactly.
    """

    def __init__(self, streams: Sequence[Stream], seed: int, drop_last: bool) -> None:
        epoch_streams = [s for s in streams if s.defines_epoch]
        if len(epoch_streams) != 1:
            raise MmkitError("exactly one stream must define the epoch", field="streams")
        for s in streams:
            if len(s.dataset) == 0:
                raise MmkitError("stream has no examples", field=f"stream {s.name}")
        self.streams, self.seed, self.drop_last = list(streams), seed, drop_last
        self.main = streams.index(epoch_streams[0])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = len(self.streams[self.main].dataset), self.streams[self.main].per_step
        return n // b if self.drop_last else math.ceil(n / b)

    def _endless(self, s: int, start: int, count: int) -> np.ndarray:
        stream = self.streams[s]
        size = len(stream.dataset)
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for cycle in np.unique(pos // size):
            sel = pos // size == cycle
            perm = stable_rng(self.seed, "stream", stream.name, int(cycle)).permutation(size)
            out[sel] = perm[pos[sel] % size]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        main = self.streams[self.main]
        order = stable_rng(self.seed, "epoch", self.epoch).permutation(len(main.dataset))
        n_batches = len(self)
        for t in range(n_batches):
            g = self.epoch * n_batches + t
            batch = [(self.main, int(i)) for i in order[t * main.per_step:(t + 1) * main.per_step]]
            for s, stream in enumerate(self.streams):
                if s != self.main:
                    idx = self._endless(s, g * stream.per_step, stream.per_step)
                    batch += [(s, int(i)) for i in idx]
            yield batch


class _OneStream(Sampler):
    """Adapts a caller's batch sampler (lists of indices) to the loop's ``(stream, index)`` pairs.

    The sampler must be a pure function of its epoch (``set_epoch``) so a resumed run skips
    into the same batches; grouped samplers (CommonIT) are.
    """

    def __init__(self, batch_sampler: Any) -> None:
        self.inner = batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.inner:
            yield [(0, int(i)) for i in batch]


class _StreamsDataset(Dataset):
    def __init__(self, streams: Sequence[Stream]) -> None:
        self.streams = streams

    def __len__(self) -> int:
        return sum(len(s.dataset) for s in self.streams)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Any]:
        s, i = key
        return s, i, self.streams[s].dataset[i]


class _IndexCollate:
    """``collate_fn(examples)`` plus ``index`` (and ``stream``); a class so workers can pickle it."""

    def __init__(self, collate_fn: Callable, names: list[str] | None) -> None:
        self.collate_fn, self.names = collate_fn, names

    def __call__(self, items: list[tuple[int, int, Any]]) -> dict:
        streams, indices, examples = zip(*items)
        batch = dict(self.collate_fn(list(examples)))
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        if self.names is not None:
            batch["stream"] = [self.names[s] for s in streams]
        return batch


# --------------------------------------------------------------------------- callbacks


@dataclass
class TrainState:
    """What callbacks see: position, the accelerator and the (wrapped) model."""

    epoch: int
    step: int  # optimizer steps done
    batch_in_epoch: int  # micro-batches done in this epoch
    total_steps: int
    out: Path
    accelerator: Any
    model: torch.nn.Module
    config: TrainConfig


class Callback:
    """Hooks into :func:`train`; override what you need."""

    def on_train_begin(self, state: TrainState) -> None: ...

    def on_batch_end(self, state: TrainState, batch: dict, outputs: Mapping[str, Any]) -> None:
        """After every micro-batch's forward/backward; ``batch["index"]`` holds example indices."""

    def on_step_end(self, state: TrainState, logs: dict[str, float]) -> None:
        """After every optimizer step; ``logs`` are the step's mean losses and learning rate."""

    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def on_save(self, state: TrainState, checkpoint: Path) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


@dataclass
class TrainResult:
    step: int
    epoch: int
    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    model_dir: Path | None
    resumed_from: Path | None


# --------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: Dataset | Sequence[Stream],
    config: TrainConfig,
    out: str | Path,
    *,
    collate_fn: Callable | None = None,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, Any]] | None = None,
    callbacks: Sequence[Callback] = (),
    save_fn: Callable[[torch.nn.Module, Path], None] | None = None,
    preprocessor: Any = None,
    batch_sampler: Any = None,
    final_dir: str | None = "model",
    clip_parameters: Callable[[torch.nn.Module], Any] | None = None,
) -> TrainResult:
    """Train ``model`` by minimising ``loss_fn(model, batch)["loss"]`` over ``data``.

    ``data`` is a map-style dataset or a list of :class:`Stream`; ``batch_sampler`` (with
    ``set_epoch``, a pure function of the epoch) replaces the loop's seeded shuffling for a
    single dataset, e.g. CommonIT's group-pure batches in accelerate's global order. Batches are
    ``collate_fn(examples)`` dicts plus ``index`` (and ``stream``). ``eval_fn(model)`` runs under
    ``torch.inference_mode`` every ``eval_every`` steps or at each epoch end. ``save_fn(model,
    dir)`` writes weights (default: ``save_pretrained`` safetensors, else a safetensors state
    dict, plus ``preprocessor.save_pretrained``) into checkpoints and ``out/<final_dir>``, so
    ``from_pretrained`` loads either. Rerunning with the same ``out`` resumes from
    the latest checkpoint. ``clip_parameters(unwrapped model)`` picks the parameters whose
    gradient norm is clipped (default: all of them).
    """
    from accelerate.utils import set_seed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    accelerator = _accelerator(config, out)
    is_streams = isinstance(data, (list, tuple)) and data and all(isinstance(s, Stream) for s in data)
    streams = list(data) if is_streams else [Stream("data", data, config.batch_size, True)]
    if batch_sampler is not None and len(streams) > 1:
        raise MmkitError("a batch_sampler takes one dataset, not several streams", field="batch_sampler")
    sampler = _OneStream(batch_sampler) if batch_sampler is not None else StreamBatchSampler(
        streams, config.seed, config.drop_last)
    loader = DataLoader(
        _StreamsDataset(streams), batch_sampler=sampler, num_workers=config.num_workers,
        collate_fn=_IndexCollate(collate_fn or torch.utils.data.default_collate,
                                 [s.name for s in streams] if len(streams) > 1 else None),
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = OPTIMIZERS.resolve(config.optimizer)(param_groups(model, config), config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = min(config.max_steps or math.inf, steps_per_epoch * config.epochs)
    warmup = int(config.warmup_ratio * total)
    schedule = SCHEDULERS.resolve(config.scheduler)
    # accelerate steps a prepared scheduler once per process: count in process-steps.
    n_proc = accelerator.num_processes
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: schedule(s // n_proc, warmup, total)))

    state = TrainState(0, 0, 0, total, out, accelerator, model, config)
    resumed_from = _resume(accelerator, state, out) if config.checkpoints else None
    history_path = out / "train_log.jsonl"
    history = _truncate_log(history_path, state.step) if accelerator.is_main_process else []
    evaluations = _truncate_log(out / "eval_log.jsonl", state.step) if accelerator.is_main_process else []
    save = save_fn or (lambda m, d: _save_weights(m, d, preprocessor))
    for cb in callbacks:
        cb.on_train_begin(state)

    model.train()
    sums: dict[str, torch.Tensor] = {}
    micro = 0
    bar = Progress(total, "train")
    bar.update(state.step)
    while state.step < total and state.epoch < config.epochs:
        # accelerate's loaders pass their own epoch counter to the sampler when iterated.
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        batches.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = loss_fn(model, batch)
                accelerator.backward(outputs["loss"])
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    clipped = (clip_parameters(accelerator.unwrap_model(model)) if clip_parameters
                               else model.parameters())
                    accelerator.clip_grad_norm_(clipped, config.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (group 0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            micro += 1
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.ndim == 0:
                    sums[key] = sums.get(key, 0) + value.detach().float()
            for cb in callbacks:
                cb.on_batch_end(state, batch, outputs)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            logs = {k: accelerator.reduce(v / micro, "mean").item() for k, v in sums.items()}
            logs.update(step=state.step, epoch=state.epoch, lr=lr)
            sums, micro = {}, 0
            bar.update(1, loss=logs.get("loss", float("nan")), lr=logs["lr"])
            if state.step % config.log_every == 0 or state.step == total:
                history.append(logs)
                if accelerator.is_main_process:
                    _append_jsonl(history_path, logs)
            for cb in callbacks:
                cb.on_step_end(state, logs)
            end_of_epoch = state.batch_in_epoch == len(loader)
            if eval_fn and (config.eval_every and state.step % config.eval_every == 0
                            or not config.eval_every and end_of_epoch or state.step == total):
                evaluations.append(_evaluate(eval_fn, state, callbacks))
            if config.checkpoints and ((config.save_every and state.step % config.save_every == 0)
                                       or end_of_epoch or state.step == total):
                _checkpoint(state, save, callbacks)
            if state.step >= total:
                break
        if state.batch_in_epoch == len(loader):
            for cb in callbacks:
                cb.on_epoch_end(state)
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()

    accelerator.wait_for_everyone()
    model_dir = None
    if final_dir is not None:
        model_dir = out / final_dir
        if accelerator.is_main_process:
            with atomic_dir(model_dir, overwrite=True) as tmp:
                save(accelerator.unwrap_model(model), tmp)
    for cb in callbacks:
        cb.on_train_end(state)
    accelerator.end_training()
    return TrainResult(state.step, state.epoch, history, evaluations, model_dir, resumed_from)


def _accelerator(config: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and not PartialState().use_distributed:
        # One process may train several times (a comparison, a test): start from a fresh state.
        # (Never create the state here: Accelerator must see ACCELERATE_USE_CPU and friends.)
        AcceleratorState._reset_state()
    try:
        return Accelerator(gradient_accumulation_steps=config.grad_accum,
                           mixed_precision=config.mixed_precision, project_dir=str(out))
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0], field="mixed_precision") from None


def _evaluate(eval_fn: Callable, state: TrainState, callbacks: Sequence[Callback]) -> dict[str, Any]:
    model = state.model
    model.eval()
    with torch.inference_mode():
        metrics = dict(eval_fn(model))
    model.train()
    metrics.update(step=state.step, epoch=state.epoch)
    if state.accelerator.is_main_process:
        _append_jsonl(state.out / "eval_log.jsonl", metrics)
    for cb in callbacks:
        cb.on_evaluate(state, metrics)
    return metrics


# --------------------------------------------------------------------------- checkpoints


def _save_weights(model: torch.nn.Module, directory: Path, preprocessor: Any = None) -> None:
    """``save_pretrained`` (safetensors) for HF models, else a safetensors state dict."""
    if hasattr(model, "save_pretrained"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(directory, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    if preprocessor is not None:
        preprocessor.save_pretrained(directory)


def _checkpoint(state: TrainState, save: Callable, callbacks: Sequence[Callback]) -> None:
    """Write ``checkpoints/step-N`` (weights, accelerate state, position) under a temp name."""
    acc = state.accelerator
    final = state.out / CHECKPOINTS / f"step-{state.step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "state"))
    acc.wait_for_everyone()  # every rank's RNG file is in tmp before rank 0 renames it
    if acc.is_main_process:
        save(acc.unwrap_model(state.model), tmp / "model")
        write_json(tmp / "trainer_state.json", {"step": state.step, "epoch": state.epoch,
                                                "batch_in_epoch": state.batch_in_epoch})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted((state.out / CHECKPOINTS).glob("step-*"))[:-state.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    for cb in callbacks:
        cb.on_save(state, final)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` in a run folder, if any."""
    done = [p for p in (Path(out) / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _resume(accelerator: Any, state: TrainState, out: Path) -> Path | None:
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    accelerator.load_state(str(ckpt / "state"))
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    state.step, state.epoch, state.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
    log.info("resumed from %s (step %d, epoch %d)", ckpt, state.step, state.epoch)
    return ckpt


def _truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Log lines up to ``step``; lines a killed run wrote after its last checkpoint are dropped."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a kill
        if rec["step"] <= step:
            kept.append(rec)
    write_jsonl(path, kept)
    return kept


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
