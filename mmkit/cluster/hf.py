"""Group-pure batches in the HF ``Trainer`` and in custom accelerate loops (cluster.md section 8).

- ``GroupedTrainer(Trainer)``, or ``GroupedBatchMixin`` for an existing subclass
  (``class MySFT(GroupedBatchMixin, SFTTrainer)``), takes ``groups=`` (int64[N], one per row of
  ``train_dataset``) and optional ``sampler_kwargs=``, and overrides only
  ``get_train_dataloader``.
- ``make_grouped_dataloader(...)`` builds and prepares the loader for a custom loop.
- ``GroupedEpochCallback`` sets the sampler's epoch at each epoch start, because accelerate's
  ``DataLoaderShard.set_epoch`` does not reach a batch sampler wrapped in ``BatchSamplerShard``.

Importing this module does not import transformers: ``GroupedTrainer`` and
``GroupedEpochCallback`` derive from transformers classes and are built on first access
(module ``__getattr__``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

from mmkit.cluster.sampler import GroupedBatchSampler
from mmkit.errors import MmkitError

log = logging.getLogger("mmkit")

_LAZY: dict[str, Any] = {}


def _check_dataset(dataset: Any, groups: Any) -> None:
    """Map-style datasets only, with exactly one group id per row (section 5.5)."""
    import torch

    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise MmkitError("grouped batches need a map-style dataset with a length, not an iterable dataset",
                         field="train_dataset")
    if len(groups) != len(dataset):
        raise MmkitError(f"expected one group id per dataset row: {len(groups)} group ids for "
                         f"{len(dataset)} rows", field="groups")


def _is_hf_dataset(dataset: Any) -> bool:
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _warn_accumulation(sampler_kwargs: Mapping[str, Any], accumulation_steps: int) -> None:
    """Section 12.5: a sampler built for another A is group-pure per micro-batch only."""
    given = sampler_kwargs.get("accumulation_steps", accumulation_steps)
    if given != accumulation_steps:
        log.warning("sampler accumulation_steps=%s but training accumulates %s micro-batches per update: "
                    "batches are group-pure per micro-batch only, not per optimizer update",
                    given, accumulation_steps)


def make_grouped_dataloader(
    dataset: Any,
    groups: Any,
    batch_size: int,
    collate_fn: Callable | None,
    accelerator: Any = None,
    *,
    loader_kwargs: Mapping[str, Any] | None = None,
    **sampler_kwargs: Any,
) -> tuple[Any, GroupedBatchSampler]:
    """``(loader, sampler)`` for a custom loop (section 8).

    With an ``accelerator`` the shard mode is ``global`` (``split`` when it splits batches), W,
    rank and A come from it, and the loader is prepared; without one it is ``rank`` under an
    initialised ``torch.distributed`` (bare DDP) and ``global`` otherwise. ``sampler_kwargs``
    override any of these; ``loader_kwargs`` go to ``DataLoader`` (the default generator is
    seeded with the sampler seed, so worker seeds do not come from the global RNG).
    """
    import torch
    from torch.utils.data import DataLoader

    from mmkit.cluster.sampler import _distributed

    _check_dataset(dataset, groups)
    if accelerator is not None:
        defaults = {"world_size": accelerator.num_processes, "rank": accelerator.process_index,
                    "accumulation_steps": accelerator.gradient_accumulation_steps,
                    "shard": "split" if accelerator.split_batches else "global"}
        _warn_accumulation(sampler_kwargs, accelerator.gradient_accumulation_steps)
    else:
        defaults = {"shard": "rank" if _distributed() is not None else "global"}
    sampler = GroupedBatchSampler(groups, batch_size, **{**defaults, **sampler_kwargs})
    options = {"generator": torch.Generator().manual_seed(sampler.seed), **(loader_kwargs or {})}
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **options)
    return (accelerator.prepare(loader) if accelerator is not None else loader), sampler


class GroupedBatchMixin:
    """Overrides only ``get_train_dataloader`` of a ``Trainer`` with group-pure batches (section 8).

    B, W and A come from the training arguments (so a whole optimizer update is group-pure),
    the seed from ``args.data_seed`` or ``args.seed``; ``sampler_kwargs`` add options such as
    ``small_groups``, ``group_info`` or ``weights``. The built sampler is ``self.grouped_sampler``.
    """

    def __init__(self, *args: Any, groups: Any, sampler_kwargs: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.groups = groups
        self.sampler_kwargs = dict(sampler_kwargs or {})
        self.grouped_sampler: GroupedBatchSampler | None = None
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self.data_collator
        _check_dataset(dataset, self.groups)
        # The Trainer's column removal (drops columns, never rows), where it exposes it.
        if _is_hf_dataset(dataset):
            if hasattr(self, "_remove_unused_columns"):
                dataset = self._remove_unused_columns(dataset, description="Training")
        elif hasattr(self, "_get_collator_with_removed_columns"):
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        args = self.args
        _warn_accumulation(self.sampler_kwargs, args.gradient_accumulation_steps)
        options = {"batch_size": args.per_device_train_batch_size, "world_size": args.world_size,
                   "rank": args.process_index, "accumulation_steps": args.gradient_accumulation_steps,
                   "seed": args.data_seed if args.data_seed is not None else args.seed,
                   "shard": "split" if self.accelerator.split_batches else "global", **self.sampler_kwargs}
        sampler = GroupedBatchSampler(self.groups, **options)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0)
        self.grouped_sampler = sampler
        callback = _lazy("GroupedEpochCallback")
        self.pop_callback(callback)  # get_train_dataloader may run more than once
        self.add_callback(callback(sampler))
        return self.accelerator.prepare(loader)


def _build_epoch_callback() -> type:
    from transformers import TrainerCallback

    class GroupedEpochCallback(TrainerCallback):
        """Sets the grouped sampler's epoch to ``floor(state.epoch + 1e-6)`` in ``on_epoch_begin``."""

        def __init__(self, sampler: GroupedBatchSampler) -> None:
            self.sampler = sampler

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sampler.set_epoch(math.floor(state.epoch + 1e-6))

    return GroupedEpochCallback


def _build_trainer() -> type:
    from transformers import Trainer

    class GroupedTrainer(GroupedBatchMixin, Trainer):
        """``transformers.Trainer`` with group-pure batches: ``GroupedTrainer(..., groups=labels)``."""

    return GroupedTrainer


_BUILDERS = {"GroupedEpochCallback": _build_epoch_callback, "GroupedTrainer": _build_trainer}


def _lazy(name: str) -> type:
    if name not in _LAZY:
        cls = _BUILDERS[name]()
        cls.__module__, cls.__qualname__ = __name__, name  # picklable as mmkit.cluster.hf.<name>
        _LAZY[name] = cls
    return _LAZY[name]


def __getattr__(name: str) -> Any:
    """Build ``GroupedTrainer`` / ``GroupedEpochCallback`` on first access (imports transformers)."""
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _lazy(name)
