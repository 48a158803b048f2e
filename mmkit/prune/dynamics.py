"""Training dynamics: the recorder, the on-disk format and the importers (prune.md section 4).

Format (schema version 1): ``meta.json``, ``labels.npy``, optional ``classes.json`` and one
``epoch_{k:05d}.safetensors`` per epoch (``epoch_{k:05d}.rank{r:03d}.safetensors`` per rank when
sharded). ``open_dynamics`` reads it, or an imported npy/npz/safetensors/csv/baai-txt source,
as a :class:`DynamicsSource`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from mmkit import __version__
from mmkit.errors import MmkitError, suggest
from mmkit.io import atomic_write, write_json
from mmkit.registry import Registry

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mmkit")


class DynamicsSource(Protocol):
    """What the scorers read: per-channel ``[K, n]`` float32 slices, NaN where unseen."""

    num_samples: int
    epochs: list[int]
    channels: tuple[str, ...]
    labels: np.ndarray | None

    def read(self, channel: str, start: int, stop: int) -> np.ndarray:
        """``float32 [K, stop - start]`` of ``channel`` for samples ``start..stop-1`` (NaN = unseen)."""


class ArrayDynamics:
    """Dynamics held in memory: ``{channel: [K, N] array}`` (tests, importers, the Python API)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                 epochs: Sequence[int] | None = None) -> None:
        shapes = {name: np.shape(a) for name, a in arrays.items()}
        if not shapes or len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
            raise ValueError(f"channels must all be [K, N] arrays of one shape, got {shapes}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        k, n = next(iter(shapes.values()))
        self.num_samples = int(n)
        self.epochs = list(epochs) if epochs is not None else list(range(k))
        self.channels = tuple(self.arrays)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def read(self, channel: str, start: int, stop: int) -> np.ndarray:
        return self.arrays[channel][:, start:stop].astype(np.float32)


# =========================================================================== channels

FLOAT_DTYPES = ("float16", "float32")
RECORD_MODES = ("eval-pass", "inline", "train-forward")
DEFAULT_CHANNELS = ("p_true", "correct", "margin", "el2n", "entropy")
FORMAT_NAME = "mmkit-dynamics"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Channel:
    """A per-sample channel: ``fn(logits, probs, targets) -> [b]``, all float32 on the logits' device.

    ``integer`` channels are stored as uint8; the others in the recorder's dtype.
    """

    fn: Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
    integer: bool = False

    def storage_dtype(self, dtype: str) -> str:
        """The dtype this channel is stored in for a recorder of float ``dtype``."""
        return "uint8" if self.integer else dtype


#: channel name -> :class:`Channel`; every channel is computed on device from logits and targets.
CHANNELS: Registry = Registry("dynamics channel")


def p_true(logits: "torch.Tensor", probs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``P[k,i] = p_k(x_i)[y_i]``, the softmax probability of the target (prune.md section 2)."""
    return probs.gather(1, targets[:, None]).squeeze(1)


def correct(logits: "torch.Tensor", probs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``acc[k,i] = 1[argmax z_k(x_i) = y_i]`` as uint8 (prune.md section 2)."""
    return (logits.argmax(1) == targets).byte()


def margin(logits: "torch.Tensor", probs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``M = z[y] - max_{c != y} z[c]``, the target excluded from the max (section 3.5, AUM)."""
    z_true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
    return z_true - others


def el2n(logits: "torch.Tensor", probs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``||p - onehot(y)||_2 = sqrt(1 - 2 p_y + sum_c p_c^2)`` (section 3.3)."""
    return (1 - 2 * p_true(logits, probs, targets) + probs.square().sum(1)).clamp_min(0).sqrt()


def entropy(logits: "torch.Tensor", probs: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``H = -sum_c p_c ln(max(p_c, 1e-10))`` (section 3.6)."""
    return -(probs * probs.clamp_min(1e-10).log()).sum(1)


CHANNELS.register("p_true", Channel(p_true))
CHANNELS.register("correct", Channel(correct, integer=True))
CHANNELS.register("margin", Channel(margin))
CHANNELS.register("el2n", Channel(el2n))
CHANNELS.register("entropy", Channel(entropy))


def dataset_fingerprint(labels: np.ndarray, ids: Sequence[str]) -> str:
    """``"sha256:" + sha256(N as 8 bytes little-endian + int64 labels + "\\n".join(ids))`` (section 4.3)."""
    labels = np.ascontiguousarray(labels, dtype="<i8").reshape(-1)
    if len(ids) != len(labels):
        raise MmkitError(f"{len(ids)} ids for {len(labels)} labels", field="ids")
    digest = hashlib.sha256(len(labels).to_bytes(8, "little"))
    digest.update(labels.tobytes())
    digest.update("\n".join(ids).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


# =========================================================================== files

_EPOCH_FILE = re.compile(r"epoch_(\d{5})(?:\.rank(\d{3}))?\.safetensors")


def epoch_file(out_dir: str | os.PathLike, epoch: int, rank: int | None = None) -> Path:
    """``epoch_{k:05d}.safetensors`` (dense) or ``epoch_{k:05d}.rank{r:03d}.safetensors`` (sharded)."""
    suffix = "" if rank is None else f".rank{rank:03d}"
    return Path(out_dir) / f"epoch_{epoch:05d}{suffix}.safetensors"


def _complete_files(out_dir: Path, world_size: int) -> dict[int, list[tuple[Path, dict[str, str]]]]:
    """Complete epoch files by epoch: the dense file, or one shard per rank (epochs missing a rank left out)."""
    from safetensors import safe_open

    found: dict[int, dict[int | None, tuple[Path, dict[str, str]]]] = {}
    for name in sorted(os.listdir(out_dir)) if out_dir.is_dir() else []:
        match = _EPOCH_FILE.fullmatch(name)
        if match is None or (match.group(2) is None) != (world_size == 1):
            continue
        with safe_open(str(out_dir / name), framework="numpy") as fh:
            metadata = fh.metadata() or {}
        if metadata.get("complete") == "1":
            rank = None if match.group(2) is None else int(match.group(2))
            found.setdefault(int(match.group(1)), {})[rank] = (out_dir / name, metadata)
    wanted = [None] if world_size == 1 else list(range(world_size))
    return {epoch: [files[r] for r in wanted] for epoch, files in sorted(found.items())
            if all(r in files for r in wanted)}


def _read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MmkitError(f"not valid JSON ({exc})", file=str(path)) from exc
    if meta.get("format") != FORMAT_NAME or meta.get("version") != SCHEMA_VERSION:
        raise MmkitError(f"expected format {FORMAT_NAME!r} version {SCHEMA_VERSION}, got "
                         f"{meta.get('format')!r} version {meta.get('version')!r}", file=str(path), field="version")
    return meta


def completed_epochs(out_dir: str | os.PathLike) -> list[int]:
    """Epochs with a complete file (every rank's shard when sharded); resume after the last one."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file():
        return []
    return list(_complete_files(out_dir, int(_read_meta(out_dir).get("world_size", 1))))


def _nonfinite_counts(out_dir: Path, world_size: int) -> dict[str, Any]:
    per_epoch = {str(epoch): sum(int(meta.get("nonfinite", 0)) for _, meta in files)
                 for epoch, files in _complete_files(out_dir, world_size).items()}
    return {"total": sum(per_epoch.values()), "per_epoch": per_epoch}


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as fh:
        np.save(fh, array)


# =========================================================================== recorder


class _EpochBuffer:
    """One epoch's per-channel ``[N + 1]`` buffers (slot N takes invalid rows) and device-side counters.

    Buffers live on the logits' device, or in pinned host memory fed by non-blocking copies
    when they would exceed ``device_buffer_limit`` on a CUDA device.
    """

    COUNTERS = ("mismatch", "bad_index", "bad_target", "nonfinite")

    def __init__(self, rec: "DynamicsRecorder", device: "torch.device") -> None:
        import torch

        self.device = device
        host = device.type == "cuda" and rec.num_samples * rec.bytes_per_sample > rec.device_buffer_limit
        self.store = torch.device("cpu") if host else device
        size = rec.num_samples + 1
        self.values = {name: torch.full((size,), 0 if CHANNELS[name].integer else float("nan"),
                                        dtype=getattr(torch, dtype), device=self.store, pin_memory=host)
                       for name, dtype in rec.channel_dtypes.items()}
        self.seen = torch.zeros(size, dtype=torch.uint8, device=self.store, pin_memory=host)
        self.counts = torch.zeros(len(self.COUNTERS), dtype=torch.int64, device=device)
        self.pending: list[tuple[Any, "torch.Tensor", dict[str, "torch.Tensor"], "torch.Tensor"]] = []

    def write(self, idx: "torch.Tensor", values: dict[str, "torch.Tensor"], seen: "torch.Tensor") -> None:
        """Scatter one batch (duplicates already carry identical values, so the order is irrelevant)."""
        import torch

        if self.store == self.device:
            self._scatter(idx, values, seen)
            return
        staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                  for t in (idx, seen, *values.values())]
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, staged[0], dict(zip(values, staged[2:])), staged[1]))
        self.drain(block=False)

    def drain(self, block: bool) -> None:
        """Scatter the staged batches whose copies have landed (all of them when ``block``)."""
        while self.pending and (block or self.pending[0][0].query()):
            event, idx, values, seen = self.pending.pop(0)
            event.synchronize()
            self._scatter(idx, values, seen)

    def _scatter(self, idx: "torch.Tensor", values: dict[str, "torch.Tensor"], seen: "torch.Tensor") -> None:
        for name, vals in values.items():
            self.values[name][idx] = vals
        self.seen[idx] = seen


def _last_occurrence(idx: "torch.Tensor") -> "torch.Tensor":
    """For each position, the position of the last occurrence of its index in the batch (on device)."""
    import torch

    n = idx.numel()
    sorted_idx, order = torch.sort(idx, stable=True)
    positions = torch.arange(n, device=idx.device)
    run_end = torch.ones(n, dtype=torch.bool, device=idx.device)
    run_end[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    last_in_run = torch.where(run_end, positions, n).flip(0).cummin(0).values.flip(0)
    source = torch.empty_like(order)
    source[order] = order[last_in_run]
    return source


def default_forward(model: "torch.nn.Module", batch: Any) -> tuple[Any, "torch.Tensor", Any]:
    """``(indices, logits, targets)`` from an ``(index, x, y)`` batch or a dict with ``"index"``.

    A dict's other keys except ``"labels"`` (the targets) go to the model as keyword arguments;
    the logits are ``output.logits`` when the output has them, else the output itself.
    """
    import torch

    device = next(iter(model.parameters()), torch.empty(0)).device
    move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(batch, Mapping):
        if "index" not in batch:
            raise MmkitError("eval batches need an 'index' entry (wrap the dataset in IndexedDataset)",
                             field="index")
        out = model(**{k: move(v) for k, v in batch.items() if k not in ("index", "labels")})
        indices, targets = batch["index"], batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 3:
        indices, x, targets = batch
        out = model(move(x))
    else:
        raise MmkitError("eval batches must be (index, x, y) tuples or dicts with 'index'; "
                         "pass forward=... for other layouts", field="batch")
    return indices, getattr(out, "logits", out), targets


class DynamicsRecorder:
    """Records per-sample training dynamics, one safetensors file per epoch (prune.md section 4).

    ``update`` never synchronises with the host: channels are computed on the logits' device
    and scattered into an epoch buffer; ``end_epoch`` checks the device-side counters once and
    hands the epoch to a background writer (at most one write pending). Opening a directory
    that already holds complete epochs resumes it: the settings must match, and
    ``begin_epoch`` of an epoch that is already complete is an error (``next_epoch`` says
    where to continue); restarting from scratch means a fresh directory.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        num_samples: int,
        num_classes: int,
        labels: np.ndarray | Sequence[int] | None = None,
        channels: Sequence[str] = DEFAULT_CHANNELS,
        dtype: str = "float16",
        record_mode: str = "eval-pass",
        rank: int = 0,
        world_size: int = 1,
        meta: Mapping[str, Any] | None = None,
        device_buffer_limit: int = 256 << 20,
        classes: Sequence[str] | None = None,
        mixup: bool = False,
    ) -> None:
        if dtype not in FLOAT_DTYPES:
            raise MmkitError(f"expected one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}", field="--dtype")
        if record_mode not in RECORD_MODES:
            raise MmkitError(f"unknown record mode {record_mode!r}{suggest(record_mode, RECORD_MODES)}; "
                             f"known: {', '.join(RECORD_MODES)}", field="--record-mode")
        if mixup and record_mode == "train-forward":
            raise MmkitError("train-forward reuses the training logits, which mixup/cutmix mixes; "
                             "use eval-pass or inline", field="--record-mode")
        if num_samples < 1 or num_classes < 2:
            raise MmkitError(f"need num_samples >= 1 and num_classes >= 2, got {num_samples} and {num_classes}",
                             field="num_classes")
        if not 0 <= rank < world_size:
            raise MmkitError(f"rank {rank} outside [0, {world_size})", field="rank")
        channels = tuple(channels)
        if not channels or len(set(channels)) != len(channels):
            raise MmkitError(f"expected distinct channel names, got {','.join(channels)!r}", field="--channels")
        for name in channels:
            CHANNELS.resolve(name, field="--channels")
        self.out_dir = Path(out_dir)
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.channels, self.dtype, self.record_mode = channels, dtype, record_mode
        self.rank, self.world_size = int(rank), int(world_size)
        self.device_buffer_limit = int(device_buffer_limit)
        self.channel_dtypes = {name: CHANNELS[name].storage_dtype(dtype) for name in channels}
        self.bytes_per_sample = 1 + sum(np.dtype(d).itemsize for d in self.channel_dtypes.values())
        self.labels = None if labels is None else _as_labels(labels, "labels", self.num_classes)
        if self.labels is not None and len(self.labels) != self.num_samples:
            raise MmkitError(f"{len(self.labels)} labels for num_samples={self.num_samples}", field="labels")
        self.meta = self._build_meta(meta or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / "meta.json").is_file():
            self._check_resume()
        if self.rank == 0:
            if self.labels is not None:
                _write_npy(self.out_dir / "labels.npy", self.labels)
            if classes is not None:
                write_json(self.out_dir / "classes.json", list(classes))
            self._write_meta()
        self._done = set(_complete_files(self.out_dir, self.world_size))
        self._labels_dev: dict[Any, Any] = {}
        self._epoch: int | None = None
        self._buffer: _EpochBuffer | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def _build_meta(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        meta = {"format": FORMAT_NAME, "version": SCHEMA_VERSION, "num_samples": self.num_samples,
                "num_classes": self.num_classes, "channels": dict(self.channel_dtypes),
                "record_mode": self.record_mode, "epochs_planned": extra.get("epochs_planned"),
                "index_space": "dense" if self.world_size == 1 else "sharded", "world_size": self.world_size,
                "dataset": extra.get("dataset"), "model": extra.get("model"), "seed": extra.get("seed"),
                "mmkit_version": __version__}
        reserved = set(meta) - {"epochs_planned", "dataset", "model", "seed"} | {"nonfinite"}
        for key, value in extra.items():
            if key in reserved:
                raise MmkitError(f"meta key {key!r} is set by the recorder", field="meta")
            meta.setdefault(key, value)
        return meta

    def _check_resume(self) -> None:
        """A directory with recorded epochs resumes only with the same settings and labels."""
        old = _read_meta(self.out_dir)
        path = str(self.out_dir / "meta.json")
        for key in ("num_samples", "num_classes", "channels", "record_mode", "index_space", "world_size"):
            if old.get(key) != self.meta[key]:
                raise MmkitError(f"recorded with {old.get(key)!r}, this run has {self.meta[key]!r}; "
                                 f"use a fresh directory (--overwrite) to restart", file=path, field=key)
        old_fp = (old.get("dataset") or {}).get("fingerprint")
        new_fp = (self.meta.get("dataset") or {}).get("fingerprint")
        if old_fp and new_fp and old_fp != new_fp:
            raise MmkitError(f"recorded on dataset {old_fp}, this run uses {new_fp}", file=path,
                             field="dataset.fingerprint")
        labels_path = self.out_dir / "labels.npy"
        if labels_path.is_file():
            recorded = np.load(labels_path, allow_pickle=False)
            if self.labels is None:
                self.labels = _as_labels(recorded, str(labels_path), self.num_classes)
            elif not np.array_equal(recorded, self.labels):
                raise MmkitError("differs from the labels of this run", file=str(labels_path), field="labels")

    def _write_meta(self) -> None:
        self.meta["nonfinite"] = _nonfinite_counts(self.out_dir, self.world_size)
        write_json(self.out_dir / "meta.json", self.meta)

    @property
    def recorded_epochs(self) -> list[int]:
        """Epochs complete on disk or queued for writing."""
        return sorted(self._done)

    @property
    def next_epoch(self) -> int:
        """The first epoch after the last complete one (0 in a fresh directory)."""
        return max(self._done) + 1 if self._done else 0

    # ------------------------------------------------------------------ recording

    def begin_epoch(self, epoch: int) -> None:
        """Start recording ``epoch``; an epoch already complete in this directory is an error."""
        self._require_open()
        if self._epoch is not None:
            raise MmkitError(f"epoch {self._epoch} is still open; call end_epoch() first", field="epoch")
        if epoch < 0:
            raise MmkitError(f"expected an epoch >= 0, got {epoch}", field="epoch")
        if epoch in self._done:
            raise MmkitError(f"epoch {epoch} is already recorded; continue with epoch {self.next_epoch} "
                             f"or use a fresh directory", file=str(self.out_dir), field="epoch")
        self._epoch, self._buffer = int(epoch), None

    def update(self, indices: Any, logits: "torch.Tensor", targets: Any = None) -> None:
        """Record one batch: ``indices`` (global, [b]), ``logits`` [b, C] and ``targets`` [b] (or the labels).

        No host synchronisation: invalid rows are counted on device and reported by ``end_epoch``.
        """
        import torch

        if self._epoch is None:
            raise MmkitError("update() outside begin_epoch() / end_epoch()", field="epoch")
        z = logits.detach()
        if z.ndim != 2 or z.shape[1] != self.num_classes:
            raise MmkitError(f"expected logits [batch, {self.num_classes}], got {list(z.shape)}", field="logits")
        device, n = z.device, self.num_samples
        if self._buffer is None:
            self._buffer = _EpochBuffer(self, device)
        buf = self._buffer
        idx = torch.as_tensor(indices).to(device, non_blocking=True).reshape(-1).long()
        if idx.numel() != z.shape[0]:
            raise MmkitError(f"{idx.numel()} indices for {z.shape[0]} logit rows", field="indices")
        bad_index = (idx < 0) | (idx >= n)
        idx = torch.where(bad_index, n, idx)
        labels = self._labels_on(device)
        if targets is None:
            if labels is None:
                raise MmkitError("update() needs targets when the recorder has no labels", field="targets")
            y, mismatch = labels[idx], torch.zeros_like(bad_index)
        else:
            y = torch.as_tensor(targets).to(device, non_blocking=True).reshape(-1).long()
            mismatch = (y != labels[idx]) & ~bad_index if labels is not None else torch.zeros_like(bad_index)
        bad_target = (y < 0) | (y >= self.num_classes)
        y = torch.where(bad_target, 0, y)
        idx = torch.where(bad_target, n, idx)
        zf = z.float()
        finite = torch.isfinite(zf).all(1)
        valid = ~bad_index & ~bad_target
        buf.counts += torch.stack([mismatch.sum(), bad_index.sum(), (bad_target & ~bad_index).sum(),
                                   (~finite & valid).sum()])
        probs = zf.softmax(1)
        source = _last_occurrence(idx)
        values = {}
        for name, dtype in self.channel_dtypes.items():
            v = CHANNELS[name].fn(zf, probs, y)
            v = v * finite if CHANNELS[name].integer else torch.where(finite, v, float("nan"))
            values[name] = v.to(getattr(torch, dtype))[source]
        buf.write(idx, values, finite.byte()[source])

    def record_pass(self, model: "torch.nn.Module", loader: Iterable[Any],
                    forward: Callable[[Any, Any], tuple[Any, Any, Any]] | None = None) -> None:
        """eval-pass: one pass over ``loader`` in ``model.eval()`` under ``no_grad``, then the mode is restored."""
        import torch

        if self.record_mode != "eval-pass":
            raise MmkitError(f"record_pass() is for eval-pass; this recorder is {self.record_mode} "
                             "(call update() in the training step)", field="--record-mode")
        forward = forward or default_forward
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    self.update(*forward(model, batch))
        finally:
            model.train(was_training)

    def end_epoch(self) -> None:
        """Check the epoch's counters and queue its file for the background writer."""
        import torch

        if self._epoch is None:
            raise MmkitError("end_epoch() without begin_epoch()", field="epoch")
        epoch, buf = self._epoch, self._buffer or _EpochBuffer(self, torch.device("cpu"))
        self._epoch, self._buffer = None, None
        buf.drain(block=True)
        counts = dict(zip(_EpochBuffer.COUNTERS, buf.counts.tolist()))
        n, c = self.num_samples, self.num_classes
        problems = {"bad_index": (f"indices outside [0, {n})", "indices"),
                    "bad_target": (f"targets outside [0, {c})", "targets"),
                    "mismatch": ("targets differ from labels[indices]: the loader's indices are not "
                                 "aligned with its samples", "labels")}
        for key, (what, field_name) in problems.items():
            if counts[key]:
                raise MmkitError(f"epoch {epoch}: {counts[key]} {what}; the epoch was not written", field=field_name)
        values = {name: v[:n].cpu().numpy() for name, v in buf.values.items()}
        seen = buf.seen[:n].cpu().numpy()
        metadata = {"epoch": str(epoch), "complete": "1", "nonfinite": str(counts["nonfinite"])}
        if self.world_size == 1:
            tensors, path = {**values, "seen": seen}, epoch_file(self.out_dir, epoch)
        else:
            keep = np.flatnonzero(seen)
            tensors = {"index": keep.astype(np.int64), **{name: v[keep] for name, v in values.items()}}
            path = epoch_file(self.out_dir, epoch, self.rank)
            metadata["rank"] = str(self.rank)
        self._wait()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmkit-dynamics")
        self._pending = self._writer.submit(self._write, path, tensors, metadata)
        self._done.add(epoch)

    def _write(self, path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        from safetensors.numpy import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        if self.rank == 0:
            self._write_meta()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _labels_on(self, device: Any) -> "torch.Tensor | None":
        """The labels on ``device`` plus a class-0 entry for the invalid-row slot N."""
        import torch

        if self.labels is None:
            return None
        key = str(device)
        if key not in self._labels_dev:
            self._labels_dev[key] = torch.from_numpy(np.append(self.labels, 0)).to(device)
        return self._labels_dev[key]

    def _require_open(self) -> None:
        if self._closed:
            raise MmkitError("the recorder is closed", field="recorder")

    # ------------------------------------------------------------------ closing

    def discard_epoch(self) -> None:
        """Drop the open epoch without writing it."""
        self._epoch, self._buffer = None, None

    def close(self) -> None:
        """Wait for pending writes and finalise meta.json; an epoch still open is discarded."""
        if self._closed:
            return
        self._closed = True
        if self._epoch is not None:
            log.warning("dynamics epoch %d was not ended; discarded", self._epoch)
            self.discard_epoch()
        try:
            self._wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
        if self.rank == 0:
            self._write_meta()

    def __enter__(self) -> "DynamicsRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard_epoch()
        self.close()


# =========================================================================== readers


@dataclass(frozen=True)
class ReadOptions:
    """Options shared by the dynamics readers (``--transpose``, ``--allow-gaps``, ``--labels``, ``--allow-nan``)."""

    transpose: bool = False
    allow_gaps: bool = False
    labels: np.ndarray | None = None
    allow_nan: bool = False


#: format name -> ``reader(path, ReadOptions) -> DynamicsSource``.
FORMATS: Registry = Registry("dynamics format")
_ARRAY_FORMATS = ("npy", "npz", "safetensors")
_SUFFIX_FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors", ".csv": "csv"}


def _as_labels(labels: Any, source: str, num_classes: int | None = None) -> np.ndarray:
    """``labels`` as int64 ``[N]``: integers in ``[0, num_classes)`` (the upper bound when given)."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise MmkitError(f"expected a 1-D integer array, got {arr.dtype} {list(arr.shape)}", file=source,
                         field="labels")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= (num_classes if num_classes is not None else np.inf)))
    if bad.size:
        raise MmkitError(f"index {bad[0]}: label {arr[bad[0]]} outside [0, "
                         f"{num_classes if num_classes is not None else 'inf'})", file=source, field="labels")
    return arr


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Labels from a ``.npy`` (1-D integers) or a text file with one integer per line."""
    path = Path(path)
    if not path.is_file():
        raise MmkitError("no such file", file=str(path), field="--labels")
    if path.suffix == ".npy":
        return _as_labels(np.load(path, allow_pickle=False), str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    labels = np.empty(len(lines), dtype=np.int64)
    for lineno, text in enumerate(lines, 1):
        try:
            labels[lineno - 1] = int(text.strip())
        except ValueError:
            raise MmkitError(f"expected one integer label per line, got {text.strip()!r}", file=str(path),
                             line=lineno, field="label") from None
        if labels[lineno - 1] < 0:
            raise MmkitError(f"expected a label >= 0, got {labels[lineno - 1]}", file=str(path), line=lineno,
                             field="label")
    return labels


def _check_epochs(epochs: Sequence[int], allow_gaps: bool, source: Path) -> None:
    """Epochs must be ``0..K-1`` unless gaps are allowed (then any increasing run)."""
    if not epochs:
        raise MmkitError("no complete epochs", file=str(source), field="epoch")
    if not allow_gaps and list(epochs) != list(range(len(epochs))):
        missing = sorted(set(range(max(epochs) + 1)) - set(epochs))
        raise MmkitError(f"epochs must be contiguous from 0; missing {missing[:10]} "
                         "(pass --allow-gaps to slide windows over the epochs present)",
                         file=str(source), field="epoch")


def _check_labels(labels: np.ndarray | None, n: int, source: Path) -> None:
    if labels is not None and len(labels) != n:
        raise MmkitError(f"{len(labels)} labels for N = {n} samples", file=str(source), field="--labels")


def detect_format(path: Path) -> str:
    """The dynamics format of ``path``: native dir, baai-txt dir, or by file suffix."""
    if path.is_dir():
        if (path / "meta.json").is_file():
            return "native"
        if _baai_files(path):
            return "baai-txt"
        raise MmkitError("not a dynamics directory (expected meta.json or prob_{epoch}.txt files)",
                         file=str(path))
    if path.suffix.lower() in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix.lower()]
    raise MmkitError(f"cannot tell the dynamics format from {path.suffix or 'no suffix'!r}; "
                     f"pass --format ({', '.join(sorted(FORMATS))})", file=str(path), field="--format")


def open_dynamics(path: str | os.PathLike, format: str = "auto", transpose: bool = False,
                  allow_gaps: bool = False, labels: Any = None, allow_nan: bool = False) -> DynamicsSource:
    """Open a dynamics source (native directory or an importer format, prune.md section 4.4).

    ``labels`` (int array) supplies or overrides the labels; ``allow_nan`` lets NaN mean "unseen"
    in the imported formats; ``transpose`` reads ``[N, K]`` arrays (npy/npz/safetensors).
    """
    path = Path(path)
    if not path.exists():
        raise MmkitError("no such file or directory", file=str(path), field="--dynamics")
    name = detect_format(path) if format == "auto" else format
    reader = FORMATS.resolve(name, field="--format")
    if transpose and name not in _ARRAY_FORMATS:
        raise MmkitError(f"--transpose applies to {', '.join(_ARRAY_FORMATS)} arrays, not {name}",
                         file=str(path), field="--transpose")
    opts = ReadOptions(transpose, allow_gaps, None if labels is None else _as_labels(labels, "--labels"),
                       allow_nan)
    return reader(path, opts)


# --------------------------------------------------------------------------- native


class NativeDynamics:
    """A native dynamics directory, read lazily per epoch with safetensors ``get_slice``."""

    def __init__(self, path: Path, opts: ReadOptions) -> None:
        self.path = path
        self.meta = _read_meta(path)
        self.num_samples = int(self.meta["num_samples"])
        self.channels = tuple(self.meta["channels"])
        world_size = int(self.meta.get("world_size", 1))
        files = _complete_files(path, world_size)
        _check_epochs(list(files), opts.allow_gaps, path)
        self.epochs = list(files)
        self._files = [[f for f, _ in files[e]] for e in self.epochs]
        self._sharded = world_size > 1
        self.meta["nonfinite"] = _nonfinite_counts(path, world_size)
        labels = opts.labels
        if labels is None and (path / "labels.npy").is_file():
            labels = _as_labels(np.load(path / "labels.npy", allow_pickle=False), str(path / "labels.npy"))
        _check_labels(labels, self.num_samples, path)
        self.labels = labels

    def read(self, channel: str, start: int, stop: int) -> np.ndarray:
        """``float32 [K, stop - start]``; NaN where the sample was not seen (``correct`` as 0/1)."""
        if channel not in self.channels:
            raise MmkitError(f"channel {channel!r} was not recorded (recorded: {', '.join(self.channels)}); "
                             f"record it with --channels", file=str(self.path), field=channel)
        start, stop = max(0, int(start)), min(self.num_samples, int(stop))
        out = np.full((len(self.epochs), max(0, stop - start)), np.nan, dtype=np.float32)
        if stop <= start:
            return out
        for row, files in zip(out, self._files):
            for file in files:
                (_read_shard if self._sharded else _read_dense)(file, channel, start, stop, row)
        return out


def _read_dense(file: Path, channel: str, start: int, stop: int, row: np.ndarray) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as fh:
        row[:] = fh.get_slice(channel)[start:stop]
        row[fh.get_slice("seen")[start:stop] == 0] = np.nan


class _SortedSlice:
    """A sorted safetensors slice as a lazy sequence, so ``bisect`` reads only O(log n) entries."""

    def __init__(self, sl: Any) -> None:
        self.sl, self.n = sl, int(sl.get_shape()[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return int(self.sl[i:i + 1][0])


def _read_shard(file: Path, channel: str, start: int, stop: int, row: np.ndarray) -> None:
    """Merge one rank's rows with index in ``[start, stop)`` into ``row`` (indices are sorted)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as fh:
        index = _SortedSlice(fh.get_slice("index"))
        lo, hi = bisect.bisect_left(index, start), bisect.bisect_left(index, stop)
        if hi > lo:
            row[index.sl[lo:hi] - start] = fh.get_slice(channel)[lo:hi]


FORMATS.register("native", NativeDynamics)


# --------------------------------------------------------------------------- imported formats


def _imported(path: Path, arrays: Mapping[str, np.ndarray], opts: ReadOptions,
              epochs: Sequence[int] | None = None, zero_is_unseen: bool = False) -> ArrayDynamics:
    """Validate imported ``{channel: [K, N]}`` arrays and wrap them (section 4.4)."""
    if not arrays:
        raise MmkitError(f"no arrays; expected channel keys ({', '.join(CHANNELS)})", file=str(path))
    arrays = {name: (a.T if opts.transpose else a) for name, a in arrays.items()}
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    for name, a in arrays.items():
        if name not in CHANNELS:
            raise MmkitError(f"unknown channel{suggest(name, CHANNELS)}; expected {', '.join(CHANNELS)}",
                             file=str(path), field=name)
        if a.ndim != 2 or 0 in a.shape:
            raise MmkitError(f"expected a non-empty 2-D [K, N] array, got shape {list(a.shape)}",
                             file=str(path), field=name)
        if shapes[name] != next(iter(shapes.values())):
            raise MmkitError(f"channels differ in shape: {shapes}", file=str(path), field=name)
    k, n = next(iter(shapes.values()))
    epochs = list(range(k)) if epochs is None else list(epochs)
    _check_epochs(epochs, opts.allow_gaps, path)
    _check_labels(opts.labels, n, path)
    for name, a in arrays.items():
        _check_values(path, name, a, epochs, opts.allow_nan)
    if zero_is_unseen:
        arrays = {name: np.where(a == 0, np.nan, a) for name, a in arrays.items()}
    return ArrayDynamics(arrays, labels=opts.labels, epochs=epochs)


def _check_values(path: Path, name: str, a: np.ndarray, epochs: Sequence[int], allow_nan: bool,
                  chunk_bytes: int = 1 << 26) -> None:
    """Range checks over column chunks: no inf; NaN only with ``allow_nan``; p_true in [0, 1]; correct 0/1."""
    step = max(1, chunk_bytes // (8 * a.shape[0]))
    for start in range(0, a.shape[1], step):
        block = np.asarray(a[:, start:start + step], dtype=np.float64)
        nan = np.isnan(block)
        checks = [(np.isinf(block), "is infinite")]
        if not allow_nan:
            checks.append((nan, "is NaN; pass --allow-nan to treat NaN as unseen"))
        if name == "p_true":
            checks.append((~nan & ((block < 0) | (block > 1)),
                           "is outside [0, 1]; p_true must be probabilities (were logits passed?)"))
        elif name == "correct":
            checks.append((~nan & (block != 0) & (block != 1), "is not 0 or 1"))
        for bad, what in checks:
            if bad.any():
                k, i = np.argwhere(bad)[0]
                raise MmkitError(f"epoch {epochs[k]}, index {start + i}: value {block[k, i]} {what}",
                                 file=str(path), field=name)


@FORMATS.register("npy")
def read_npy(path: Path, opts: ReadOptions) -> ArrayDynamics:
    """A ``.npy`` of p_true ``float[K, N]`` (memory-mapped)."""
    return _imported(path, {"p_true": np.load(path, mmap_mode="r", allow_pickle=False)}, opts)


@FORMATS.register("npz")
def read_npz(path: Path, opts: ReadOptions) -> ArrayDynamics:
    """A ``.npz`` whose keys are channel names, each ``[K, N]``."""
    with np.load(path, allow_pickle=False) as data:
        return _imported(path, {name: data[name] for name in data.files}, opts)


@FORMATS.register("safetensors")
def read_safetensors(path: Path, opts: ReadOptions) -> ArrayDynamics:
    """A ``.safetensors`` file whose keys are channel names, each ``[K, N]``."""
    from safetensors.numpy import load_file

    return _imported(path, load_file(str(path)), opts)


def _integer_column(path: Path, values: np.ndarray, name: str) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values != np.round(values)))
    if bad.size:
        raise MmkitError(f"expected an integer >= 0, got {values[bad[0]]}", file=str(path), line=int(bad[0]) + 2,
                         field=name)
    return values.astype(np.int64)


def _first_repeat(keys: np.ndarray) -> int | None:
    """Row of the first key that occurs earlier too, else None."""
    _, first = np.unique(keys, return_index=True)
    if len(first) == len(keys):
        return None
    repeated = np.ones(len(keys), dtype=bool)
    repeated[first] = False
    return int(np.flatnonzero(repeated)[0])


@FORMATS.register("csv")
def read_csv(path: Path, opts: ReadOptions) -> ArrayDynamics:
    """Wide ``index,e0,..,e{K-1}`` or long ``index,epoch,p_true[,correct,...]`` CSV (told apart by the header)."""
    with open(path, newline="", encoding="utf-8") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    if not header or header[0] != "index" or len(header) < 2:
        raise MmkitError("expected a header 'index,e0,...' (wide) or 'index,epoch,p_true,...' (long)",
                         file=str(path), line=1, field=header[0] if header else "index")
    try:
        body = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise MmkitError(f"not numeric CSV: {exc}", file=str(path)) from None
    if body.shape[0] == 0:
        raise MmkitError("no data rows", file=str(path))
    if body.shape[1] != len(header):
        raise MmkitError(f"{body.shape[1]} columns for a {len(header)}-column header", file=str(path), line=2)
    index = _integer_column(path, body[:, 0], "index")
    if header[1] == "epoch":
        return _long_csv(path, header, body, index, opts)
    epochs = []
    for name in header[1:]:
        match = re.fullmatch(r"e(\d+)", name)
        if match is None:
            raise MmkitError("expected wide columns e0,...,e{K-1} or 'epoch' as the second column",
                             file=str(path), line=1, field=name)
        epochs.append(int(match.group(1)))
    if sorted(set(epochs)) != epochs:
        raise MmkitError(f"epoch columns must be increasing and distinct, got {header[1:]}", file=str(path), line=1)
    n = len(index)
    row = _first_repeat(index)
    if row is not None or index.max() >= n:
        bad = row if row is not None else int(np.argmax(index >= n))
        raise MmkitError(f"index column must list each of 0..{n - 1} once; got {index[bad]}", file=str(path),
                         line=bad + 2, field="index")
    values = np.empty((len(epochs), n))
    values[:, index] = body[:, 1:].T
    return _imported(path, {"p_true": values}, opts, epochs)


def _long_csv(path: Path, header: list[str], body: np.ndarray, index: np.ndarray,
              opts: ReadOptions) -> ArrayDynamics:
    if len(header) < 3:
        raise MmkitError("expected channel columns after index,epoch", file=str(path), line=1)
    epoch = _integer_column(path, body[:, 1], "epoch")
    epochs, position = np.unique(epoch, return_inverse=True)
    n = len(opts.labels) if opts.labels is not None else int(index.max()) + 1
    if index.max() >= n:
        bad = int(np.argmax(index >= n))
        raise MmkitError(f"index {index[bad]} outside [0, {n}) given by --labels", file=str(path), line=bad + 2,
                         field="index")
    row = _first_repeat(position * n + index)
    if row is not None:
        raise MmkitError(f"index {index[row]} appears twice for epoch {epoch[row]}", file=str(path), line=row + 2,
                         field="index")
    arrays = {}
    for col, name in enumerate(header[2:], start=2):
        values = np.full((len(epochs), n), np.nan)
        values[position, index] = body[:, col]
        arrays[name] = values
    return _imported(path, arrays, opts, epochs.tolist())


def _baai_files(path: Path) -> dict[int, Path]:
    """``prob_{epoch}.txt`` files in ``path`` (or its ``pred_prob_history`` child), by epoch."""
    folder = path / "pred_prob_history" if (path / "pred_prob_history").is_dir() else path
    matches = ((re.fullmatch(r"prob_(\d+)\.txt", f.name), f) for f in folder.iterdir())
    return dict(sorted((int(m.group(1)), f) for m, f in matches if m))


@FORMATS.register("baai-txt")
def read_baai_txt(path: Path, opts: ReadOptions) -> ArrayDynamics:
    """The reference's ``prob_{epoch}.txt`` files (one p_true per line; 0 means unseen -> NaN)."""
    files = _baai_files(path)
    if not files:
        raise MmkitError("no prob_{epoch}.txt files", file=str(path))
    rows = []
    for file in files.values():
        try:
            rows.append(np.loadtxt(file, ndmin=1, dtype=np.float64))
        except ValueError as exc:
            raise MmkitError(f"expected one number per line: {exc}", file=str(file)) from None
        if rows[-1].ndim != 1:
            raise MmkitError("expected one number per line", file=str(file))
        if len(rows[-1]) != len(rows[0]):
            raise MmkitError(f"{len(rows[-1])} values, but {files[min(files)].name} has {len(rows[0])}",
                             file=str(file))
    return _imported(path, {"p_true": np.stack(rows)}, opts, list(files), zero_is_unseen=True)
