"""Training-framework integrations for the dynamics recorder (prune.md section 4.2)."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mmkit.prune.dynamics import DynamicsRecorder

log = logging.getLogger("mmkit")


class DynamicsCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that records one eval-pass per epoch.

    ``on_epoch_begin`` opens epoch ``floor(state.epoch)``, ``on_epoch_end`` runs
    ``recorder.record_pass`` over ``eval_dataset`` (the un-augmented view, yielding
    ``(index, x, y)`` or dicts with ``"index"``) with the trainer's model and ends the epoch,
    and ``on_train_end`` closes the recorder. An epoch the recorder already holds (a trainer
    resumed from a checkpoint older than the dynamics) is skipped, not re-recorded. Under
    several processes each rank records the whole ``eval_dataset`` (the sharded files then
    merge to the same result).
    """

    def __init__(self, recorder: DynamicsRecorder, eval_dataset: Dataset, batch_size: int,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 forward: Callable[[Any, Any], tuple[Any, Any, Any]] | None = None) -> None:
        self.recorder = recorder
        self.loader = DataLoader(eval_dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        self.forward = forward
        self._recording = False

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        # state.epoch is fractional (steps / steps_per_epoch); at an epoch start it is ~the epoch number
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        self._recording = epoch not in self.recorder.recorded_epochs
        if self._recording:
            self.recorder.begin_epoch(epoch)
        else:
            log.info("dynamics of epoch %d already recorded; skipping it", epoch)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._recording:
            self.recorder.record_pass(kwargs["model"], self.loader, self.forward)
            self.recorder.end_epoch()
            self._recording = False

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.recorder.close()
