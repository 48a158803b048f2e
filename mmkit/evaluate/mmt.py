"""``mmkit evaluate mmt``: English→Chinese multimodal translation on the 3AM layout (evaluate.md §7).

Two routes. ``--hyp FILE --ref FILE`` scores translations made elsewhere (``score_direct``, no
model). Otherwise ``load`` reads the line-aligned ``{split}.en``, ``{split}.zh`` and
``images-{split}.txt`` that ``build-dataset ambiguous-mmt`` writes or imports (build.md §3), a
model translates each English caption with its image, and ``score`` compares the outputs with
``{split}.zh``. Metrics ×100: corpus BLEU (sacrebleu, ``tok:zh``, lowercased) with its signature
and exact-match METEOR (:mod:`mmkit.evaluate.metrics.text`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from mmkit.errors import ConfigError, DataError
from mmkit.evaluate.base import EvalConfig, Loaded, Request
from mmkit.evaluate.metrics.text import corpus_bleu, corpus_meteor
from mmkit.io import sha256_file

#: The project's translation instruction (precedes a newline and the English text).
INSTRUCTION = "Translate the following English sentence into Chinese. Output only the translation."


@dataclass
class MMTConfig(EvalConfig):
    """``mmkit evaluate mmt`` options: the 3AM split and image root, or ``--hyp/--ref`` files."""

    split: str = "test"
    image_root: Optional[str] = None  # default: <data>/images
    hyp: Optional[str] = None
    ref: Optional[str] = None


@dataclass(frozen=True)
class Segment:
    """One line of the split: ``uid = {split}:{line}`` (1-based); ``hypothesis`` only with ``--hyp``."""

    uid: str
    reference: str
    source: Optional[str] = None
    image: Optional[str] = None
    hypothesis: Optional[str] = None


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (LF or CRLF; a final newline is optional)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such file", file=str(path)) from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise DataError("not UTF-8 text", file=str(path), line=line) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def aligned_lines(*paths: str | Path) -> list[list[str]]:
    """The lines of line-aligned files; unequal counts are an error naming the shorter file, its
    first missing line and the longer file."""
    texts = [read_lines(p) for p in paths]
    longest = max(range(len(paths)), key=lambda i: len(texts[i]))
    for path, lines in zip(paths, texts):
        if len(lines) < len(texts[longest]):
            raise DataError(f"missing: it has {len(lines)} lines but {paths[longest]} has {len(texts[longest])}; "
                            "the files must be line-aligned", file=str(path), line=len(lines) + 1, field="lines")
    if not texts[0]:
        raise DataError("no lines", file=str(paths[0]))
    return texts


def _files_sha256(paths: list[Path]) -> str:
    """SHA-256 over (file name, file sha256) of the split's files, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.name}\x1f{sha256_file(p)}\x1e".encode())
    return h.hexdigest()


def _load_direct(cfg: MMTConfig) -> Loaded:
    if not (cfg.hyp and cfg.ref):
        raise ConfigError("--hyp and --ref go together: the translations and their references",
                          field="--ref" if cfg.hyp else "--hyp")
    if cfg.data:
        raise ConfigError("--hyp/--ref score files without a model; drop --data (or drop --hyp/--ref)",
                          field="--data")
    hyps, refs = aligned_lines(cfg.hyp, cfg.ref)
    records = [Segment(uid=f"{i}", reference=r, hypothesis=h) for i, (h, r) in enumerate(zip(hyps, refs), 1)]
    return Loaded(records=records, path=str(cfg.ref), sha256=sha256_file(Path(cfg.ref).expanduser()))


