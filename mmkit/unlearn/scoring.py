"""CLIP object scoring with patch windows (unlearn.md §2.3) and object labelling (§2.4).

Fine-grained image score: the image is cut into ``p``-pixel patches; every ``w x w``-patch window
(stride one patch, clipped at the border) is scored against ``"A photo containing <phrase>."`` as
``100 * cos``; a patch's score is the mean over the windows covering it; an object's score is the
mean of its ``k`` best patches. All windows of an image and all its prompts are encoded once
(batched) and combined as one ``[windows, objects]`` matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

PATCH = 48
WINDOW = 4
TOP_K = 4
PROMPT = "A photo containing {}."


@dataclass(frozen=True)
class Grid:
    """The patch grid of an ``H x W`` image and its windows' pixel boxes ``(left, top, right, bottom)``."""

    n_h: int
    n_w: int
    n_a: int
    n_b: int
    boxes: list[tuple[int, int, int, int]]


def window_grid(height: int, width: int, patch: int = PATCH, window: int = WINDOW) -> Grid | None:
    """§2.3: ``n_h = ceil(H/p)``, ``n_w = ceil(W/p)``; windows ``(a, b)`` for ``0 <= a <= n_h - w``,
    ``0 <= b <= n_w - w``, row-major, each box clipped at the image border. ``None`` when the grid
    is smaller than one window (the caller scores the whole image)."""
    n_h, n_w = math.ceil(height / patch), math.ceil(width / patch)
    if n_h < window or n_w < window:
        return None
    n_a, n_b = n_h - window + 1, n_w - window + 1
    span = window * patch
    boxes = [(b * patch, a * patch, min(b * patch + span, width), min(a * patch + span, height))
             for a in range(n_a) for b in range(n_b)]
    return Grid(n_h, n_w, n_a, n_b, boxes)


def patch_scores(window_scores: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """§2.3 ``P(i, j, o)``: mean of ``s(a, b, o)`` over the windows covering patch ``(i, j)``.

    ``window_scores`` is ``[n_a, n_b]`` or ``[n_a, n_b, O]``; the result has ``n_a + w - 1`` rows
    and ``n_b + w - 1`` columns (the patch grid).
    """
    s = np.asarray(window_scores, dtype=np.float64)
    squeeze = s.ndim == 2
    if squeeze:
        s = s[..., None]
    n_a, n_b, n_o = s.shape
    total = np.zeros((n_a + window - 1, n_b + window - 1, n_o))
    count = np.zeros((n_a + window - 1, n_b + window - 1, 1))
    for da in range(window):  # w^2 shifted adds, vectorised over windows and objects
        for db in range(window):
            total[da:da + n_a, db:db + n_b] += s
            count[da:da + n_a, db:db + n_b] += 1
    out = total / count
    return out[..., 0] if squeeze else out


def top_k_mean(patches: np.ndarray, k: int = TOP_K) -> np.ndarray | float:
    """§2.3 ``S(o)``: mean of the ``k`` largest patch scores per object (all of them if fewer);
    ``[n_h, n_w, O]`` gives ``[O]``, a single object's ``[n_h, n_w]`` a float."""
    p = np.asarray(patches, dtype=np.float64)
    flat = p.reshape(-1, p.shape[-1]) if p.ndim == 3 else p.reshape(-1, 1)
    k = min(k, flat.shape[0])
    best = -np.sort(-flat, axis=0)[:k]
    out = best.mean(axis=0)
    return out if p.ndim == 3 else float(out[0])


def label_object(score: float, t_hal: float = 23.0, t_real: float = 32.0) -> str | None:
    """§2.4: ``neg`` if ``S < t_hal``, ``pos`` if ``S > t_real``, else ``None`` (no sample)."""
    if score < t_hal:
        return "neg"
    if score > t_real:
        return "pos"
    return None


def is_sentence(scores: Sequence[float], t_hal: float = 23.0, t_sent: float = 27.5) -> bool:
    """§2.4: a response is a sentence sample when it has scored objects, every ``S > t_hal`` and
    the mean ``S > t_sent``."""
    return bool(scores) and all(s > t_hal for s in scores) and sum(scores) / len(scores) > t_sent


class ClipScorer:
    """Scores object phrases against an image with a CLIP-like model (§2.3), ``100 * cos``
    computed from L2-normalised features (never the model's ``logit_scale``)."""

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 64,
                 patch: int = PATCH, window: int = WINDOW, k: int = TOP_K, revision: str | None = None) -> None:
        from mmkit.core.models import load_model

        self.loaded = load_model(model, "dual-encoder", device=device, revision=revision)
        self.model = self.loaded.model.eval()
        self.processor = self.loaded.preprocessor
        self.batch_size, self.patch, self.window, self.k = batch_size, patch, window, k

    @property
    def id(self) -> str:
        return self.loaded.id

    def _device(self) -> Any:
        return next(self.model.parameters()).device

    def encode_texts(self, phrases: Sequence[str]):
        import torch

        from mmkit.core.embed import _features

        enc = self.processor.tokenizer([PROMPT.format(p) for p in phrases], padding=True,
                                       truncation=True, return_tensors="pt").to(self._device())
        feats = _features(self.model.get_text_features(input_ids=enc["input_ids"],
                                                       attention_mask=enc["attention_mask"])).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def encode_images(self, images: Sequence[Any]):
        import torch

        from mmkit.core.embed import _features

        dtype = next(self.model.parameters()).dtype
        parts = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor(images=list(images[start:start + self.batch_size]),
                                                    return_tensors="pt")["pixel_values"]
            parts.append(_features(self.model.get_image_features(
                pixel_values=pixels.to(self._device(), dtype))).float())
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1)

    def score(self, image: Any, phrases: Sequence[str]) -> tuple[np.ndarray, str]:
        """Scores ``S(o)`` of ``phrases`` on a PIL ``image`` and the mode, ``windows`` or ``whole``
        (an image with fewer than ``w`` patches on a side is scored as one window)."""
        import torch

        if not phrases:
            return np.zeros(0), "windows"
        grid = window_grid(image.height, image.width, self.patch, self.window)
        crops = [image] if grid is None else [image.crop(box) for box in grid.boxes]
        with torch.inference_mode():
            sims = 100.0 * self.encode_images(crops) @ self.encode_texts(phrases).T
        sims = sims.cpu().numpy().astype(np.float64)
        if grid is None:
            return sims[0], "whole"
        patches = patch_scores(sims.reshape(grid.n_a, grid.n_b, len(phrases)), self.window)
        return top_k_mean(patches, self.k), "windows"
