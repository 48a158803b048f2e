"""Group metadata and the small-group policies of cluster.md section 4.

A group needs at least ``U = B * W * A`` examples to fill one optimizer update. The policies
in :data:`SMALL_GROUP_POLICIES` are pure functions ``policy(labels, U, info) -> SmallGroups``
over ``labels: int64[N]`` (-1 = excluded); they never drop a group silently:

- ``merge`` (default): repeatedly merge the smallest group under U (ties: lower id) into its
  nearest group, by the rule in :data:`MERGE_RULES` that the :class:`GroupInfo` calls for
  (nearest centroid by cosine, adjacent length bucket by median, or one ``_pooled_small`` pool
  for tasks and when there is no ``GroupInfo``; a pool still under U is dropped).
- ``warn`` / ``drop`` (synonyms): exclude groups under U, with a warning.
- ``error``: raise, naming the small groups.

Every policy renumbers the surviving groups contiguously in the metric's order (a merged
group takes the place of its lowest original id) and records ``merged_from`` per group.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mmkit.errors import DataError, MmkitError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

POOLED_NAME = "_pooled_small"
GROUP_KINDS = ("task", "embedding", "length")


# --------------------------------------------------------------------------- group info


@dataclass
class GroupInfo:
    """What the ``merge`` policy knows about groups ``0..K-1`` (cluster.md section 4).

    ``centroids`` (float32[K, d]) enable nearest-centroid merging; ``ordered`` groups (length
    buckets, which need ``medians``) merge only into an adjacent bucket; otherwise small groups
    are pooled.
    """

    names: list[str]
    centroids: np.ndarray | None = None
    ordered: bool = False
    medians: np.ndarray | None = None
    kind: str = "task"

    def __post_init__(self) -> None:
        k = len(self.names)
        if self.kind not in GROUP_KINDS:
            raise MmkitError(f"expected one of {', '.join(GROUP_KINDS)}, got {self.kind!r}", field="kind")
        if self.centroids is not None:
            self.centroids = np.asarray(self.centroids, dtype=np.float32)
            if self.centroids.ndim != 2 or len(self.centroids) != k:
                raise MmkitError(f"expected centroids of shape [{k}, d], got {list(self.centroids.shape)}",
                                 field="centroids")
        if self.medians is not None:
            self.medians = np.asarray(self.medians, dtype=np.float64)
            if self.medians.shape != (k,):
                raise MmkitError(f"expected {k} medians, got shape {list(self.medians.shape)}", field="medians")
        if self.ordered and self.medians is None:
            raise MmkitError("ordered groups (length buckets) need their median lengths", field="medians")

    @property
    def merge_rule(self) -> str:
        """The :data:`MERGE_RULES` entry for these groups."""
        if self.centroids is not None:
            return "nearest-centroid"
        return "adjacent" if self.ordered else "pool"

    @classmethod
    def from_summary(cls, summary: str | os.PathLike | Mapping[str, Any],
                     centroids_path: str | os.PathLike | None = None) -> GroupInfo:
        """Read ``summary.json`` (a path or its parsed dict) and, when present, the centroids.

        ``centroids_path`` defaults to ``centroids.safetensors`` next to a summary path; the
        embedding metric requires it.
        """
        source = "summary.json"
        if not isinstance(summary, Mapping):
            source = str(summary)
            try:
                summary = json.loads(Path(summary).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise DataError("no such file", file=source) from None
            sibling = Path(source).with_name("centroids.safetensors")
            if centroids_path is None and sibling.is_file():
                centroids_path = sibling
        kind = summary.get("metric")
        if kind not in GROUP_KINDS:
            raise DataError(f"expected one of {', '.join(GROUP_KINDS)}, got {kind!r}", file=source, field="metric")
        groups = sorted(summary.get("groups") or [], key=lambda g: g["id"])
        if [g["id"] for g in groups] != list(range(len(groups))):
            raise DataError("expected group ids 0..K-1", file=source, field="groups")
        medians = None
        if groups and all(g.get("length_tokens") for g in groups):
            medians = np.array([g["length_tokens"]["median"] for g in groups], dtype=np.float64)
        centroids = None
        if centroids_path is not None:
            from safetensors.numpy import load_file

            centroids = load_file(str(centroids_path))["centroids"]
        elif kind == "embedding":
            raise DataError("the embedding metric needs its centroids.safetensors (pass centroids_path)",
                            file=source, field="centroids")
        return cls(names=[str(g["name"]) for g in groups], centroids=centroids, ordered=kind == "length",
                   medians=medians, kind=kind)


# --------------------------------------------------------------------------- results


@dataclass
class SmallGroups:
    """A policy's outcome: relabelled rows, group names and provenance, and the report."""

    labels: np.ndarray  # int64[N]; ids 0..K'-1 in the metric's order, -1 = excluded
    names: list[str]
    merged_from: list[list[int]]  # original ids per new group
    report: dict[str, Any]  # {U, policy, groups: {id: size} (groups under U), examples: n dropped}
    dropped: dict[int, int]  # original id -> size, groups excluded by the policy


