"""GroupedBatchSampler and plan_epoch (cluster.md section 10, items 1-5, and section 5.5)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmkit.cluster.sampler import (GroupedBatchSampler, RandomBatchSampler, load_groups, plan_epoch,
                                   step_quotas)
from mmkit.errors import MmkitError

ROOT = Path(__file__).resolve().parents[2]
HAND = np.array([0] * 10 + [1] * 7 + [2] * 3)  # section 10, item 1


def _rng(seed: int, tag: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag, epoch]))


# --------------------------------------------------------------------------- item 1


def test_hand_computed_plan(caplog):
    with caplog.at_level(logging.WARNING, logger="mmkit"):
        sampler = GroupedBatchSampler(HAND, batch_size=2, world_size=2, rank=0, small_groups="drop")
    assert "group 2 (3 examples)" in caplog.text and "3 examples dropped" in caplog.text
    rep = sampler.report
    assert (rep["U"], rep["steps"], rep["kept"], rep["leftover"]) == (4, 3, 12, 5)
    assert rep["dropped_small"] == {2: 3} and rep["small_groups"]["examples"] == 3
    assert len(sampler) == 6 and len(list(sampler)) == 6
    rank = GroupedBatchSampler(HAND, batch_size=2, world_size=2, rank=1, small_groups="drop", shard="rank")
    assert len(rank) == 3 and len(list(rank)) == 3

    step_groups, batches = sampler.plan(0)
    assert sorted(step_groups.tolist()) == [0, 0, 1] and batches.shape == (3, 1, 2, 2)
    # The same plan by hand, step by step from section 5.1.
    rng = _rng(0, 0, 0)
    pi0, pi1 = rng.permutation(np.arange(10)), rng.permutation(np.arange(10, 17))
    chunks = {0: [pi0[:4], pi0[4:8]], 1: [pi1[:4]]}
    tau = np.array([0, 0, 1])[rng.permutation(3)]
    used = {0: 0, 1: 0}
    for t, g in enumerate(tau):
        chunk = chunks[g][used[g]]
        used[g] += 1
        assert step_groups[t] == g
        assert batches[t, 0].tolist() == [chunk[:2].tolist(), chunk[2:].tolist()]


# --------------------------------------------------------------------------- item 2


def _skewed_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    p = 0.6 ** np.arange(k)
    labels = rng.choice(k, size=n, p=p / p.sum())
    ids = np.sort(rng.choice(3 * k, size=k, replace=False))  # gaps in the ids
    labels = ids[labels]
    labels[rng.random(n) < 0.05] = -1
    return labels


def _check_invariants(labels, B, W, A, seed, policy):
    U = B * W * A
    kwargs = dict(batch_size=B, world_size=W, accumulation_steps=A, seed=seed, small_groups=policy)
    glob = GroupedBatchSampler(labels, rank=0, **kwargs)
    eff = glob.labels
    ids, sizes = np.unique(eff[eff >= 0], return_counts=True)
    n = dict(zip(ids.tolist(), (sizes // U).tolist()))
    S = sum(n.values())
    for epoch in (0, 1):
        glob.set_epoch(epoch)
        step_groups, plan = glob.plan(epoch)
        flat = list(glob)
        # 5. shape and length
        assert len(flat) == len(glob) == S * A * W and all(len(b) == B for b in flat)
        # 1. purity: every batch of an update comes from the step's group
        assert plan.shape == (S, A, W, B)
        assert np.all(eff[plan] == step_groups[:, None, None, None])
        assert np.array_equal(np.array(flat).reshape(S, A, W, B), plan)
        # 2. exactly once, U * floor(|I_g| / U) per group
        used = plan.reshape(-1)
        assert len(np.unique(used)) == used.size == U * S
        assert {g: int((eff[used] == g).sum()) // U for g in ids.tolist()} == n
        # 4. rank agreement; every rank yields as many batches
        for r in range(W):
            rank = GroupedBatchSampler(labels, rank=r, shard="rank", **kwargs)
            rank.set_epoch(epoch)
            mine = list(rank)
            assert len(mine) == len(rank) == S * A
            assert mine == [flat[i * W + r] for i in range(S * A)]
        split = GroupedBatchSampler(labels, rank=0, shard="split", **kwargs)
        split.set_epoch(epoch)
        joined = list(split)
        assert split.batch_size == W * B and len(joined) == len(split) == S * A
        assert joined == [sum(flat[i * W:(i + 1) * W], []) for i in range(S * A)]
    # 3. determinism; another epoch or seed changes the plan
    assert all(np.array_equal(x, y) for x, y in zip(glob.plan(0), plan_epoch(eff, B, W, A, seed, 0)))
    if S >= 4:
        assert not np.array_equal(glob.plan(0)[1], glob.plan(1)[1])
        other = GroupedBatchSampler(labels, rank=0, **{**kwargs, "seed": seed + 1})
        assert not np.array_equal(glob.plan(0)[1], other.plan(0)[1])


def test_invariants_grid():
    checked = raised = 0
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        for B in (1, 3, 8):
            for W in (1, 2, 4):
                for A in (1, 2):
                    U = B * W * A
                    n, k = int(rng.integers(1, 301)), int(rng.integers(1, 13))
                    labels = _skewed_labels(rng, n, k)
                    policy = ("drop", "merge")[seed % 2]
                    _, sizes = np.unique(labels[labels >= 0], return_counts=True)
                    big = sizes[sizes >= U]
                    # merge without group info pools the small groups; a pool under U is dropped
                    pool = sizes[sizes < U].sum() if policy == "merge" else 0
                    if big.size == 0 and pool < U:
                        with pytest.raises(MmkitError, match=f"U = B\\*W\\*A = {B}\\*{W}\\*{A} = {U}"):
                            GroupedBatchSampler(labels, B, world_size=W, rank=0, accumulation_steps=A,
                                                seed=seed, small_groups=policy)
                        raised += 1
                        continue
                    _check_invariants(labels, B, W, A, seed, policy)
                    checked += 1
    assert checked > 30 and raised > 5  # the grid exercises both outcomes


# --------------------------------------------------------------------------- item 3


def test_weighted_quotas():
    assert step_quotas(np.array([2, 1]), np.array([1.0, 3.0]), 3).tolist() == [1, 2]
    assert step_quotas(np.array([1, 1, 1]), np.array([1.0, 1.0, 1.0]), 2).tolist() == [1, 1, 0]  # ties: lower id
    sampler = GroupedBatchSampler(HAND, 2, world_size=2, rank=0, small_groups="drop", weights={0: 1, 1: 3})
    step_groups, batches = sampler.plan(0)
    assert sampler.steps == 3 and sorted(step_groups.tolist()) == [0, 1, 1]
    ones = batches[step_groups == 1].reshape(2, 4)
    for chunk in ones:
        assert len(set(chunk.tolist())) == 4 and set(chunk.tolist()) <= set(range(10, 17))
    # Two passes: each chunk is the first U of a fresh permutation of group 1.
    rng = _rng(0, 0, 0)
    pi0 = rng.permutation(np.arange(10))
    passes = [rng.permutation(np.arange(10, 17))[:4] for _ in range(2)]
    assert batches[step_groups == 0].reshape(-1).tolist() == pi0[:4].tolist()
    assert [c.tolist() for c in ones] == [p.tolist() for p in passes]
    zero = GroupedBatchSampler(HAND, 2, world_size=2, small_groups="drop", weights={0: 0, 1: 1})
    assert (zero.plan(0)[0] == 1).all()
    longer = GroupedBatchSampler(HAND, 2, world_size=2, small_groups="drop", weights="uniform", steps_per_epoch=7)
    assert len(longer) == 14 and np.bincount(longer.plan(3)[0]).tolist() == [4, 3]
    # steps_per_epoch alone weights groups by their chunk counts: at S it is the plain plan.
    same = plan_epoch(HAND, 2, 2, 1, 0, 0, steps_per_epoch=3)
    assert all(np.array_equal(x, y) for x, y in zip(same, plan_epoch(HAND, 2, 2, 1, 0, 0)))
    for bad in ({0: 1}, {0: -1, 1: 1}, {0: 0, 1: 0}, "skewed"):
        with pytest.raises(MmkitError, match="weight"):
            GroupedBatchSampler(HAND, 2, world_size=2, small_groups="drop", weights=bad)


# --------------------------------------------------------------------------- item 4

_HASH_SCRIPT = """
import hashlib, sys
import numpy as np
from mmkit.cluster.sampler import plan_epoch
labels = np.random.default_rng(7).integers(0, 9, size=500)
h = hashlib.sha256()
for seed, epoch in ((0, 0), (0, 1), (1, 0)):
    for part in plan_epoch(labels, 4, 2, 2, seed, epoch):
        h.update(part.astype("<i8").tobytes())
    print(seed, epoch, h.hexdigest())
