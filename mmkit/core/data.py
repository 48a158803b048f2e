"""Shared data utilities: tokenisation into flat arrays, length-sorted batching, padding, images.

Nothing here imports torch at module import time; :func:`pad_batch` and :func:`pad_flat`
import it when called. Token ids are kept as one flat ``int32`` array plus per-sequence
offsets and lengths (:class:`TokenArrays`), which costs 4 bytes a token instead of a Python
list's ~36, and lets a padded batch be gathered with a few vectorised numpy operations.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmkit.errors import DataError, MmkitError

#: How many texts go to the tokenizer per call (bounds the tokenizer's temporary objects).
TOKENIZE_CHUNK = 8192


# --------------------------------------------------------------------------- batching


def length_sorted_batches(lengths: Sequence[int] | np.ndarray, batch_size: int,
                          descending: bool = True) -> list[np.ndarray]:
    """Index arrays of at most ``batch_size`` rows, ordered by length (stable: ties keep input order).

    Every index in ``range(len(lengths))`` appears in exactly one batch. ``descending=True``
    (longest first) puts the largest batch first, so an out-of-memory error shows up at once.
    """
    if batch_size < 1:
        raise MmkitError(f"batch size must be >= 1, got {batch_size}", field="batch_size")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    order = np.argsort(-lengths if descending else lengths, kind="stable")
    return np.split(order, np.arange(batch_size, len(order), batch_size))


def input_order_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Index arrays ``[0..b), [b..2b), ...`` (the unsorted baseline of :func:`length_sorted_batches`)."""
    if batch_size < 1:
        raise MmkitError(f"batch size must be >= 1, got {batch_size}", field="batch_size")
    if n == 0:
        return []
    return np.split(np.arange(n, dtype=np.int64), np.arange(batch_size, n, batch_size))


# --------------------------------------------------------------------------- tokens


@dataclass
class TokenArrays:
    """Variable-length token id sequences stored flat: sequence i is ``flat[offsets[i]:offsets[i] + lengths[i]]``."""

    flat: np.ndarray      # int32 [total tokens]
    offsets: np.ndarray   # int64 [n]
    lengths: np.ndarray   # int64 [n]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i] + self.lengths[i]]

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "TokenArrays":
        """Pack a list of token id lists (one pass, no per-token Python work)."""
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=total)
        offsets = np.zeros(len(seqs), dtype=np.int64)
        if len(seqs) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        return cls(flat, offsets, lengths)

    @classmethod
    def concat(cls, parts: Sequence["TokenArrays"]) -> "TokenArrays":
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        return cls(np.concatenate([p.flat for p in parts]), offsets, lengths)


def tokenize_flat(tokenizer: Any, texts: Sequence[str], *, max_length: int | None,
                  add_special_tokens: bool = True, chunk: int = TOKENIZE_CHUNK) -> TokenArrays:
    """Tokenise ``texts`` once, with truncation to ``max_length`` and no padding, into flat arrays.

    The tokenizer is called on lists of ``chunk`` texts (a fast tokenizer batches them in Rust).
    """
    parts = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[start:start + chunk]), add_special_tokens=add_special_tokens,
                        truncation=max_length is not None, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)
        parts.append(TokenArrays.from_lists(enc["input_ids"]))
    return TokenArrays.concat(parts)


