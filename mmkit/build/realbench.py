"""Recipe ``realbench``: assemble and validate RealBench-style Chinese multi-image samples
(build.md §6), in the record schema that ``mmkit evaluate realbench`` defines and reads.

The schema check itself is :func:`mmkit.evaluate.realbench.check_record` (defined once, in the
evaluator); this recipe adds the builder's checks: image count, image files (header, ``verify()``,
format, minimum side), Chinese text hygiene (UTF-8, NFC, no control characters), the CJK ratio
and the jieba token count of the question. It writes ``samples.jsonl`` sorted by id with image
paths relative to ``<out>`` (optionally copied or linked into ``images/<id>/``), ``stats.json``,
``stats.md`` and PNG histograms.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from mmkit.build.manifest import Recipe
from mmkit.build.shared import BuildOptions, BuildRun, image_mode, on_invalid, place_image, write_lines
from mmkit.errors import ConfigError, DataError, MissingExtraError
from mmkit.io import Record, write_json, write_jsonl
from mmkit.progress import Progress

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
#: CJK ideograph ranges counted by the CJK ratio (build.md §6)
IDEOGRAPH_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF))


@dataclass
class RealBenchBuildConfig(BuildOptions):
    """``mmkit build-dataset realbench`` options (build.md §6)."""

    samples: Optional[str] = None
    folder: Optional[str] = None
    min_images: int = 2
    max_images: int = 20
    min_side: int = 32
    min_cjk_ratio: float = 0.5
    min_tokens: int = 2
    jieba_dict: Optional[str] = None
    on_invalid: Literal["error", "skip"] = "error"
    copy_images: bool = False
    link_images: bool = False

    def validate(self) -> None:
        if (self.samples is None) == (self.folder is None):
            raise ConfigError("give exactly one of --samples SPEC and --folder DIR", field="samples")
        if self.min_images > self.max_images:
            raise ConfigError(f"--min-images {self.min_images} exceeds --max-images {self.max_images}",
                              field="min_images")
        image_mode(self.copy_images, self.link_images)


# --------------------------------------------------------------------------- pure checks


def is_ideograph(ch: str) -> bool:
    """True for a CJK ideograph in the ranges of :data:`IDEOGRAPH_RANGES`."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in IDEOGRAPH_RANGES)


def cjk_ratio(text: str) -> float:
    """Ideographs over all letters (Unicode category L*, ideographs included); 0 without letters."""
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    return sum(map(is_ideograph, letters)) / len(letters) if letters else 0.0


def text_problem(text: str) -> str | None:
    """What makes a Chinese text field invalid (not UTF-8-encodable, not NFC, control characters
    other than ``\\n``), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "expected valid UTF-8 text (found a lone surrogate)"
    if not unicodedata.is_normalized("NFC", text):
        return "expected NFC-normalised text"
    bad = next((c for c in text if c != "\n" and unicodedata.category(c) == "Cc"), None)
    return None if bad is None else f"expected no control characters except \\n, found U+{ord(bad):04X}"


def text_fields(rec: Record) -> list[tuple[str, str]]:
    """The Chinese text fields of a record: question, text options, a text answer, references."""
    out = [("question", rec["question"])]
    out += [(f"options[{k}]", o) for k, o in enumerate(rec.get("options") or [])]
    if rec.get("answer_type") == "text":
        out.append(("answer", rec["answer"]))
    out += [(f"references[{k}]", r) for k, r in enumerate(rec.get("references") or [])]
    return out


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    width: int
    height: int
    sha256: str


def inspect_image(path: Path) -> ImageInfo | str:
    """Header size and format after PIL's ``verify()``; a problem string when it fails."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"unreadable image {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if fmt not in FORMATS:
        return f"image {path} is {fmt}; expected one of {', '.join(FORMATS)}"
    return ImageInfo(path, fmt, size[0], size[1], hashlib.sha256(data).hexdigest())


