"""Small-group policies and GroupInfo (cluster.md section 4; section 10, item 6)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from mmkit.cluster.groups import (MERGE_RULES, POOLED_NAME, SMALL_GROUP_POLICIES, GroupInfo,
                                  apply_small_groups)
from mmkit.cluster.sampler import GroupedBatchSampler
from mmkit.errors import MmkitError


def _labels(*sizes: int) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def _unit(degrees: float) -> list[float]:
    return [float(np.cos(np.radians(degrees))), float(np.sin(np.radians(degrees)))]


def test_registries():
    assert set(SMALL_GROUP_POLICIES) == {"merge", "warn", "drop", "error"}
    assert set(MERGE_RULES) == {"nearest-centroid", "adjacent", "pool"}
    with pytest.raises(MmkitError, match="did you mean 'merge'"):
        apply_small_groups(_labels(4), 2, "marge")


@pytest.mark.parametrize("policy", ["drop", "warn"])
def test_drop_reports_exact_counts(caplog, policy):
    labels = np.concatenate([_labels(10, 7, 3, 2), [-1, -1]])
    with caplog.at_level(logging.WARNING, logger="mmkit"):
        out = apply_small_groups(labels, 4, policy)
    assert "group 2 (3 examples), group 3 (2 examples); 5 examples dropped" in caplog.text
    assert out.report == {"U": 4, "policy": policy, "groups": {2: 3, 3: 2}, "examples": 5}
    assert out.dropped == {2: 3, 3: 2} and out.merged_from == [[0], [1]] and out.names == ["0", "1"]
    assert out.labels.tolist() == [0] * 10 + [1] * 7 + [-1] * 7
    sampler = GroupedBatchSampler(labels, 2, world_size=2, small_groups=policy)
    assert sampler.report["dropped_small"] == {2: 3, 3: 2} and sampler.report["small_groups"] == out.report


def test_merge_into_the_nearest_centroid():
    info = GroupInfo(["A", "B", "C"], centroids=np.array([[1, 0], [0, 1], [0.3, 1]]), kind="embedding")
    out = apply_small_groups(_labels(10, 10, 3), 5, "merge", info)
    assert out.merged_from == [[0], [1, 2]] and out.names == ["A", "B+C"]
    assert out.labels.tolist() == [0] * 10 + [1] * 13
    assert out.report == {"U": 5, "policy": "merge", "groups": {2: 3}, "examples": 0} and out.dropped == {}


def test_merged_centroid_is_the_size_weighted_mean():
    # S1 (1 row) joins S2 (4 rows); their mean centroid, weighted 4:1, sits nearer P than Q
    # (an unweighted mean would sit nearer Q), so the merged group then joins P.
    cents = np.array([_unit(0), _unit(90), _unit(35), _unit(58)])
    info = GroupInfo(["P", "Q", "S2", "S1"], centroids=cents, kind="embedding")
    out = apply_small_groups(_labels(30, 30, 4, 1), 6, "merge", info)
    assert out.merged_from == [[0, 2, 3], [1]] and out.names == ["P+S2+S1", "Q"]


def test_merge_smallest_first_ties_to_the_lower_id():
    info = GroupInfo(list("abc"), centroids=np.array([[1, 0], [1, 0.1], [1, 0.1]]), kind="embedding")
    # b and c (2 rows each, < U) tie on size: b, the lower id, is merged first, into its twin c.
    out = apply_small_groups(_labels(9, 2, 2), 4, "merge", info)
    assert out.merged_from == [[0], [1, 2]]


def test_length_merges_only_into_an_adjacent_bucket():
    # Bucket 2 is small; bucket 0 has the nearest median but is not adjacent.
    info = GroupInfo(["l0", "l1", "l2", "l3"], ordered=True, medians=[99, 10, 100, 300], kind="length")
    out = apply_small_groups(_labels(20, 20, 2, 20), 5, "merge", info)
    assert out.merged_from == [[0], [1, 2], [3]]
    # Equal distance to both neighbours: the lower bucket. An end bucket has one neighbour.
    tie = GroupInfo(["a", "b", "c"], ordered=True, medians=[10, 20, 30], kind="length")
    assert apply_small_groups(_labels(9, 2, 9), 4, "merge", tie).merged_from == [[0, 1], [2]]
    assert apply_small_groups(_labels(2, 9, 9), 4, "merge", tie).merged_from == [[0, 1], [2]]
    # Merged buckets stay contiguous ranges: the merged median is the size-weighted mean.
    chain = GroupInfo(list("abcd"), ordered=True, medians=[0, 40, 50, 100], kind="length")
    out = apply_small_groups(_labels(20, 1, 3, 20), 5, "merge", chain)
    assert out.merged_from == [[0, 1, 2], [3]]  # (3*50 + 1*40)/4 = 47.5 is nearer 0 than 100


def test_task_pools_small_groups(caplog):
    info = GroupInfo(["t0", "t1", "t2", "t3"])
    out = apply_small_groups(_labels(10, 2, 3, 1), 5, "merge", info)
    assert out.merged_from == [[0], [1, 2, 3]] and out.names == ["t0", POOLED_NAME]
    assert out.report == {"U": 5, "policy": "merge", "groups": {1: 2, 2: 3, 3: 1}, "examples": 0}
    with caplog.at_level(logging.WARNING, logger="mmkit"):
        still_small = apply_small_groups(_labels(10, 2, 1), 5, "merge", info)
    assert still_small.merged_from == [[0]] and still_small.dropped == {1: 2, 2: 1}
    assert "3 examples dropped" in caplog.text


def test_sampler_without_group_info_pools_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mmkit"):
        sampler = GroupedBatchSampler(_labels(10, 2, 3, 1), 5)
    assert "pooled 3 small groups" in caplog.text and POOLED_NAME in caplog.text
    assert sampler.names == ["0", POOLED_NAME] and sampler.merged_from == [[0], [1, 2, 3]]
    assert sorted(sampler.plan(0)[0].tolist()) == [0, 0, 1]


def test_error_names_the_small_groups():
    with pytest.raises(MmkitError, match=r"group 2 \(3 examples\)"):
        apply_small_groups(_labels(10, 7, 3), 4, "error")
    with pytest.raises(MmkitError, match="small_groups"):
        GroupedBatchSampler(_labels(10, 7, 3), 2, world_size=2, small_groups="error")
    assert apply_small_groups(_labels(10, 7), 4, "error").merged_from == [[0], [1]]


def test_group_info_from_summary(tmp_path):
    from safetensors.numpy import save_file

    groups = [{"id": i, "name": f"e0{i}", "size": 5, "length_tokens": None} for i in (1, 0, 2)]
    (tmp_path / "summary.json").write_text(json.dumps({"metric": "embedding", "groups": groups}))
    with pytest.raises(MmkitError, match="centroids"):
        GroupInfo.from_summary(tmp_path / "summary.json")
    cents = np.eye(3, 4, dtype=np.float32)
    save_file({"centroids": cents}, str(tmp_path / "centroids.safetensors"))
    info = GroupInfo.from_summary(tmp_path / "summary.json")
    assert info.names == ["e00", "e01", "e02"] and info.kind == "embedding" and not info.ordered
    assert np.array_equal(info.centroids, cents) and info.merge_rule == "nearest-centroid"

    lengths = [{"id": i, "name": f"len[{i}]", "size": 5,
                "length_tokens": {"min": 1, "median": m, "mean": m, "max": 9}} for i, m in enumerate([3, 7])]
    info = GroupInfo.from_summary({"metric": "length", "groups": lengths})
    assert info.ordered and info.medians.tolist() == [3, 7] and info.merge_rule == "adjacent"
    task = GroupInfo.from_summary({"metric": "task", "groups": [{"id": 0, "name": "qa", "length_tokens": None}]})
    assert task.merge_rule == "pool" and task.medians is None
    with pytest.raises(MmkitError, match="ids 0..K-1"):
        GroupInfo.from_summary({"metric": "task", "groups": [{"id": 1, "name": "x"}]})


def test_group_info_checks():
    with pytest.raises(MmkitError, match="medians"):
        GroupInfo(["a", "b"], ordered=True, kind="length")
    with pytest.raises(MmkitError, match="centroids of shape"):
        GroupInfo(["a", "b"], centroids=np.zeros((3, 2)))
    with pytest.raises(MmkitError, match="out of range"):
        apply_small_groups(_labels(4, 4, 4), 2, "merge", GroupInfo(["a", "b"]))


def test_sampler_merges_with_group_info():
    info = GroupInfo(["A", "B", "C"], centroids=np.array([[1, 0], [0, 1], [0.3, 1]]), kind="embedding")
    sampler = GroupedBatchSampler(_labels(10, 10, 3), 5, group_info=info, weights={0: 1, 1: 1, 2: 2})
    assert sampler.names == ["A", "B+C"] and sampler.weights == {0: 1.0, 1: 3.0}
    assert sampler.report["small_groups"]["groups"] == {2: 3} and sampler.report["dropped_small"] == {}
