"""Tests of mmkit/core/imagetext.py: image-caption sets from JSONL and Karpathy JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmkit.core.imagetext import load_image_text
from mmkit.errors import MmkitError


def _image(path, color="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        _image(tmp_path / "img" / f"{i}.png")
    return tmp_path


def test_jsonl_paths_captions_and_text_to_image(folder):
    src = _jsonl(folder / "pairs.jsonl", [
        {"image": "img/0.png", "captions": [" a red dog ", "a cat"]},
        {"image": str(folder / "img" / "1.png"), "captions": ["one", "two", "three"]},
        {"image": "img/2.png", "captions": ["x"]},
    ])
    ds = load_image_text(str(src))
    assert ds.images == [folder / "img" / f"{i}.png" for i in range(3)]  # relative to the file's folder
    assert ds.captions == ["a red dog", "a cat", "one", "two", "three", "x"]  # stripped, image by image
    assert ds.text_to_image.dtype == np.int64
    assert ds.text_to_image.tolist() == [0, 0, 1, 1, 1, 2]
    assert ds.image_group is None and ds.text_group is None
    assert ds.data["n"] == 3 and ds.data["n_captions"] == 6 and len(ds.sha256) == 64
    rel = ds.relevance()
    assert rel.n_images == 3 and rel.text_to_image.tolist() == [0, 0, 1, 1, 1, 2]


def test_image_root_and_captions_per_image(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("ann")
    src = _jsonl(elsewhere / "pairs.jsonl", [{"image": "img/0.png", "captions": ["a", "b", "c"]},
                                             {"image": "img/1.png", "captions": ["d", "e"]}])
    ds = load_image_text(str(src), image_root=folder, captions_per_image=2)
    assert ds.images[0] == folder / "img" / "0.png"
    assert ds.captions == ["a", "b", "d", "e"] and ds.text_to_image.tolist() == [0, 0, 1, 1]
    with pytest.raises(MmkitError) as err:
        load_image_text(str(src), image_root=folder, captions_per_image=3)
    assert str(err.value).startswith(f"{src}:2: captions: has 2 caption(s), expected at least 3")


def test_missing_image_names_file_line_and_field(folder):
    src = _jsonl(folder / "pairs.jsonl", [{"image": "img/0.png", "captions": ["a"]},
                                          {"image": "img/missing.png", "captions": ["b"]}])
    with pytest.raises(MmkitError) as err:
        load_image_text(str(src))
    assert str(err.value).startswith(f"{src}:2: image: image file not found")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("record, field", [
    ({"image": "img/0.png", "captions": []}, "captions"),
    ({"image": "img/0.png", "captions": ["ok", "  "]}, "captions[1]"),
    ({"image": "img/0.png"}, "captions"),
])
def test_bad_captions(folder, record, field):
    src = _jsonl(folder / "pairs.jsonl", [record])
    with pytest.raises(MmkitError) as err:
        load_image_text(str(src))
    assert str(err.value).startswith(f"{src}:1: {field}: ")


def test_groups_become_codes_shared_by_captions(folder):
    src = _jsonl(folder / "pairs.jsonl", [
        {"image": "img/0.png", "captions": ["a", "b"], "group": "seven"},
        {"image": "img/1.png", "captions": ["c"], "group": "three"},
        {"image": "img/2.png", "captions": ["d"], "group": "seven"},
    ])
    ds = load_image_text(str(src))
    assert ds.image_group[0] == ds.image_group[2] != ds.image_group[1]
    assert ds.text_group.tolist() == [ds.image_group[0]] * 2 + [ds.image_group[1], ds.image_group[2]]
    partial = _jsonl(folder / "partial.jsonl", [{"image": "img/0.png", "captions": ["a"], "group": 1},
                                                {"image": "img/1.png", "captions": ["b"]}])
    with pytest.raises(MmkitError, match=r"partial.jsonl:2: group: "):
        load_image_text(str(partial))


def test_karpathy_json_split_filepath_and_sentences(folder):
    _image(folder / "val2014" / "a.jpg")
    doc = {"dataset": "coco", "images": [
        {"split": "train", "filepath": "img", "filename": "0.png", "sentences": [{"raw": "train caption"}]},
        {"split": "test", "filepath": "val2014", "filename": "a.jpg",
         "sentences": [{"raw": "first", "tokens": ["first"]}, {"raw": "second"}, {"raw": "third"}]},
        {"split": "test", "filepath": "img", "filename": "2.png", "sentences": [{"raw": "x"}, {"raw": "y"}]},
    ]}
    src = folder / "dataset_coco.json"
    src.write_text(json.dumps(doc))
    ds = load_image_text(str(src), split="test", captions_per_image=2)
    assert ds.images == [folder / "val2014" / "a.jpg", folder / "img" / "2.png"]
    assert ds.captions == ["first", "second", "x", "y"]
    assert ds.split == "test" and ds.data["split"] == "test"
    assert load_image_text(str(src), split="train").captions == ["train caption"]
    with pytest.raises(MmkitError, match=r"dataset_coco.json:images\[2\]: sentences: has 2 caption"):
        load_image_text(str(src), split="test", captions_per_image=3)
    with pytest.raises(MmkitError, match="no image records with split 'val'"):
        load_image_text(str(src), split="val")


def test_captions_per_image_must_be_positive_or_all(folder):
    src = _jsonl(folder / "pairs.jsonl", [{"image": "img/0.png", "captions": ["a"]}])
    for bad in (0, "five"):
        with pytest.raises(MmkitError, match="--captions-per-image"):
            load_image_text(str(src), captions_per_image=bad)
