"""Group-pure batches for CommonIT (cluster.md section 5).

:func:`plan_epoch` is the whole algorithm: a pure, vectorised numpy function of (labels, B, W,
A, seed, epoch) that cuts every group into chunks of ``U = B * W * A`` examples (one optimizer
update) and shuffles the order of the chunks. :class:`GroupedBatchSampler` applies the
small-group policy (section 4), yields the plan in one of the shard modes of section 5.2 and
advances the epoch itself (section 5.3); :class:`RandomBatchSampler` is the controlled random
baseline of section 5.6. torch is imported only when ``torch.distributed`` is already in use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np

from mmkit.cluster.groups import GroupInfo, apply_small_groups, group_sizes
from mmkit.errors import MmkitError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

SAMPLER_TAG, RANDOM_TAG = 0, 2  # SeedSequence([seed, tag, epoch]) streams (section 5.6)

Weights = Union[str, Mapping[int, float], Sequence[float], np.ndarray, None]


# --------------------------------------------------------------------------- the plan


def _eligible(labels: np.ndarray, U: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ids (ascending) of the groups with at least U rows, and their sorted member indices."""
    order = np.argsort(labels, kind="stable")
    ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    members = np.split(order, starts[1:])
    keep = (ids >= 0) & (counts >= U)
    return ids[keep], [m for m, k in zip(members, keep) if k]


def _weight_vector(ids: np.ndarray, weights: Weights) -> np.ndarray:
    """w_g for the eligible ``ids`` from a mapping or sequence indexed by id, or ``"uniform"``."""
    if isinstance(weights, str):
        if weights != "uniform":
            raise MmkitError(f"expected per-group weights or 'uniform', got {weights!r}", field="weights")
        return np.ones(len(ids))
    if isinstance(weights, Mapping):
        missing = [int(g) for g in ids if int(g) not in weights]
        if missing:
            raise MmkitError(f"no weight for group(s) {missing}", field="weights")
        w = np.array([float(weights[int(g)]) for g in ids])
    else:
        arr = np.asarray(weights, dtype=np.float64)
        if arr.ndim != 1 or (ids.size and ids[-1] >= len(arr)):
            raise MmkitError(f"expected one weight per group id (at least {int(ids[-1]) + 1 if ids.size else 0}), "
                             f"got shape {list(arr.shape)}", field="weights")
        w = arr[ids]
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise MmkitError("expected finite weights >= 0 with a positive sum over the groups in use",
                         field="weights")
    return w


def step_quotas(n: np.ndarray, weights: np.ndarray, steps: int) -> np.ndarray:
    """m_g: floor(S * w_g / sum w), then the remaining steps to the largest fractional parts
    (ties: the lower id); section 5.1, weighted mode."""
    q = steps * weights / weights.sum()
    m = np.floor(q).astype(np.int64)
    extra = np.lexsort((np.arange(len(q)), -(q - m)))[: steps - int(m.sum())]
    m[extra] += 1
    return m


def plan_epoch(
    labels: Any,
    B: int,
    W: int,
    A: int,
    seed: int,
    epoch: int,
    weights: Weights = None,
    steps_per_epoch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(step_groups int64[S], batches int64[S, A, W, B])`` for one epoch (section 5.1).

    Groups with fewer than ``U = B*W*A`` rows (and rows labelled -1) take no part and draw no
    random numbers, so applying the ``drop`` policy first does not change the plan. With
    ``weights`` (per group id, or ``"uniform"``) each group gets a quota of the S steps
    (``steps_per_epoch`` overrides S) filled from successive fresh permutations; with only
    ``steps_per_epoch`` the weights are each group's whole-chunk count n_g.
    """
    labels = np.asarray(labels, dtype=np.int64)
    U = B * W * A
    rng = np.random.default_rng(np.random.SeedSequence([seed, SAMPLER_TAG, epoch]))
    ids, members = _eligible(labels, U)
    n = np.array([len(m) // U for m in members], dtype=np.int64)
    m = n
    if weights is not None or steps_per_epoch is not None:
        w = n.astype(np.float64) if weights is None else _weight_vector(ids, weights)
        m = step_quotas(n, w, int(n.sum()) if steps_per_epoch is None else steps_per_epoch)
    chunks = [np.empty((0, U), dtype=np.int64)]
    for members_g, n_g, m_g in zip(members, n, m):
        if m_g:  # ceil(m_g / n_g) passes, each a fresh permutation cut into n_g whole chunks
            passes = [rng.permutation(members_g)[: n_g * U] for _ in range(-(-m_g // n_g))]
            chunks.append(np.concatenate(passes).reshape(-1, U)[:m_g])
    chunks = np.concatenate(chunks)
    steps = np.repeat(ids, m)
    step_groups = steps[rng.permutation(len(steps))]
    # The m-th step naming g takes chunk c_{g,m}: rank each step among its group's steps.
    chunk_of_step = np.empty(len(steps), dtype=np.int64)
    chunk_of_step[np.argsort(step_groups, kind="stable")] = np.arange(len(steps))
    return step_groups, chunks[chunk_of_step].reshape(len(steps), A, W, B)


# --------------------------------------------------------------------------- shard modes


@dataclass(frozen=True)
class ShardMode:
    """How a plan ``[S, A, W, B]`` becomes yielded batches (section 5.2)."""

    select: Callable[[np.ndarray, int], np.ndarray]  # (batches, rank) -> [n_batches, batch_size]
    shape: Callable[[int, int, int, int], tuple[int, int]]  # (S, A, W, B) -> (n_batches, batch_size)


SHARDS: Registry = Registry("shard mode")
SHARDS.register("global", ShardMode(lambda b, r: b.reshape(-1, b.shape[-1]), lambda S, A, W, B: (S * A * W, B)))
SHARDS.register("rank", ShardMode(lambda b, r: b[:, :, r].reshape(-1, b.shape[-1]), lambda S, A, W, B: (S * A, B)))
SHARDS.register("split", ShardMode(lambda b, r: b.reshape(-1, b.shape[-2] * b.shape[-1]),
                                   lambda S, A, W, B: (S * A, W * B)))


# --------------------------------------------------------------------------- distributed helpers


def _distributed() -> Any:
    """``torch.distributed`` when it is initialised (never imports torch itself), else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _resolve_world(world_size: int | None, rank: int | None) -> tuple[int, int]:
    """W and rank: explicit, else torch.distributed, else $WORLD_SIZE / $RANK, else 1 / 0."""
    dist = _distributed()
    try:
        if world_size is None:
            world_size = dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))
        if rank is None:
            rank = dist.get_rank() if dist else int(os.environ.get("RANK", 0))
    except ValueError as exc:
        raise MmkitError(f"expected integer WORLD_SIZE / RANK environment variables ({exc})",
                         field="world_size") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise MmkitError(f"expected world_size >= 1 and 0 <= rank < world_size, got {world_size} and {rank}",
                         field="world_size")
    return int(world_size), int(rank)