def load(cfg: MMTConfig) -> Loaded:
    """The segments to score: ``--hyp/--ref`` pairs, or the 3AM split under ``--data`` (build.md §3)
    with images under ``--image-root`` (default ``<data>/images``); ``cfg.limit`` keeps the first N."""
    if cfg.hyp or cfg.ref:
        loaded = _load_direct(cfg)
    else:
        if not cfg.data:
            raise ConfigError("give --data (a 3AM folder with {split}.en, {split}.zh, images-{split}.txt) "
                              "or --hyp and --ref", field="--data")
        folder = Path(cfg.data).expanduser()
        if not folder.is_dir():
            raise DataError("expected a folder holding {split}.en, {split}.zh and images-{split}.txt",
                            file=cfg.data, field="--data")
        files = [folder / f"{cfg.split}.en", folder / f"{cfg.split}.zh", folder / f"images-{cfg.split}.txt"]
        en, zh, images = aligned_lines(*files)
        root = Path(cfg.image_root).expanduser() if cfg.image_root else folder / "images"
        records = [Segment(uid=f"{cfg.split}:{i}", reference=r, source=s, image=str(root / img.strip()))
                   for i, (s, r, img) in enumerate(zip(en, zh, images), 1)]
        if not cfg.predictions:
            missing = next(((i, s.image) for i, s in enumerate(records, 1) if not Path(s.image).is_file()), None)
            if missing is not None:
                raise DataError(f"image file not found: {missing[1]}", file=str(files[2]), line=missing[0],
                                field="image")
        loaded = Loaded(records=records, path=str(folder), sha256=_files_sha256(files))
    if cfg.limit is not None:
        loaded.records = loaded.records[:cfg.limit]
    return loaded


def prompt(data: Loaded, cfg: MMTConfig) -> list[Request]:
    """One request per segment: the image, then the instruction, a newline and the English text."""
    return [Request(uid=s.uid, text=f"{INSTRUCTION}\n{s.source}", images=(s.image,)) for s in data.records]


def parse(text: str, request: Optional[Request] = None) -> str:
    """The translation in a model's output: stripped and cut at its first newline (§7)."""
    return text.strip().split("\n", 1)[0]


def _metrics(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    bleu, signature = corpus_bleu(hypotheses, references)
    return {"bleu": bleu, "meteor": corpus_meteor(hypotheses, references), "bleu_signature": signature}


def score(data: Loaded, answers: Mapping[str, Mapping[str, Any]], cfg: MMTConfig) -> dict[str, Any]:
    """Corpus BLEU and METEOR of the model's translations; a missing or failed answer is scored as
    an empty translation (with a warning)."""
    hyps, failed = [], 0
    for s in data.records:
        line = answers.get(s.uid)
        ok = line is not None and line.get("error") is None
        failed += not ok
        hyps.append(parse(str(line.get("prediction") or "")) if ok else "")
    warnings = [f"{failed} of {data.n} segments have no translation; scored as empty"] if failed else []
    return {"metrics": _metrics(hyps, [s.reference for s in data.records]), "per_category": {},
            "anomalies": [], "warnings": warnings}


def score_direct(data: Loaded, cfg: MMTConfig) -> Optional[dict[str, Any]]:
    """Score ``--hyp`` against ``--ref`` without a model (each hypothesis becomes a predictions.jsonl
    line, uid = its 1-based line number); ``None`` on the generation route."""
    if not cfg.hyp:
        return None
    return {"metrics": _metrics([s.hypothesis for s in data.records], [s.reference for s in data.records]),
            "per_category": {}, "anomalies": [], "warnings": [],
            "predictions": [{"uid": s.uid, "prediction": s.hypothesis, "parsed": s.hypothesis}
                            for s in data.records]}


class _MMT:
    """The ``mmt`` entry of the benchmark registry (the hooks of :mod:`mmkit.evaluate.base`)."""

    name = "mmt"
    version = "1"
    needs = "generate"
    config_class = MMTConfig
    flags = {"--split": "split", "--image-root": "image_root", "--hyp": "hyp", "--ref": "ref"}
    max_new_tokens = 128
    load = staticmethod(load)
    prompt = staticmethod(prompt)
    parse = staticmethod(parse)
    score = staticmethod(score)
    score_direct = staticmethod(score_direct)


BENCHMARK = _MMT()
