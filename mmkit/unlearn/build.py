"""EFUF data construction (unlearn.md §2): images -> responses -> scored objects -> samples.

Every stage reads and writes plain records (``responses.jsonl``, ``objects.jsonl``,
``samples.jsonl``, §6) so a user can inspect or supply any of them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mmkit.errors import DataError
from mmkit.io import Record, read_records
from mmkit.progress import Progress
from mmkit.unlearn.objects import Extractor
from mmkit.unlearn.samples import INSTRUCTION, Sample
from mmkit.unlearn.scoring import is_sentence, label_object

log = logging.getLogger("mmkit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
#: Clause boundaries of §2.5: runs of these characters.
_CLAUSE_BREAK = re.compile(r"[,.;!?:]+")
_TRAILING_DIGITS = re.compile(r"(\d+)$")


@dataclass
class Thresholds:
    """§2.4 labelling thresholds (ViT-B/32 calibration)."""

    t_hal: float = 23.0
    t_real: float = 32.0
    t_sent: float = 27.5


def list_images(root: str) -> list[str]:
    """Image files under ``root`` (recursive), as paths relative to it, sorted."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError("no such image folder", file=root, field="--images")
    found = sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder", file=root, field="--images")
    return found


def image_id_of(image: str) -> str:
    """COCO image id = trailing digits of the file stem without leading zeros, else the stem."""
    stem = Path(image).stem
    m = _TRAILING_DIGITS.search(stem)
    return str(int(m.group(1))) if m else stem


# --------------------------------------------------------------------------- responses (§2.1)


def response_records(images: Sequence[str], answers: Sequence[Sequence[str]], model: str,
                     instruction: str = INSTRUCTION) -> tuple[list[dict[str, Any]], int]:
    """``responses.jsonl`` lines for ``answers[i]`` (the responses to ``images[i]``); newlines
    become single spaces and empty responses are dropped. Returns the lines and the drop count."""
    out, empty = [], 0
    for image, texts in zip(images, answers):
        image_id = image_id_of(image)
        for j, text in enumerate(texts):
            clean = " ".join(text.split())
            if not clean:
                empty += 1
                continue
            out.append({"response_id": f"{image_id}-{j}", "image_id": image_id, "image": image,
                        "instruction": instruction, "response": clean, "model": model})
    return out, empty


def read_responses(path: str) -> list[Record]:
    """``responses.jsonl`` (§6): ``image`` and ``response`` required; ids default from the image."""
    records = []
    for rec in read_records(path, format="jsonl"):
        rec.require("image")
        rec.require("response")
        rec.setdefault("image_id", image_id_of(rec["image"]))
        rec["image_id"] = str(rec["image_id"])
        rec.setdefault("response_id", f"{rec['image_id']}-{rec.loc}")
        rec.setdefault("instruction", INSTRUCTION)
        records.append(rec)
    if not records:
        raise DataError("no responses in the file", file=path)
    return records


# --------------------------------------------------------------------------- objects (§2.2, §2.3)


Scorer = Callable[[Any, Sequence[str]], tuple[Sequence[float], str]]


def score_objects(responses: Sequence[Mapping[str, Any]], extractor: Extractor, scorer: Scorer,
                  load_image: Callable[[str], Any], scorer_id: str) -> tuple[list[dict[str, Any]], int]:
    """``objects.jsonl`` lines: every response's object spans with their CLIP scores. Each image
    is opened once for all its responses. Returns the lines and the number of dropped phrases."""
    extracted = extractor(responses)
    dropped = sum(d for _, d in extracted)
    out: list[dict[str, Any]] = []
    cached: tuple[str, Any] | None = None
    with Progress(len(responses), "scoring objects") as bar:
        for rec, (spans, _) in zip(responses, extracted):
            if cached is None or cached[0] != rec["image"]:
                cached = (rec["image"], load_image(rec["image"]))
            scores, mode = scorer(cached[1], [s.phrase for s in spans])
            out.append({"response_id": rec["response_id"], "image_id": rec["image_id"], "image": rec["image"],
                        "score_mode": mode, "scorer": scorer_id,
                        "objects": [{"phrase": s.phrase, "start": s.start, "end": s.end, "score": round(float(v), 4)}
                                    for s, v in zip(spans, scores)]})
            bar.update(1)
    return out, dropped


# --------------------------------------------------------------------------- samples (§2.4-2.6)


def clause_span(text: str, position: int) -> tuple[int, int]:
    """§2.5: the clause ``[c0, c1)`` holding ``position``; clauses are separated by runs of
    ``, . ; ! ? :`` (``c0`` is just after the preceding run, ``c1`` at the next run or the end)."""
    c0, c1 = 0, len(text)
    for m in _CLAUSE_BREAK.finditer(text):
        if m.end() <= position:
            c0 = m.end()
        elif m.start() > position:
            c1 = m.start()
            break
    return c0, c1


def build_samples(response: Mapping[str, Any], objects: Mapping[str, Any],
                  thresholds: Thresholds) -> tuple[list[Sample], int]:
    """Samples of one response: a ``pos``/``neg`` fragment per labelled object (its first
    mention's clause, the text before it as context) and a ``sent`` sample when every object
    looks real. Returns the samples and the number of objects left unlabelled."""
    text = response["response"]
    common = {"image": response["image"], "image_id": response["image_id"],
              "response_id": response["response_id"], "instruction": response.get("instruction") or INSTRUCTION}
    samples, ignored = [], 0
    scores = [float(o["score"]) for o in objects["objects"]]
    for j, obj in enumerate(objects["objects"]):
        kind = label_object(float(obj["score"]), thresholds.t_hal, thresholds.t_real)
        if kind is None:
            ignored += 1
            continue
        c0, c1 = clause_span(text, int(obj["start"]))
        samples.append(Sample(id=f"{response['response_id']}-{kind}-{j}", context=text[:c0], target=text[c0:c1],
                              kind=kind, object=obj["phrase"], score=float(obj["score"]), **common))
    if is_sentence(scores, thresholds.t_hal, thresholds.t_sent):
        samples.append(Sample(id=f"{response['response_id']}-sent", context="", target=text, kind="sent",
                              score=sum(scores) / len(scores), min_score=min(scores), **common))
    return samples, ignored


def samples_from_objects(responses: Sequence[Mapping[str, Any]], objects: Sequence[Mapping[str, Any]],
                         thresholds: Thresholds) -> tuple[list[Sample], int]:
    """Every response's samples (objects matched by ``response_id``) and the unlabelled count."""
    by_id = {o["response_id"]: o for o in objects}
    samples, ignored = [], 0
    for rec in responses:
        got, n = build_samples(rec, by_id[rec["response_id"]], thresholds)
        samples += got
        ignored += n
    return samples, ignored