def pad_flat(tokens: TokenArrays, rows: np.ndarray, pad_id: int, *, side: str = "right",
             as_torch: bool = True):
    """Gather ``rows`` of ``tokens`` into a padded ``[len(rows), max_len]`` batch.

    Returns ``(input_ids, attention_mask)`` as int64 torch tensors (numpy arrays if
    ``as_torch=False``). Fully vectorised: the boolean mask of real positions is filled in
    row-major order, which is exactly the order of the concatenated sequences.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lengths = tokens.lengths[rows]
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    cols = np.arange(width)
    if side == "right":
        mask = cols[None, :] < lengths[:, None]
    elif side == "left":
        mask = cols[None, :] >= (width - lengths)[:, None]
    else:
        raise MmkitError(f"padding side must be 'right' or 'left', got {side!r}", field="side")
    # Positions in `flat` of every real token, batch row by batch row.
    total = int(lengths.sum())
    starts = np.repeat(tokens.offsets[rows] - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    gather = starts + np.arange(total)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[mask] = tokens.flat[gather]
    att = mask.astype(np.int64)
    if not as_torch:
        return ids, att
    import torch

    return torch.from_numpy(ids), torch.from_numpy(att)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right", as_torch: bool = True):
    """Pad token id lists to one ``[B, max_len]`` batch: ``(input_ids LongTensor, attention_mask)``."""
    tokens = TokenArrays.from_lists(seqs)
    return pad_flat(tokens, np.arange(len(seqs)), pad_id, side=side, as_torch=as_torch)


# --------------------------------------------------------------------------- images


def load_image(image: Any, root: str | os.PathLike | None = None):
    """Open an image as an RGB ``PIL.Image``.

    Accepts a PIL image, a path (relative paths are taken under ``root``), raw bytes, or a
    ``datasets`` image dict (``{"bytes": ..., "path": ...}``, plus an optional ``"bbox": [x, y, w, h]``
    crop). A missing or unreadable file
    is a :class:`DataError` naming the file; URLs are refused (mmkit never downloads data
    implicitly: download the images and pass the local paths or ``--image-root``).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, dict):
        if image.get("bbox") is not None:  # {"path", "bbox": [x, y, w, h]}: a crop (evaluate.md §2.4)
            x, y, w, h = image["bbox"]
            return load_image({k: v for k, v in image.items() if k != "bbox"}, root).crop((x, y, x + w, y + h))
        if image.get("bytes"):
            return _open(io.BytesIO(image["bytes"]), str(image.get("path") or "<image bytes>"))
        if image.get("path"):
            return load_image(image["path"], root)
        raise DataError("an image dict needs 'bytes' or 'path'", field="image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(image)), "<image bytes>")
    if not isinstance(image, (str, os.PathLike)):
        raise DataError(f"expected an image path or a PIL image, got {type(image).__name__}", field="image")
    name = os.fspath(image)
    if name.lower().startswith(("http://", "https://", "ftp://", "s3://", "gs://")):
        raise DataError("images are read from local files only; download them first and pass the "
                        "local path (or set --image-root)", file=name, field="image")
    path = Path(name).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root).expanduser() / path
    if not path.is_file():
        where = f" (looked under {root})" if root is not None and not Path(name).is_absolute() else ""
        raise DataError(f"image file not found{where}", file=str(path), field="image")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read the image: {exc.strerror or exc}", file=str(path), field="image") from exc
    return _open(io.BytesIO(data), str(path))


def _open(buf: io.BytesIO, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(buf)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode the image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        file=name, field="image") from exc
    return img if img.mode == "RGB" else img.convert("RGB")


def tile_images(images: Sequence[Any], tile_size: int = 448):
    """One grid image for a single-image model (evaluate.md §2.4): ``cols = ceil(sqrt(n))``,
    ``rows = ceil(n / cols)``; each image letterboxed (aspect kept, white background) into a
    ``tile_size`` square, its 1-based index drawn top-left in white on a black box (PIL's default
    font). Sub-images are numbered left to right, top to bottom. ``images``: paths or PIL images."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise MmkitError("nothing to tile: no images", field="images")
    if tile_size < 1:
        raise MmkitError(f"tile size must be >= 1, got {tile_size}", field="tile_size")
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * tile_size, rows * tile_size), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, image in enumerate(images):
        img = load_image(image)
        scale = tile_size / max(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        x0, y0 = (i % cols) * tile_size, (i // cols) * tile_size
        grid.paste(img.resize((w, h), Image.Resampling.BICUBIC), (x0 + (tile_size - w) // 2, y0 + (tile_size - h) // 2))
        left, top, right, bottom = draw.textbbox((x0 + 2, y0 + 2), str(i + 1), font=font)
        draw.rectangle((x0, y0, right + 2, bottom + 2), fill="black")
        draw.text((x0 + 2, y0 + 2), str(i + 1), fill="white", font=font)
    return grid