def jieba_counter(dictionary: str | None) -> Callable[[str], int]:
    """Tokens in accurate mode with HMM (extra ``mmkit[zh]``), whitespace tokens not counted."""
    try:
        import jieba
    except ImportError:
        raise MissingExtraError("jieba", "zh", "realbench's token count") from None
    jieba.setLogLevel(logging.WARNING)
    tok = jieba.Tokenizer(dictionary=dictionary) if dictionary else jieba.dt
    return lambda text: sum(1 for t in tok.lcut(text, cut_all=False, HMM=True) if t.strip())


# --------------------------------------------------------------------------- inputs


def read_utf8(path: Path) -> None:
    """A file that is not UTF-8 is an error naming its first bad line."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError("expected UTF-8 text", file=str(path), line=data.count(b"\n", 0, exc.start) + 1,
                        field="text") from None


def folder_records(folder: Path) -> list[tuple[Record, Path]]:
    """``--folder``: one sample per subdirectory (lexicographic), its ``sample.json`` and image root."""
    import json

    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        path = sub / "sample.json"
        if not path.is_file():
            raise DataError("missing sample.json (each subdirectory is one sample)", file=str(sub), field="sample.json")
        read_utf8(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"malformed JSON ({exc})", file=str(path), line=1, field="json") from None
        if not isinstance(obj, dict):
            raise DataError("expected a JSON object", file=str(path), line=1, field="json")
        out.append((Record(obj, str(path), 1), sub))
    if not out:
        raise DataError("no sample subdirectories", file=str(folder), field="--folder")
    return out


# --------------------------------------------------------------------------- validation


@dataclass
class Checked:
    rec: Record
    id: str
    images: list[ImageInfo]
    tokens: int


class Invalid(Exception):
    """A failed builder check: the error and its drop reason."""

    def __init__(self, error: DataError, reason: str) -> None:
        super().__init__(str(error))
        self.error, self.reason = error, reason


def check_sample(rec: Record, root: Path, cfg: RealBenchBuildConfig, count_tokens: Callable[[str], int],
                 warn: Callable[[str], None]) -> Checked:
    """Every builder check of one sample (build.md §6); a failure raises :class:`Invalid`."""
    from mmkit.evaluate.realbench import check_record

    try:
        sample = check_record(rec, root, check_files=False)
    except DataError as exc:
        raise Invalid(exc, "schema") from None
    n = len(sample.images)
    if not cfg.min_images <= n <= cfg.max_images:
        raise Invalid(rec.error("images", f"expected {cfg.min_images} to {cfg.max_images} images, got {n}"),
                      "image_count")
    infos = []
    for k, p in enumerate(sample.images):
        path = Path(p)
        if not path.is_file():
            raise Invalid(rec.error(f"images[{k}]", f"image file not found: {path}"), "missing_image")
        info = inspect_image(path)
        if isinstance(info, str):
            raise Invalid(rec.error(f"images[{k}]", info), "bad_image")
        if min(info.width, info.height) < cfg.min_side:
            raise Invalid(rec.error(f"images[{k}]", f"image is {info.width}x{info.height}; both sides must be "
                                                    f">= {cfg.min_side} px"), "small_image")
        infos.append(info)
    seen: dict[str, int] = {}
    for k, info in enumerate(infos):
        if info.sha256 in seen:
            warn(f"{rec.source}:{rec.loc}: images[{k}] is the same image as images[{seen[info.sha256]}]")
        seen.setdefault(info.sha256, k)
    for name, text in text_fields(rec):
        problem = text_problem(text)
        if problem:
            raise Invalid(rec.error(name, problem), "text")
    ratio = cjk_ratio(sample.question)
    if ratio < cfg.min_cjk_ratio:
        raise Invalid(rec.error("question", f"CJK ratio {ratio:.2f} is below --min-cjk-ratio {cfg.min_cjk_ratio}"),
                      "cjk_ratio")
    tokens = count_tokens(sample.question)
    if tokens < cfg.min_tokens:
        raise Invalid(rec.error("question", f"{tokens} jieba token(s), fewer than --min-tokens {cfg.min_tokens}"),
                      "min_tokens")
    return Checked(rec, sample.id, infos, tokens)


# --------------------------------------------------------------------------- statistics


def histogram(values: Sequence[float], width: float) -> dict[str, int]:
    """Counts per bin ``[k·width, (k+1)·width)``, keyed by the bin's lower edge, ascending."""
    counts = Counter(int(v // width) for v in values)
    return {_edge(k * width): counts[k] for k in sorted(counts)}


def _edge(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def aspect_histogram(ratios: Sequence[float]) -> dict[str, int]:
    """Width/height in 0.25 bins (keyed by lower edge) with a final ``≥ 4`` bin."""
    out = histogram([r for r in ratios if r < 4], 0.25)
    over = sum(r >= 4 for r in ratios)
    return {**out, "≥ 4": over} if over else out


def summary(values: Sequence[float]) -> dict[str, Any]:
    """mean, median and max (None when empty)."""
    if not values:
        return {"mean": None, "median": None, "max": None}
    return {"mean": round(statistics.fmean(values), 4), "median": statistics.median(values), "max": max(values)}


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    """min, p25, p50, p75, p90, max (linear interpolation)."""
    import numpy as np

    qs = {"min": 0.0, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}
    if not values:
        return {k: None for k in qs}
    return {k: round(float(np.quantile(np.asarray(values, dtype=float), q)), 6) for k, q in qs.items()}


def compute_stats(samples: Sequence[Checked]) -> dict[str, Any]:
    """``stats.json``: images per sample, resolutions, aspect ratios, megapixels, task mix, question
    lengths and images per task (build.md §6)."""
    per = [len(s.images) for s in samples]
    images = [i for s in samples for i in s.images]
    widths, heights = [i.width for i in images], [i.height for i in images]
    tasks = Counter(s.rec["task"] for s in samples)
    q_chars = [len(s.rec["question"]) for s in samples]
    q_tokens = [s.tokens for s in samples]
    return {
        "samples": len(samples),
        "images": len(images),
        "images_per_sample": {"histogram": {str(k): v for k, v in sorted(Counter(per).items())}, **summary(per)},
        "width": {"histogram": histogram(widths, 100), "min": min(widths, default=None),
                  "max": max(widths, default=None)},
        "height": {"histogram": histogram(heights, 100), "min": min(heights, default=None),
                   "max": max(heights, default=None)},
        "aspect_ratio": {"histogram": aspect_histogram([w / h for w, h in zip(widths, heights)])},
        "megapixels": quantiles([w * h / 1e6 for w, h in zip(widths, heights)]),
        "tasks": {t: {"count": c, "percent": round(100.0 * c / len(samples), 2)} for t, c in sorted(tasks.items())},
        "question_tokens": {"histogram": histogram(q_tokens, 10), **summary(q_tokens)},
        "question_chars": {"histogram": histogram(q_chars, 10), **summary(q_chars)},
        "images_per_task": {t: {"samples": tasks[t], "images": sum(len(s.images) for s in samples
                                                                   if s.rec["task"] == t),
                                "mean": round(sum(len(s.images) for s in samples if s.rec["task"] == t) / tasks[t], 4)}
                            for t in sorted(tasks)},
    }


PLOTS = (("images_per_sample", "images per sample"), ("width", "width (100 px bins)"),
         ("height", "height (100 px bins)"), ("aspect_ratio", "aspect ratio (0.25 bins)"),
         ("question_tokens", "question length, jieba tokens (bins of 10)"))


def stats_markdown(stats: dict[str, Any]) -> list[str]:
    """``stats.md``: one table per histogram plus the scalar summaries."""
    lines = ["# RealBench build statistics", "", f"{stats['samples']} samples, {stats['images']} images.", ""]
    lines += ["## Task mix", "", "| task | samples | % | images | images / sample |", "|---|---|---|---|---|"]
    for t, row in stats["tasks"].items():
        per = stats["images_per_task"][t]
        lines.append(f"| {t} | {row['count']} | {row['percent']} | {per['images']} | {per['mean']} |")
    lines.append("")
    for key, title in PLOTS + (("question_chars", "question length, characters (bins of 10)"),):
        block = stats[key]
        lines += [f"## {title}", "", "| bin | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in block["histogram"].items()]
        extra = {k: v for k, v in block.items() if k != "histogram"}
        lines += ["", ", ".join(f"{k} {v}" for k, v in extra.items()) if extra else "", ""]
    mp = stats["megapixels"]
    lines += ["## Megapixels", "", ", ".join(f"{k} {v}" for k, v in mp.items()), ""]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def save_plots(stats: dict[str, Any], folder: Path) -> None:
    """One PNG bar chart per histogram (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for key, title in PLOTS:
        hist = stats[key]["histogram"]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.bar(range(len(hist)), list(hist.values()), color="#4c72b0")
        ax.set_xticks(range(len(hist)), list(hist.keys()), rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("count")
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", format="png", metadata={"Software": None})
        plt.close(fig)


# --------------------------------------------------------------------------- the recipe


def output_record(rec: Record, images: list[str]) -> dict[str, Any]:
    """A ``samples.jsonl`` line in schema order, images rewritten (optional keys only when set)."""
    out = {"id": rec["id"], "task": rec["task"], "images": images, "question": rec["question"],
           "options": rec.get("options"), "answer_type": rec["answer_type"], "answer": rec["answer"]}
    out.update({k: rec[k] for k in ("references", "meta") if rec.get(k) is not None})
    return out


def run(cfg: RealBenchBuildConfig, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Validate the samples, then write ``samples.jsonl``, ``stats.json``, ``stats.md`` and plots."""
    with BuildRun("realbench", cfg, out, overwrite) as build:
        if cfg.folder:
            pairs = folder_records(Path(cfg.folder).expanduser())[: cfg.limit]
            build.inputs.append(cfg.folder)
        else:
            if Path(cfg.samples).expanduser().is_file():
                read_utf8(Path(cfg.samples).expanduser())
            recs = build.read(cfg.samples)
            pairs = [(r, Path(cfg.image_root or Path(r.source).parent).expanduser()) for r in recs]
        count_tokens = jieba_counter(cfg.jieba_dict)
        kept: list[Checked] = []
        reasons: Counter = Counter()
        first: dict[str, Any] = {}
        bar = Progress(len(pairs), "realbench validate")
        for rec, root in pairs:
            bar.update(1)
            try:
                rid = rec.get("id")
                if isinstance(rid, str) and rid in first:
                    raise Invalid(rec.error("id", f"duplicate id {rid!r} (first at {first[rid]})"), "duplicate_id")
                checked = check_sample(rec, root, cfg, count_tokens, build.warn)
                first[checked.id] = f"{rec.source}:{rec.loc}"
                kept.append(checked)
            except Invalid as bad:
                on_invalid(build, cfg.on_invalid, bad.error, str(rec.get("id")), bad.reason)
                reasons[bad.reason] += 1
        bar.close()
        build.stage("validate", len(pairs), len(kept), reasons)
        build.images.update({f"{s.id}/{ref}": i.path for s in kept for ref, i in zip(s.rec["images"], s.images)})
        kept.sort(key=lambda s: s.id)
        mode = image_mode(cfg.copy_images, cfg.link_images)
        placed: list[tuple[Path, str]] = []
        lines = []
        for s in kept:
            if mode:
                rel = [f"images/{s.id}/{k}.{FORMATS[i.format]}" for k, i in enumerate(s.images, 1)]
                placed += [(i.path, r) for i, r in zip(s.images, rel)]
            else:
                rel = [Path(os.path.relpath(i.path.resolve(), build.out.resolve())).as_posix() for i in s.images]
            lines.append(output_record(s.rec, rel))
        build.stage("export", len(kept), len(kept))
        stats = compute_stats(kept)

        def write(tmp: Path) -> None:
            write_jsonl(tmp / "samples.jsonl", lines)
            write_json(tmp / "stats.json", stats)
            write_lines(tmp / "stats.md", stats_markdown(stats))
            save_plots(stats, tmp / "plots")
            for src, rel in placed:
                place_image(src, tmp / rel, mode)

        return build.publish(write)


RECIPE = Recipe(
    name="realbench",
    config=RealBenchBuildConfig,
    run=run,
    summary="RealBench-style Chinese multi-image samples: validate, write samples.jsonl and statistics.",
    example="mmkit build-dataset realbench --folder posts/ --copy-images --out realbench/",
)
