"""Training pieces the distillation methods share (``bert-kd``, ``pesf``, ``dcd``).

An index dataset, statistics kept across checkpoints, the student's ``save_fn`` and parameter
counts. Task data lives in :mod:`mmkit.distill.textcls`, the teacher cache in
:mod:`mmkit.distill.teacher_cache`. Importing this module does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


class Indices:
    """A dataset of example indices ``0..n-1`` (the collate fetches the rows)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Checkpointed:
    """A dataclass of run statistics written into every checkpoint and read back on resume."""

    @classmethod
    def resume(cls, out: Path, name: str) -> Any:
        """The copy saved as ``name`` in the latest checkpoint under ``out``; ``None`` without one."""
        from mmkit.core.train import latest_checkpoint

        ckpt = latest_checkpoint(out)
        if ckpt is None or not (ckpt / name).is_file():
            return None
        return cls(**json.loads((ckpt / name).read_text()))

    def save(self, state: Any, path: Path) -> None:
        """``on_save``: write the statistics (main process only)."""
        from mmkit.io import write_json

        if state.accelerator.is_main_process:
            write_json(path, asdict(self))


@dataclass
class StepStats(Checkpointed):
    """Loss-term sums over the current epoch and the last finished epoch's means."""

    sums: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    final: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {k: v / self.batches for k, v in self.sums.items()} if self.batches else dict(self.final)

    def add(self, terms: Mapping[str, Any]) -> None:
        """Count one batch of loss terms (tensors)."""
        self.batches += 1
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())

    def end_epoch(self) -> dict[str, float]:
        """Keep the finished epoch's means as ``final``, start new sums; returns the means."""
        self.final, self.sums, self.batches = self.means(), {}, 0
        return self.final


def saver(preprocessor: Any, record: dict[str, Any], part: str = "model") -> Callable[[Any, Path], None]:
    """``save_fn`` for the loop: the trained model (``getattr(module, part)``) alone, as
    ``save_pretrained`` safetensors with ``record`` under ``config.distill``, plus its tokenizer or
    processor (when there is one), so ``from_pretrained(dir)`` loads it without mmkit."""
    def save(module: Any, directory: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = getattr(module, part)
        model.config.distill = record
        model.save_pretrained(directory, safe_serialization=True)
        if preprocessor is not None:
            preprocessor.save_pretrained(directory)

    return save


def param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def param_counts(teacher: Any, student: Any) -> dict[str, float]:
    """``{"teacher", "student", "ratio"}``: parameter counts and student / teacher."""
    t, s = param_count(teacher), param_count(student)
    return {"teacher": t, "student": s, "ratio": s / t}
