"""Indexed image sets, views, index files and the pruned-dataset writers (prune.md sections 2, 7, 8)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.errors import DataError
from mmkit.prune.data import (DataOptions, IndexedDataset, center_view, check_indices, load_image_set, map_labels,
                              random_shift, read_indices, stratified_split, write_pruned)


def _png(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    # byte order of class names: "B" < "a"; files by relative path inside a class
    for cls, files in {"a": ["z.png", "sub/b.png", "c.png"], "B": ["y.png", "x.png"]}.items():
        for k, name in enumerate(files):
            _png(root / cls / name, 20 * k)
    return root


def test_imagefolder_order_labels_and_ids(image_folder):
    data = load_image_set(str(image_folder), DataOptions(image_size=8))
    assert data.kind == "imagefolder"
    assert data.classes == ["B", "a"]
    assert data.ids == ["B/x.png", "B/y.png", "a/c.png", "a/sub/b.png", "a/z.png"]
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    i, x, y = IndexedDataset(data)[3]
    assert (i, y) == (3, 1) and tuple(x.shape) == (3, 8, 8)


def test_imagefolder_class_list_is_checked(image_folder):
    with pytest.raises(DataError, match="class folder 'B' is not in the class list"):
        load_image_set(str(image_folder), DataOptions(classes=["a", "c"]))


def test_fingerprint_is_the_dynamics_fingerprint(image_folder):
    import hashlib

    data = load_image_set(str(image_folder))
    h = hashlib.sha256()
    h.update(len(data).to_bytes(8, "little"))
    h.update(data.labels.astype("<i8").tobytes())
    h.update("\n".join(data.ids).encode())
    assert data.fingerprint == "sha256:" + h.hexdigest()


def _table(tmp_path: Path, fmt: str, rows: list[dict]) -> Path:
    path = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_table_labels_and_pruned_rows(tmp_path, fmt):
    for k in range(4):
        _png(tmp_path / "img" / f"{k}.png", 50 * k)
    rows = [{"path": f"img/{k}.png", "label": lab, "note": f"n{k}"} for k, lab in enumerate(["dog", "cat", "dog", "eel"])]
    data = load_image_set(str(_table(tmp_path, fmt, rows)))
    assert data.classes == ["cat", "dog", "eel"] and data.labels.tolist() == [1, 0, 1, 2]
    out = write_pruned(data, np.array([3, 0]), tmp_path / "pruned")
    written = (out / f"list.{fmt}").read_text().splitlines()
    if fmt == "csv":
        assert written == ["path,label,note", "img/0.png,dog,n0", "img/3.png,eel,n3"]
    else:
        assert [json.loads(x) for x in written] == [rows[0], rows[3]]


def test_table_errors_name_the_row(tmp_path):
    _png(tmp_path / "img" / "0.png", 0)
    path = _table(tmp_path, "jsonl", [{"path": "img/0.png", "label": 0}, {"path": "img/missing.png", "label": 1}])
    with pytest.raises(DataError) as err:
        load_image_set(str(path))
    assert "list.jsonl:2" in str(err.value) and "path" in str(err.value) and "not found" in str(err.value)
    path = _table(tmp_path, "jsonl", [{"path": "img/0.png", "label": "cat"}, {"path": "img/0.png", "label": "cow"}])
    with pytest.raises(DataError) as err:
        load_image_set(str(path), DataOptions(classes=["cat", "dog"]))
    assert "list.jsonl:2" in str(err.value) and "'cow' is not in the class list" in str(err.value)


def test_map_labels_rules():
    ids, classes = map_labels([2, 0, 2], None, "x", "label")
    assert ids.tolist() == [2, 0, 2] and classes == ["0", "1", "2"]
    ids, classes = map_labels(["1", "0"], ["zero", "one"], "x", "label")
    assert ids.tolist() == [1, 0]
    with pytest.raises(DataError, match="row 1"):
        map_labels([0, -1], None, "x", "label")
    with pytest.raises(DataError, match="soft or multi-label"):
        map_labels([[0.2, 0.8]], None, "x", "label")
    with pytest.raises(DataError, match="not in the class list"):
        map_labels([5], ["a", "b"], "x", "label")


def test_hf_dataset_round_trip(tmp_path):
    import datasets

    images = [Image.new("RGB", (10, 10), (v, v, v)) for v in (0, 60, 120, 180, 240)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 0, 1]}, features=feats).save_to_disk(
        str(tmp_path / "ds"))
    data = load_image_set(str(tmp_path / "ds"), DataOptions(image_size=8))
    assert data.kind == "hf" and data.classes == ["no", "yes"] and data.labels.tolist() == [0, 1, 1, 0, 1]
    out = write_pruned(data, np.array([4, 1]), tmp_path / "pruned")
    back = datasets.load_from_disk(str(out))
    assert back["label"] == [1, 1] and back.features["label"].names == ["no", "yes"]


def test_builtin_digits_split_and_pruned_npz(tmp_path):
    data = load_image_set("digits")
    assert len(data) == 1437 and len(data.test) == 360
    assert data.arrays.shape == (1437, 1, 8, 8) and 0.0 <= data.arrays.min() and data.arrays.max() <= 1.0
    # stratified: every class keeps its share within one example
    full = np.bincount(np.concatenate([data.labels, data.test.labels]))
    assert np.all(np.abs(np.bincount(data.test.labels) - full * 360 / 1797) <= 1)
    out = write_pruned(data, np.array([7, 2, 5]), tmp_path / "pruned")
    npz = np.load(out / "data.npz")
    assert npz["index"].tolist() == [2, 5, 7]
    np.testing.assert_array_equal(npz["x"], data.arrays[[2, 5, 7]])
    np.testing.assert_array_equal(npz["y"], data.labels[[2, 5, 7]])


def test_split_is_deterministic():
    labels = np.repeat(np.arange(4), 25)
    a, b = stratified_split(labels, 0.2), stratified_split(labels, 0.2)
    assert np.array_equal(a[0], b[0]) and len(a[1]) == 20
    assert sorted(np.concatenate(a).tolist()) == list(range(100))


def test_imagefolder_file_list_and_symlinks(image_folder, tmp_path):
    data = load_image_set(str(image_folder))
    out = write_pruned(data, np.array([0, 3]), tmp_path / "pruned", materialize="symlink")
    assert (out / "file_list.txt").read_text().splitlines() == ["/B/x.png 0", "/a/sub/b.png 1"]
    assert (out / "train" / "a" / "sub" / "b.png").is_symlink()
    # the reference-style list maps back to the same indices
    assert read_indices(out / "file_list.txt", data).tolist() == [0, 3]


def test_read_indices_forms(tmp_path):
    (tmp_path / "k.txt").write_text("3\n1\n")
    np.save(tmp_path / "k.npy", np.array([3, 1]))
    (tmp_path / "s.csv").write_text("index,score,kept\n0,0.1,0\n1,0.5,1\n3,0.9,1\n")
    for name in ("k.txt", "k.npy", "s.csv"):
        assert sorted(read_indices(tmp_path / name).tolist()) == [1, 3]
    (tmp_path / "bad.txt").write_text("1\nx\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        read_indices(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="outside"):
        check_indices(np.array([0, 9]), 5, "k.txt")
    with pytest.raises(DataError, match="more than once"):
        check_indices(np.array([1, 1]), 5, "k.txt")


def test_views():
    torch.manual_seed(0)
    x = torch.arange(16.0).reshape(1, 4, 4)
    shifted = random_shift(x, max_shift=2)
    assert shifted.shape == x.shape
    # a shift keeps a contiguous block of the original and fills the rest with zeros
    assert set(shifted[shifted != 0].tolist()) <= set(x.flatten().tolist())
    img = Image.new("RGB", (40, 20))
    assert center_view(img, 10).size == (10, 10)