def _inputs_hash(labels: np.ndarray, params: list[Any], info: GroupInfo | None) -> int:
    """A signed 64-bit hash of the sampler inputs, compared across ranks (invariant 4)."""
    h = hashlib.sha256(labels.astype("<i8").tobytes())
    h.update(json.dumps(params, default=str, sort_keys=True).encode())
    if info is not None:
        h.update(json.dumps([info.names, info.ordered, info.kind]).encode())
        for arr in (info.centroids, info.medians):
            h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def _check_ranks_agree(value: int) -> None:
    """All-gather the input hash over torch.distributed and raise if the ranks differ."""
    dist = _distributed()
    if dist is None:
        return
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    values = [int(t.item()) for t in gathered]
    if len(set(values)) > 1:
        raise MmkitError("the ranks built the sampler from different inputs (labels, B, W, A, seed, policy, "
                         f"weights); hash per rank: {values}. Every rank must read the same groups file "
                         "with the same options", field="groups")


# --------------------------------------------------------------------------- samplers


class GroupedBatchSampler:
    """Batches that each come from one group; a whole optimizer update shares the group.

    A batch sampler for ``DataLoader(batch_sampler=...)`` (cluster.md sections 5 and 8). It has
    ``batch_size`` and ``drop_last = True`` but deliberately no ``sampler`` or ``generator``
    attribute, so accelerate does not swap in its own seeded sampler. ``set_epoch(e)`` takes
    effect at the next ``__iter__``; a complete iteration moves on to the next epoch by itself.
    ``labels``, ``names`` and ``merged_from`` describe the groups after the small-group policy
    (ids renumbered contiguously); ``step_groups`` of :meth:`plan` use those ids. ``weights``
    are keyed by the input ids; a merged group gets the sum of its members' weights.
    """

    def __init__(
        self,
        groups: Any,
        batch_size: int,
        world_size: int | None = None,
        rank: int | None = None,
        accumulation_steps: int = 1,
        seed: int = 0,
        shard: str = "global",
        small_groups: str = "merge",
        group_info: GroupInfo | None = None,
        weights: Weights = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        raw = np.asarray(groups)
        if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
            raise MmkitError(f"expected a non-empty 1-D integer array of group ids (one per dataset row), "
                             f"got dtype {raw.dtype} and shape {list(raw.shape)}", field="groups")
        raw = raw.astype(np.int64, copy=False)
        for name, value, low in (("batch_size", batch_size, 1), ("accumulation_steps", accumulation_steps, 1),
                                 ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise MmkitError(f"expected an integer >= {low}, got {value!r}", field=name)
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise MmkitError(f"expected an integer >= 1, got {steps_per_epoch!r}", field="steps_per_epoch")
        self._shard = SHARDS.resolve(shard, field="shard")
        self.world_size, self.rank = _resolve_world(world_size, rank)
        self.accumulation_steps, self.seed, self.shard = int(accumulation_steps), int(seed), shard
        self.micro_batch_size = int(batch_size)
        self.drop_last = True
        self.epoch = 0
        B, W, A = self.micro_batch_size, self.world_size, self.accumulation_steps
        self.U = B * W * A
        weights_key = weights if isinstance(weights, (str, type(None))) else (
            sorted((int(k), float(v)) for k, v in weights.items()) if isinstance(weights, Mapping)
            else np.asarray(weights, dtype=np.float64).tolist())
        _check_ranks_agree(_inputs_hash(raw, [B, W, A, self.seed, small_groups, weights_key, steps_per_epoch],
                                        group_info))

        result = apply_small_groups(raw, self.U, small_groups, group_info)
        self.labels, self.names, self.merged_from = result.labels, result.names, result.merged_from
        self.weights = self._merged_weights(weights)
        self._steps_per_epoch = steps_per_epoch
        ids, sizes = group_sizes(self.labels)
        n = sizes // self.U
        S = int(n.sum()) if steps_per_epoch is None else int(steps_per_epoch)
        if weights is not None:
            _weight_vector(ids[n > 0], self.weights)  # validate now, not at the first epoch
        if not n.any():
            largest = int(max(group_sizes(raw)[1].max(initial=0), sizes.max(initial=0)))
            raise MmkitError(f"no group fills one optimizer update: U = B*W*A = {B}*{W}*{A} = {self.U} examples, "
                             f"the largest group has {largest}; lower the batch size, world size or "
                             "gradient accumulation", field="groups")
        self.steps = S
        self.n_batches, self.batch_size = self._shard.shape(S, A, W, B)
        self.report = {
            "U": self.U, "policy": small_groups, "n_groups": int((n > 0).sum()), "steps": S, "kept": S * self.U,
            "leftover": int((sizes[n > 0] % self.U).sum()), "excluded": int((raw < 0).sum()),
            "dropped_small": result.dropped, "small_groups": result.report, "merged_from": self.merged_from,
        }
        log.info("grouped batches: %d groups, %d steps per epoch of U = %d examples; %d kept, %d left over, "
                 "%d dropped as small, %d excluded (-1)", self.report["n_groups"], S, self.U, self.report["kept"],
                 self.report["leftover"], result.report["examples"], self.report["excluded"])

    def _merged_weights(self, weights: Weights) -> Weights:
        """Weights by input id -> by group after the policy (a merged group sums its members)."""
        if weights is None or isinstance(weights, str):
            return weights
        if isinstance(weights, Mapping):
            missing = [o for origin in self.merged_from for o in origin if o not in weights]
            if missing:
                raise MmkitError(f"no weight for group(s) {missing}", field="weights")
            return {g: sum(float(weights[o]) for o in origin) for g, origin in enumerate(self.merged_from)}
        arr = np.asarray(weights, dtype=np.float64)
        top = max((o for origin in self.merged_from for o in origin), default=-1)
        if arr.ndim != 1 or top >= len(arr):
            raise MmkitError(f"expected one weight per group id (at least {top + 1}), got shape {list(arr.shape)}",
                             field="weights")
        return np.array([arr[origin].sum() for origin in self.merged_from])

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(step_groups int64[S], batches int64[S, A, W, B])`` of ``epoch`` (default: the current)."""
        return plan_epoch(self.labels, self.micro_batch_size, self.world_size, self.accumulation_steps, self.seed,
                          self.epoch if epoch is None else epoch, self.weights, self._steps_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s plan from the next ``__iter__`` on."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise MmkitError(f"expected an integer epoch >= 0, got {epoch!r}", field="epoch")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        rows = self._shard.select(self.plan(epoch)[1], self.rank).tolist()
        return self._run(epoch, rows)

    def _run(self, epoch: int, rows: list[list[int]]) -> Iterator[list[int]]:
        yield from rows
        if self.epoch == epoch:  # finished, and set_epoch was not called meanwhile
            self.epoch = epoch + 1


class RandomBatchSampler(GroupedBatchSampler):
    """The random baseline (section 5.6): the CommonIT kept set of each epoch, shuffled globally
    with the tag-2 stream and cut into U-sized updates. Same signature, steps and length;
    ``step_groups`` is -1 (mixed) for every step."""

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        epoch = self.epoch if epoch is None else epoch
        step_groups, batches = super().plan(epoch)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, RANDOM_TAG, epoch]))
        mixed = rng.permutation(np.sort(batches.reshape(-1)))
        return np.full_like(step_groups, -1), mixed.reshape(batches.shape)


# --------------------------------------------------------------------------- grouped files


def load_groups(path: str | os.PathLike, field: str = "group") -> np.ndarray:
    """The ``group`` column of a grouped jsonl/json/parquet/``save_to_disk`` file, int64[N] in file order."""
    from mmkit.io import read_records

    values = np.fromiter((rec.require(field, int) for rec in read_records(str(path))), dtype=np.int64)
    if values.size and values.min() < -1:
        raise MmkitError(f"expected group ids >= 0 (or -1), got {int(values.min())}", file=str(path), field=field)
    return values