"""


def test_determinism_across_processes():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONHASHSEED="random")
    runs = [subprocess.run([sys.executable, "-c", _HASH_SCRIPT], capture_output=True, text=True, env=env,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == 3
    labels = np.random.default_rng(7).integers(0, 9, size=500)
    p00, p01, p10 = (plan_epoch(labels, 4, 2, 2, s, e)[1] for s, e in ((0, 0), (0, 1), (1, 0)))
    assert not np.array_equal(p00, p01) and not np.array_equal(p00, p10)


def test_skipping_batches_gives_the_plan_suffix():
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader

    labels = np.random.default_rng(3).integers(0, 4, size=120)
    sampler = GroupedBatchSampler(labels, 3, world_size=2, rank=0)
    full = sampler.plan(1)[1].reshape(-1, 3).tolist()
    sampler.set_epoch(1)
    loader = DataLoader(range(len(labels)), batch_sampler=sampler, collate_fn=list)
    assert list(skip_first_batches(loader, 5)) == full[5:]


# --------------------------------------------------------------------------- epochs and edge cases


def test_set_epoch_auto_advance_and_abandoned_iteration():
    sampler = GroupedBatchSampler(np.arange(40) % 3, 4)
    plans = [sampler.plan(e)[1].reshape(-1, 4).tolist() for e in range(3)]
    assert list(sampler) == plans[0] and sampler.epoch == 1  # a complete pass advances the epoch
    it = iter(sampler)
    next(it)
    del it
    assert sampler.epoch == 1 and list(sampler) == plans[1]  # an abandoned pass does not
    it = iter(sampler)  # set_epoch takes effect at the next __iter__, not in a running one
    sampler.set_epoch(0)
    assert list(it) == plans[2] and sampler.epoch == 0
    assert list(sampler) == plans[0]
    for attr in ("sampler", "generator"):
        assert not hasattr(sampler, attr)
    assert sampler.drop_last is True and sampler.batch_size == 4


def test_gaps_excluded_rows_and_one_group():
    labels = np.array([5] * 9 + [-1] * 4 + [0] * 8 + [9] * 4)
    sampler = GroupedBatchSampler(labels, 4, small_groups="error")
    assert sampler.names == ["0", "5", "9"] and sampler.merged_from == [[0], [5], [9]]
    assert sampler.report["excluded"] == 4 and sampler.report["leftover"] == 1
    used = np.concatenate(list(sampler))
    assert len(used) == 20 and not (labels[used] == -1).any()
    one = GroupedBatchSampler(np.zeros(13, dtype=int), 2, accumulation_steps=2)  # K' = 1: random batching
    assert len(set(np.concatenate(list(one)).tolist())) == 12 and (one.plan(0)[0] == 0).all()


@pytest.mark.parametrize("labels, match", [
    ([[0, 1]], "1-D integer"), ([], "non-empty"), ([0.5, 1.0], "integer"), ([0, -2], ">= 0"),
])
def test_bad_labels(labels, match):
    with pytest.raises(MmkitError, match=match):
        GroupedBatchSampler(np.array(labels), 1)


def test_no_full_update_names_u_and_largest_group():
    with pytest.raises(MmkitError, match=r"U = B\*W\*A = 6\*2\*1 = 12 examples, the largest group has 10"):
        GroupedBatchSampler(HAND, 6, world_size=2, small_groups="drop")
    with pytest.raises(MmkitError, match="the largest group has 3"):
        GroupedBatchSampler(np.zeros(3, dtype=int), 4)  # N < U


def test_world_size_and_rank_from_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    sampler = GroupedBatchSampler(HAND, 2, small_groups="drop", shard="rank")
    assert (sampler.world_size, sampler.rank) == (2, 1) and len(sampler) == 3
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(MmkitError, match="rank"):
        GroupedBatchSampler(HAND, 2, small_groups="drop")


def test_random_baseline_same_kept_set():
    labels = np.random.default_rng(5).integers(0, 5, size=200)
    grouped = GroupedBatchSampler(labels, 4, world_size=2, accumulation_steps=2, seed=3)
    random = RandomBatchSampler(labels, 4, world_size=2, accumulation_steps=2, seed=3)
    assert len(random) == len(grouped) and random.report == grouped.report
    for epoch in (0, 1):
        g, r = grouped.plan(epoch)[1], random.plan(epoch)[1]
        assert g.shape == r.shape and np.array_equal(np.sort(g, axis=None), np.sort(r, axis=None))
        assert (random.plan(epoch)[0] == -1).all()
        mixed = [len(set(labels[batch].tolist())) > 1 for batch in r.reshape(-1, 16)]
        assert any(mixed)
    assert list(random) == random.plan(0)[1].reshape(-1, 4).tolist()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf"])
def test_load_groups(tmp_path, fmt):
    records = [{"instruction": f"q{i}", "group": int(g)} for i, g in enumerate([2, 0, 1, 1, 0])]
    path = tmp_path / f"grouped.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    else:
        import datasets

        ds = datasets.Dataset.from_list(records)
        ds.to_parquet(str(path)) if fmt == "parquet" else ds.save_to_disk(str(path))
    groups = load_groups(path)
    assert groups.dtype == np.int64 and groups.tolist() == [2, 0, 1, 1, 0]


def test_load_groups_missing_field(tmp_path):
    path = tmp_path / "grouped.jsonl"
    path.write_text('{"group": 0}\n{"text": "x"}\n')
    with pytest.raises(MmkitError, match=r"grouped.jsonl:2: group"):
        load_groups(path)


# --------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("W", [2, 4])
def test_accelerate_batch_sampler_shard_matches_rank_mode(W):
    from accelerate.data_loader import BatchSamplerShard

    labels = np.random.default_rng(W).integers(0, 6, size=300)
    kwargs = dict(batch_size=3, world_size=W, accumulation_steps=2, seed=1)
    glob = GroupedBatchSampler(labels, rank=0, **kwargs)
    for r in range(W):
        shard = BatchSamplerShard(glob, num_processes=W, process_index=r, split_batches=False)
        rank = GroupedBatchSampler(labels, rank=r, shard="rank", **kwargs)
        glob.set_epoch(2)
        rank.set_epoch(2)
        assert len(shard) == len(rank) and list(shard) == list(rank)
    split = GroupedBatchSampler(labels, rank=0, shard="split", **kwargs)
    for r in range(W):
        split.set_epoch(0)  # each complete pass advances the epoch
        part = list(BatchSamplerShard(split, num_processes=W, process_index=r, split_batches=True))
        assert part == list(GroupedBatchSampler(labels, rank=r, shard="rank", **kwargs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, labels: np.ndarray, other: np.ndarray, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sampler = GroupedBatchSampler(labels, 2, accumulation_steps=2, seed=4, shard="rank")
        groups = torch.as_tensor(sampler.plan(0)[0])
        mine = torch.tensor(list(sampler), dtype=torch.int64)
        all_groups = [torch.empty_like(groups) for _ in range(world)]
        all_batches = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(all_groups, groups)
        dist.all_gather(all_batches, mine)
        try:  # one rank with other labels: every rank must refuse
            GroupedBatchSampler(other if rank == 1 else labels, 2, accumulation_steps=2, seed=4, shard="rank")
            mismatch = None
        except MmkitError as exc:
            mismatch = str(exc)
        result = {"world": sampler.world_size, "rank": sampler.rank,
                  "groups": [g.tolist() for g in all_groups], "batches": [b.tolist() for b in all_batches],
                  "mismatch": mismatch}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawning interpreters that import torch: about 10-20 s per world size
@pytest.mark.parametrize("W", [2, 4])
def test_gloo_ranks_agree_and_partition_the_epoch(tmp_path, W):
    import torch.multiprocessing as mp

    labels = np.random.default_rng(11).integers(0, 5, size=160)
    other = labels.copy()
    other[0] = (other[0] + 1) % 5
    mp.spawn(_dist_worker, args=(W, _free_port(), labels, other, str(tmp_path)), nprocs=W, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(W)]
    assert [(res["world"], res["rank"]) for res in results] == [(W, r) for r in range(W)]
    glob = GroupedBatchSampler(labels, 2, world_size=W, rank=0, accumulation_steps=2, seed=4)
    expected = set(np.concatenate(list(glob)).tolist())
    for res in results:
        assert all(g == res["groups"][0] for g in res["groups"])  # same group at every step
        assert res["groups"][0] == glob.plan(0)[0].tolist()
        per_rank = [np.array(b).reshape(-1) for b in res["batches"]]
        union = np.concatenate(per_rank)
        assert len(np.unique(union)) == union.size  # pairwise disjoint
        assert set(union.tolist()) == expected
        assert res["mismatch"] is not None and "different inputs" in res["mismatch"]