def group_sizes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, sizes)`` of the groups present (ascending ids; -1 rows are not a group)."""
    return np.unique(labels[labels >= 0], return_counts=True)


def _names(ids: np.ndarray, info: GroupInfo | None) -> dict[int, str]:
    if info is None:
        return {int(g): str(g) for g in ids}
    if ids.size and ids[-1] >= len(info.names):
        raise MmkitError(f"group id {int(ids[-1])} is out of range for the {len(info.names)} groups "
                         "of the group info", field="group_info")
    return {int(g): info.names[g] for g in ids}


def _relabel(labels: np.ndarray, ids: np.ndarray, sizes: np.ndarray, rep: np.ndarray, U: int, policy: str,
             info: GroupInfo | None, rename: Mapping[int, str] | None = None) -> SmallGroups:
    """Map each original id to its representative ``rep`` (-1 = dropped) and renumber."""
    names = _names(ids, info)
    kept = np.unique(rep[rep >= 0])
    new_of_rep = {int(r): i for i, r in enumerate(kept)}
    table = np.full(int(ids.max(initial=-1)) + 2, -1, dtype=np.int64)  # index id + 1; -1 -> slot 0
    table[ids + 1] = [new_of_rep.get(int(r), -1) for r in rep]
    merged_from = [[int(g) for g in ids[rep == r]] for r in kept]
    rename = rename or {}
    new_names = [rename.get(int(r)) or "+".join(names[g] for g in members)
                 for r, members in zip(kept, merged_from)]
    dropped = {int(g): int(n) for g, n, r in zip(ids, sizes, rep) if r < 0}
    small = sizes < U
    report = {"U": U, "policy": policy, "groups": {int(g): int(n) for g, n in zip(ids[small], sizes[small])},
              "examples": sum(dropped.values())}
    if dropped:
        log.warning("small groups (< U = B*W*A = %d examples) excluded from training: %s; "
                    "%d examples dropped", U, _listing(dropped), report["examples"])
    return SmallGroups(table[labels + 1], new_names, merged_from, report, dropped)


def _listing(groups: Mapping[int, int]) -> str:
    return ", ".join(f"group {g} ({n} examples)" for g, n in groups.items())


def _check_labels(labels: Any, U: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise MmkitError(f"expected a 1-D integer array of group ids, got dtype {arr.dtype} and "
                         f"shape {list(arr.shape)}", field="groups")
    if arr.size and arr.min() < -1:
        raise MmkitError(f"expected group ids >= 0 (or -1 for an excluded row), got {int(arr.min())}",
                         field="groups")
    if not isinstance(U, (int, np.integer)) or U < 1:
        raise MmkitError(f"expected U >= 1, got {U}", field="U")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- merge rules

MERGE_RULES: Registry = Registry("merge rule")


def _merge_loop(ids: np.ndarray, sizes: np.ndarray, U: int, values: np.ndarray,
                pick: Callable[[int, np.ndarray, np.ndarray], int]) -> np.ndarray:
    """Merge the smallest group under U (ties: lower id) into ``pick(g, alive, values)`` until
    none is under U or one is left; a merged group's value is the size-weighted mean."""
    size, values, rep = sizes.astype(np.int64), values.astype(np.float64), ids.copy()
    alive = np.ones(len(ids), dtype=bool)
    merges = []
    while alive.sum() > 1:
        small = np.flatnonzero(alive & (size < U))
        if small.size == 0:
            break
        g = int(small[np.argmin(size[small])])  # argmin keeps the first: the lower id on ties
        alive[g] = False
        h = pick(g, alive, values)
        values[h] = (size[h] * values[h] + size[g] * values[g]) / (size[h] + size[g])
        merges.append(f"{ids[g]} ({size[g]}) -> {ids[h]}")
        size[h] += size[g]
        rep[rep == ids[g]] = ids[h]
    if merges:
        log.info("merged small groups (< U = %d): %s", U, ", ".join(merges))
    return rep


