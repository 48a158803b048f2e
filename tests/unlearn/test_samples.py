"""Tests for mmkit/unlearn/samples.py (unlearn.md §6 samples schema)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkit.errors import DataError
from mmkit.unlearn.samples import count_kinds, read_samples


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


GOOD = {"id": "1-0-neg-2", "image": "a.jpg", "context": "A dog,", "target": " a cat", "kind": "neg", "score": 18.4}


def test_read_samples_resolves_images_next_to_the_file_or_under_images(tmp_path):
    path = _write(tmp_path / "s.jsonl", [GOOD, {"image": "/abs/b.jpg", "target": "Hi.", "kind": "sent"}])
    samples = read_samples(path)
    assert samples[0].image == str(tmp_path.resolve() / "a.jpg") and samples[0].score == 18.4
    assert samples[1].image == "/abs/b.jpg" and samples[1].context == "" and samples[1].id == "line2"
    assert samples[1].instruction == "Please describe the image."
    assert read_samples(path, images="/imgs")[0].image == "/imgs/a.jpg"
    assert count_kinds(samples) == {"pos": 0, "neg": 1, "sent": 1, "replay": 0}


@pytest.mark.parametrize("change,match", [
    ({"kind": None}, r"s\.jsonl:2: kind: missing field"),
    ({"kind": "negative"}, r"s\.jsonl:2: kind: expected one of pos, neg, sent, replay, got 'negative'"),
    ({"target": ""}, r"s\.jsonl:2: target: expected a non-empty value"),
    ({"score": "high"}, r"s\.jsonl:2: score: expected int or float or null"),
])
def test_bad_records_name_file_line_and_field(tmp_path, change, match):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = _write(tmp_path / "s.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=match):
        read_samples(path)


def test_code_variant_requires_scores_except_replay(tmp_path):
    path = _write(tmp_path / "s.jsonl", [{"image": "a.jpg", "target": "x", "kind": "replay"},
                                         {"image": "a.jpg", "target": "x", "kind": "pos"}])
    with pytest.raises(DataError, match=r"s\.jsonl:2: score: --variant code needs a score"):
        read_samples(path, require_score=True)
    assert len(read_samples(path)) == 2


def test_empty_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no samples"):
        read_samples(str(path))
