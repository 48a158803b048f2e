"""Tests for mmkit/unlearn/build.py (unlearn.md §2.1, §2.4-§2.6, §8 item 9)."""

from __future__ import annotations

import pytest
from PIL import Image

from mmkit.errors import DataError
from mmkit.unlearn.build import (Thresholds, build_samples, clause_span, image_id_of, list_images,
                                 response_records, score_objects)
from mmkit.unlearn.objects import ExtractConfig, get_extractor

EXAMPLE = "A dog lies on a sofa, next to a cat."


def _response(text: str) -> dict:
    return {"response_id": "123456-0", "image_id": "123456", "image": "x.jpg", "response": text,
            "instruction": "Please describe the image."}


def _objects(*objs: tuple[str, int, float]) -> dict:
    return {"objects": [{"phrase": p, "start": s, "end": s + len(p), "score": v} for p, s, v in objs]}


def test_spec_example_negative_fragment():
    samples, ignored = build_samples(_response(EXAMPLE), _objects(("cat", 32, 18.0)), Thresholds())
    assert ignored == 0 and len(samples) == 1
    s = samples[0]
    assert (s.context, s.target, s.kind, s.object, s.score) == ("A dog lies on a sofa,", " next to a cat", "neg", "cat", 18.0)
    assert s.id == "123456-0-neg-0" and s.image_id == "123456"


def test_object_in_first_clause_has_empty_context():
    samples, _ = build_samples(_response(EXAMPLE), _objects(("dog", 2, 35.0)), Thresholds())
    assert (samples[0].context, samples[0].target, samples[0].kind) == ("", "A dog lies on a sofa", "pos")


def test_punctuation_runs_and_no_punctuation():
    assert clause_span("A dog,, a cat!? and a bird", 8) == (7, 13)
    text = "a dog next to a cat"
    assert clause_span(text, 16) == (0, len(text))


@pytest.mark.parametrize("score", [23.0, 32.0, 27.0])
def test_scores_at_the_thresholds_are_ignored(score):
    samples, ignored = build_samples(_response(EXAMPLE), _objects(("cat", 32, score)), Thresholds())
    assert ignored == 1 and [s.kind for s in samples] == (["sent"] if score > 27.5 else [])


def test_sentence_sample():
    samples, _ = build_samples(_response(EXAMPLE), _objects(("dog", 2, 24.0), ("sofa", 16, 33.0)), Thresholds())
    sent = [s for s in samples if s.kind == "sent"]
    assert [s.kind for s in samples] == ["pos", "sent"]
    assert (sent[0].context, sent[0].target, sent[0].score, sent[0].min_score) == ("", EXAMPLE, 28.5, 24.0)
    no_sent, _ = build_samples(_response(EXAMPLE), _objects(("dog", 2, 24.0), ("sofa", 16, 31.0)), Thresholds())
    assert [s.kind for s in no_sent] == []


def test_repeated_object_uses_its_first_mention():
    text = "A dog runs. The dog, a brown one, sleeps."
    extract = get_extractor("vocab", ExtractConfig())
    (spans, _), = extract([{"response": text}])
    objs = {"objects": [{"phrase": s.phrase, "start": s.start, "end": s.end, "score": 10.0} for s in spans]}
    samples, _ = build_samples(_response(text), objs, Thresholds())
    assert [(s.context, s.target) for s in samples] == [("", "A dog runs")]


def test_response_records_clean_and_drop_empty():
    records, empty = response_records(["COCO_val2014_000000123456.jpg", "b/x.png"],
                                      [["A dog\n\non a  sofa.", "   "], ["Cat."]], "m")
    assert empty == 1
    assert records[0] == {"response_id": "123456-0", "image_id": "123456", "image": "COCO_val2014_000000123456.jpg",
                          "instruction": "Please describe the image.", "response": "A dog on a sofa.", "model": "m"}
    assert records[1]["image_id"] == "x" and records[1]["response_id"] == "x-0"
    assert image_id_of("img_007.jpg") == "7"


def test_list_images_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/z.png", "a.JPG", "c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert list_images(str(tmp_path)) == ["a.JPG", "b/z.png", "c.webp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(str(tmp_path / "empty"))


def test_score_objects_opens_each_image_once():
    opened = []

    def load(name):
        opened.append(name)
        return Image.new("RGB", (10, 10))

    responses = [dict(_response("A dog."), response_id="1-0"), dict(_response("A cat and a dog."), response_id="1-1")]
    out, dropped = score_objects(responses, get_extractor("vocab", ExtractConfig()),
                                 lambda im, phrases: ([float(len(p)) for p in phrases], "whole"), load, "clip")
    assert opened == ["x.jpg"] and dropped == 0
    assert out[1]["objects"] == [{"phrase": "cat", "start": 2, "end": 5, "score": 3.0},
                                 {"phrase": "dog", "start": 12, "end": 15, "score": 3.0}]
    assert out[1]["score_mode"] == "whole" and out[1]["scorer"] == "clip"