@MERGE_RULES.register("nearest-centroid")
def merge_nearest_centroid(ids: np.ndarray, sizes: np.ndarray, U: int, info: GroupInfo) -> tuple[np.ndarray, dict]:
    """Embedding: into the group with the most similar centroid (cosine; ties: lower id)."""

    def pick(g: int, alive: np.ndarray, cent: np.ndarray) -> int:
        others = np.flatnonzero(alive)
        unit = cent / np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        return int(others[np.argmax(unit[others] @ unit[g])])

    return _merge_loop(ids, sizes, U, info.centroids[ids], pick), {}


@MERGE_RULES.register("adjacent")
def merge_adjacent(ids: np.ndarray, sizes: np.ndarray, U: int, info: GroupInfo) -> tuple[np.ndarray, dict]:
    """Length: into the adjacent bucket whose median length is closer (ties: the lower one)."""

    def pick(g: int, alive: np.ndarray, med: np.ndarray) -> int:
        below, above = np.flatnonzero(alive[:g]), g + 1 + np.flatnonzero(alive[g + 1:])
        near = [int(i) for i in (below[-1:].tolist() + above[:1].tolist())]
        return min(near, key=lambda h: (abs(med[h, 0] - med[g, 0]), h))

    return _merge_loop(ids, sizes, U, info.medians[ids, None], pick), {}


@MERGE_RULES.register("pool")
def merge_pool(ids: np.ndarray, sizes: np.ndarray, U: int, info: GroupInfo | None) -> tuple[np.ndarray, dict]:
    """Task (or no group info): every group under U joins one ``_pooled_small`` group, which is
    dropped when it is still under U."""
    small = sizes < U
    rep = ids.copy()
    if not small.any():
        return rep, {}
    pool = int(sizes[small].sum())
    first = int(ids[small][0])
    rep[small] = first if pool >= U else -1
    if pool >= U:
        (log.warning if info is None else log.info)(
            "pooled %d small groups (< U = %d) into %r (%d examples): %s%s", int(small.sum()), U, POOLED_NAME,
            pool, _listing(dict(zip(ids[small].tolist(), sizes[small].tolist()))),
            "; pass group_info to merge by centroid or length instead" if info is None else "")
    return rep, {first: POOLED_NAME}


# --------------------------------------------------------------------------- policies

SMALL_GROUP_POLICIES: Registry = Registry("small-group policy")


@SMALL_GROUP_POLICIES.register("merge")
def merge_small(labels: np.ndarray, U: int, info: GroupInfo | None = None) -> SmallGroups:
    """Merge groups under U into their nearest group (rule from ``info.merge_rule``; pool without info)."""
    labels = _check_labels(labels, U)
    ids, sizes = group_sizes(labels)
    rule = MERGE_RULES.resolve(info.merge_rule if info is not None else "pool")
    _names(ids, info)  # range check before merging
    rep, rename = rule(ids, sizes, U, info)
    return _relabel(labels, ids, sizes, rep, U, "merge", info, rename)


def _drop(policy: str) -> Callable[..., SmallGroups]:
    def drop_small(labels: np.ndarray, U: int, info: GroupInfo | None = None) -> SmallGroups:
        """Exclude groups under U (rows become -1), with a warning."""
        labels = _check_labels(labels, U)
        ids, sizes = group_sizes(labels)
        return _relabel(labels, ids, sizes, np.where(sizes < U, -1, ids), U, policy, info)

    return drop_small


SMALL_GROUP_POLICIES.register("warn", _drop("warn"))
SMALL_GROUP_POLICIES.register("drop", _drop("drop"))


@SMALL_GROUP_POLICIES.register("error")
def error_small(labels: np.ndarray, U: int, info: GroupInfo | None = None) -> SmallGroups:
    """Raise when any group is under U, naming the groups."""
    labels = _check_labels(labels, U)
    ids, sizes = group_sizes(labels)
    small = sizes < U
    if small.any():
        listing = _listing(dict(zip(ids[small].tolist(), sizes[small].tolist())))
        raise MmkitError(f"groups smaller than U = B*W*A = {U} examples: {listing}; use merge or drop "
                         "(--small-groups / small_groups=), or lower the batch size", field="small_groups")
    return _relabel(labels, ids, sizes, ids.copy(), U, "error", info)


def apply_small_groups(labels: Any, U: int, policy: str = "merge", info: GroupInfo | None = None) -> SmallGroups:
    """Run the registered small-group ``policy`` on ``labels`` (cluster.md section 4)."""
    return SMALL_GROUP_POLICIES.resolve(policy, field="small_groups")(labels, U, info)
