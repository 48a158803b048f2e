"""Image-caption sets for retrieval (evaluate retrieval, distill dcd): load, check, index.

Three inputs give the same :class:`ImageTextSet`:

- mmkit JSONL (or a JSON array, parquet, an HF folder): one record per image,
  ``{"image": PATH, "captions": [str, ...], "group": optional}``; file order is evaluation order.
- a Karpathy-split JSON (``{"images": [{"split", "filename", "filepath"?, "sentences": [{"raw"}]}]}``),
  keeping the records whose ``split`` equals ``split``.
- a hub dataset id, read through :func:`mmkit.io.read_records` with a field mapping onto
  ``image`` / ``captions`` / ``group``.

Relative image paths resolve under ``image_root``, else under the annotation file's folder.
Captions are stripped; ``captions_per_image`` keeps the first k of each image (``"all"``: every
one), and an image with fewer is an error. Relevance is ``text_to_image`` (caption -> its image);
with ``group`` on the records, a caption is relevant to every image of its group (evaluate.md §6).
Numpy only: importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from mmkit.errors import DataError, MmkitError
from mmkit.io import Record, detect_format, fingerprint, read_records

#: The record fields an image-caption set uses; a hub dataset maps its own names onto these.
FIELDS = ("image", "captions", "group")


@dataclass
class ImageTextSet:
    """Images, their captions (flat, image by image) and who is relevant to whom."""

    images: list[Any]                 # Path for files; a PIL image / bytes dict from a hub dataset
    captions: list[str]
    text_to_image: np.ndarray         # int64 [N_t]: the image each caption describes
    image_group: np.ndarray | None    # int64 [N_i] group codes, or None
    text_group: np.ndarray | None     # int64 [N_t] group codes, or None
    source: str
    data: dict[str, Any] = field(default_factory=dict)   # results.json "data" entry (path, sha256, n)
    captions_per_image: int | None = None                # None: "all"
    split: str | None = None

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_texts(self) -> int:
        return len(self.captions)

    @property
    def sha256(self) -> str | None:
        """sha256 of the annotation file (None for a hub dataset, identified by its fingerprint)."""
        return self.data.get("sha256")

    def relevance(self):
        """The :class:`mmkit.core.ranking.Relevance` of this set (imports torch)."""
        from mmkit.core.ranking import Relevance

        return Relevance.build(self.text_to_image, self.n_images, self.image_group, self.text_group,
                               source=self.source)


def load_image_text(
    source: str,
    *,
    image_root: str | os.PathLike | None = None,
    split: str = "test",
    captions_per_image: int | str = "all",
    fields: Mapping[str, str] | None = None,
    revision: str | None = None,
    check_images: bool = True,
) -> ImageTextSet:
    """Load an image-caption set from a JSONL/JSON file, a Karpathy JSON or a hub dataset id.

    ``fields`` maps our names (``image``, ``captions``, ``group``) to the source's. A missing
    image file (``check_images``) or an image with fewer than ``captions_per_image`` captions
    is a :class:`DataError` naming the file, line (``images[k]`` for Karpathy JSON) and field.
    """
    keep = _captions_per_image(captions_per_image)
    fmt = detect_format(source)
    karpathy = fmt == "json" and _is_karpathy(source)
    is_file = fmt not in ("hub", "builtin") and Path(source).expanduser().is_file()
    base = Path(image_root).expanduser() if image_root is not None else (
        Path(source).expanduser().parent if is_file else None)
    if image_root is not None and not base.is_dir():
        raise DataError("no such image folder", file=str(image_root), field="--image-root")
    if karpathy:
        rows: Iterator[Record] = _karpathy_records(source, split)
        names = {"image": "filename", "captions": "sentences", "group": "group"}
    else:
        names = {k: (fields or {}).get(k, k) for k in FIELDS}
        rows = read_records(source, fields={k: v for k, v in names.items() if k != v},
                            required=("image", "captions"), split=split, revision=revision)
    images: list[Any] = []
    per_image: list[list[str]] = []
    groups: list[Any] = []
    for rec in rows:
        images.append(_image(rec, names["image"], base, check_images))
        per_image.append(_captions(rec, names["captions"], keep))
        groups.append(rec.get("group"))
        if (groups[-1] is None) != (groups[0] is None):
            raise rec.error(names["group"], "set on some records and not on others; give every "
                            "record a group or none")
    if not images:
        where = f" with split {split!r}" if karpathy else ""
        raise DataError(f"no image records{where}", file=source, field="images")
    counts = np.fromiter(map(len, per_image), dtype=np.int64, count=len(per_image))
    text_to_image = np.repeat(np.arange(len(images), dtype=np.int64), counts)
    image_group = text_group = None
    if groups[0] is not None:
        _, image_group = np.unique(np.array([str(g) for g in groups]), return_inverse=True)
        image_group = image_group.astype(np.int64)
        text_group = image_group[text_to_image]
    captions = [c for caps in per_image for c in caps]
    data = fingerprint(source, len(images), revision)
    data.update(n_captions=len(captions), captions_per_image=keep if keep is not None else "all")
    used_split = split if karpathy or fmt in ("hub", "hf") else None
    if used_split is not None:
        data["split"] = used_split
    return ImageTextSet(images, captions, text_to_image, image_group, text_group, source, data, keep, used_split)


def _captions_per_image(value: int | str) -> int | None:
    """``"all"`` -> None (keep every caption); a positive int (or its string) -> that int."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    try:
        keep = int(value)
    except (TypeError, ValueError):
        raise MmkitError(f"expected a positive integer or 'all', got {value!r}",
                         field="--captions-per-image") from None
    if keep < 1:
        raise MmkitError(f"expected a positive integer or 'all', got {value!r}", field="--captions-per-image")
    return keep


