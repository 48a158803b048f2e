"""Shared data for the unlearn tests: four generated images and hand-written responses/samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZES = [(200, 200), (240, 200), (100, 80), (200, 250)]
RESPONSES = ["A dog lies on a sofa, next to a cat.", "A man rides a bike on the street. There is a car and a bus.",
             "Two dogs and a teddy bear sit on a bed.", "A woman holds an umbrella near a bench; a bird flies.",
             "The sofa is red."]
RESPONSE_IMAGES = [0, 1, 2, 3, 0]


def image_name(i: int) -> str:
    return f"COCO_val2014_{i:012d}.jpg"


def make_images(root: Path, first_id: int = 0) -> Path:
    """Four seeded noise images (one too small for patch windows), ids ``first_id``...``first_id + 3``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / image_name(first_id + i))
    return root


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def images(tmp_path) -> Path:
    return make_images(tmp_path / "imgs")


@pytest.fixture()
def responses_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "responses.jsonl",
                       [{"image": image_name(i), "response": r} for i, r in zip(RESPONSE_IMAGES, RESPONSES)])


@pytest.fixture()
def samples_file(images) -> str:
    """A hand-written samples file next to the images (relative image paths)."""
    recs = [{"id": "n1", "image": image_name(0), "context": "A dog lies on a sofa,", "target": " next to a cat",
             "kind": "neg", "object": "cat", "score": 18.0},
            {"id": "n2", "image": image_name(1), "context": "", "target": "A man rides a bike", "kind": "neg",
             "score": 20.0},
            {"id": "p1", "image": image_name(2), "context": "", "target": "Two dogs sit on a bed", "kind": "pos",
             "score": 35.0},
            {"id": "s1", "image": image_name(3), "context": "", "target": "A woman holds an umbrella.",
             "kind": "sent", "score": 30.0}]
    return write_jsonl(images / "samples.jsonl", recs)
