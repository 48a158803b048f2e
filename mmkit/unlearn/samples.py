"""The unlearning-sample schema (``samples.jsonl``, unlearn.md §6) and its reader.

``{"id", "image", "image_id", "response_id", "instruction", "context", "target", "kind",
"object", "score", "min_score"}``; ``kind`` is one of ``pos, neg, sent, replay``. Users may write
the file by hand: only ``image``, ``target`` and ``kind`` are required (``score`` too for
``--variant code``, except on replay samples).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from mmkit.errors import DataError
from mmkit.io import Record, read_records
from mmkit.unlearn.losses import KINDS

INSTRUCTION = "Please describe the image."


@dataclass
class Sample:
    """One unlearning sample: the loss sees ``target`` after ``prompt + " " + context``."""

    id: str
    image: str
    target: str
    kind: str
    context: str = ""
    instruction: str = INSTRUCTION
    image_id: str | None = None
    response_id: str | None = None
    object: str | None = None
    score: float | None = None
    min_score: float | None = None

    def record(self) -> dict[str, Any]:
        """The ``samples.jsonl`` line."""
        return asdict(self)


def _optional(rec: Record, name: str, types: type | tuple[type, ...]) -> Any:
    value = rec.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise rec.error(name, f"expected {want} or null, got {type(value).__name__}")
    return value


def parse_sample(rec: Record, image_root: Path, require_score: bool = False) -> Sample:
    """Check one record and resolve its image path under ``image_root``."""
    kind = rec.require("kind")
    if kind not in KINDS:
        raise rec.error("kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    target = rec.require("target")
    score = _optional(rec, "score", (int, float))
    if require_score and kind != "replay" and score is None:
        raise rec.error("score", f"--variant code needs a score on every {kind} sample")
    image = Path(rec.require("image")).expanduser()
    return Sample(
        id=str(rec.get("id") if rec.get("id") is not None else f"line{rec.loc}"),
        image=str(image if image.is_absolute() else image_root / image),
        target=target, kind=kind,
        context=_optional(rec, "context", str) or "",
        instruction=_optional(rec, "instruction", str) or INSTRUCTION,
        image_id=None if rec.get("image_id") is None else str(rec["image_id"]),
        response_id=None if rec.get("response_id") is None else str(rec["response_id"]),
        object=_optional(rec, "object", str),
        score=None if score is None else float(score),
        min_score=_optional(rec, "min_score", (int, float)),
    )


def read_samples(path: str, images: str | None = None, require_score: bool = False) -> list[Sample]:
    """Read ``samples.jsonl``; relative image paths resolve under ``images``, else next to the file."""
    root = Path(images).expanduser() if images else Path(path).expanduser().resolve().parent
    samples = [parse_sample(rec, root, require_score) for rec in read_records(path, format="jsonl")]
    if not samples:
        raise DataError("no samples in the file", file=path)
    return samples


def count_kinds(samples: Iterable[Sample]) -> dict[str, int]:
    """Samples per kind, every kind listed."""
    counts = dict.fromkeys(KINDS, 0)
    for s in samples:
        counts[s.kind] += 1
    return counts