def _image(rec: Record, name: str, base: Path | None, check: bool) -> Any:
    value = rec.get("image")
    if isinstance(value, str) and not value.strip():
        raise rec.error(name, "expected an image path, got an empty string")
    if not isinstance(value, (str, os.PathLike)):
        return value  # a decoded hub image (PIL) or a {"bytes", "path"} dict: load_image handles it
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if check and not path.is_file():
        raise rec.error(name, f"image file not found: {path}")
    return path


def _captions(rec: Record, name: str, keep: int | None) -> list[str]:
    value = rec.get("captions")
    if not isinstance(value, (list, tuple)) or not value:
        raise rec.error(name, f"expected a non-empty list of caption strings, got {type(value).__name__}")
    out = []
    for j, caption in enumerate(value):
        if not isinstance(caption, str) or not caption.strip():
            raise rec.error(f"{name}[{j}]", "expected a non-empty string")
        out.append(caption.strip())
    if keep is not None:
        if len(out) < keep:
            raise rec.error(name, f"has {len(out)} caption(s), expected at least {keep} "
                            "(--captions-per-image)")
        out = out[:keep]
    return out


# --------------------------------------------------------------------------- Karpathy JSON


def _is_karpathy(source: str) -> bool:
    """A JSON object with an ``images`` list (not a JSON array of records)."""
    with open(Path(source).expanduser(), encoding="utf-8") as fh:
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
    return head == "{"


def _karpathy_records(source: str, split: str) -> Iterator[Record]:
    """The Karpathy records of ``split`` as ``{image, captions}`` records located at ``images[k]``."""
    try:
        doc = json.loads(Path(source).expanduser().read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON ({exc.msg})", file=source, line=exc.lineno, field="json") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DataError("expected a Karpathy-split JSON object with an 'images' list", file=source,
                        field="images")
    for k, entry in enumerate(images):
        rec = Record(entry if isinstance(entry, dict) else {}, source, f"images[{k}]")
        if not isinstance(entry, dict):
            raise rec.error("images", "expected an object")
        if rec.require("split") != split:
            continue
        filename = rec.require("filename")
        sentences = rec.require("sentences", list)
        raws = []
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise rec.error(f"sentences[{j}].raw", "expected a string")
            raws.append(sentence["raw"])
        path = Path(rec["filepath"]) / filename if rec.get("filepath") else Path(filename)
        yield Record({"image": str(path), "captions": raws}, source, rec.loc)
