"""Tests for mmkit/unlearn/scoring.py (unlearn.md §2.3-§2.4, §8 items 8 and 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.unlearn.scoring import ClipScorer, is_sentence, label_object, patch_scores, top_k_mean, window_grid


def test_window_grid_coco_image():
    grid = window_grid(480, 640)
    assert (grid.n_h, grid.n_w, grid.n_a, grid.n_b) == (10, 14, 7, 11)
    assert len(grid.boxes) == 77
    assert grid.boxes[0] == (0, 0, 192, 192)
    assert grid.boxes[1] == (48, 0, 240, 192)          # stride one patch, row-major
    assert grid.boxes[-1] == (480, 288, 640, 480)      # clipped at the border (160 px wide)


def test_window_grid_small_image_is_none():
    assert window_grid(144, 640) is None                # 3 patch rows < w = 4
    assert window_grid(145, 145) is not None            # ceil(145/48) = 4


def test_patch_scores_and_top_k_mean_on_crafted_windows():
    patches = patch_scores(np.array([[1.0, 2.0], [3.0, 4.0]]), window=2)
    np.testing.assert_allclose(patches, [[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 4]])
    assert top_k_mean(patches, 4) == pytest.approx(3.375)


def test_patch_scores_per_object_axis():
    s = np.stack([np.array([[1.0, 2.0], [3.0, 4.0]]), -np.array([[1.0, 2.0], [3.0, 4.0]])], axis=-1)
    p = patch_scores(s, window=2)
    assert p.shape == (3, 3, 2)
    # second object: the four largest of -P are -1, -1.5, -2, -2
    np.testing.assert_allclose(top_k_mean(p, 4), [3.375, -1.625])


def test_top_k_mean_with_fewer_patches_than_k():
    assert top_k_mean(np.array([[1.0, 3.0]]), 4) == pytest.approx(2.0)


@pytest.mark.parametrize("score,label", [(22.99, "neg"), (23.0, None), (27.0, None), (32.0, None), (32.01, "pos")])
def test_label_object_thresholds_are_strict(score, label):
    assert label_object(score) == label


def test_is_sentence_rule_is_strict():
    assert is_sentence([24.0, 32.0])
    assert not is_sentence([24.0, 31.0])      # mean exactly 27.5
    assert not is_sentence([23.0, 40.0])      # one object at exactly t_hal
    assert not is_sentence([])                # no scored object


@pytest.fixture(scope="module")
def scorer(tiny_clip):
    return ClipScorer(tiny_clip, device="cpu")


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_clip_scorer_windows_shape_range_and_logit_scale(scorer):
    image = _image(200, 250)
    scores, mode = scorer.score(image, ["dog", "a red car", "teddy bear"])
    assert mode == "windows" and scores.shape == (3,)
    assert np.all(np.abs(scores) <= 100)
    with torch.no_grad():
        scorer.model.logit_scale.fill_(0.123)
    again, _ = scorer.score(image, ["dog", "a red car", "teddy bear"])
    np.testing.assert_allclose(again, scores, rtol=1e-6)


def test_clip_scorer_whole_image_is_100_cos(scorer):
    image = _image(100, 80)
    scores, mode = scorer.score(image, ["dog", "cat"])
    assert mode == "whole"
    with torch.inference_mode():
        expected = 100 * (scorer.encode_images([image]) @ scorer.encode_texts(["dog", "cat"]).T)[0]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5)


def test_clip_scorer_windows_equal_manual_aggregation(scorer):
    image = _image(200, 200, seed=3)   # 5x5 patches -> 2x2 windows
    scores, _ = scorer.score(image, ["bus"])
    grid = window_grid(200, 200)
    with torch.inference_mode():
        s = 100 * (scorer.encode_images([image.crop(b) for b in grid.boxes]) @ scorer.encode_texts(["bus"]).T)
    expected = top_k_mean(patch_scores(s.numpy().reshape(2, 2)), 4)
    assert scores[0] == pytest.approx(expected, rel=1e-5)
