"""Plumbing the record-based recipes share (build.md §1): common options, input reading with
``--limit``/``--field``, image references, stage counts, ``dropped.jsonl`` and the atomic publish.

A recipe builds a :class:`BuildRun`, reads its inputs through it, counts each stage with
:meth:`BuildRun.stage`, and hands a writer to :meth:`BuildRun.publish`, which assembles
``<out>`` in a temporary sibling, writes ``manifest.json`` last and renames it into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from mmkit.errors import DataError, MmkitError
from mmkit.io import Record, atomic_dir, read_records, write_jsonl

log = logging.getLogger("mmkit")

#: ``dropped.jsonl`` lists at most this many dropped ids (build.md §1)
MAX_DROPPED_LISTED = 1000
URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://")


@dataclass
class BuildOptions:
    """Options every recipe accepts (build.md §1); recipe configs extend this class."""

    seed: int = 0
    work_dir: Optional[str] = None
    limit: Optional[int] = None
    dry_run: bool = False
    num_workers: int = 1
    device: str = "auto"
    image_root: Optional[str] = None
    fields: dict[str, str] = field(default_factory=dict)
    hash_images: bool = False
    clean_work: bool = False


def resolve_image(ref: str, rec: Record, field_name: str, image_root: str | None) -> Path:
    """An image reference as a path: absolute as given, else under ``image_root`` (default: the
    directory of the input file). URLs are an error: no recipe downloads images."""
    if ref.lower().startswith(URL_PREFIXES):
        raise rec.error(field_name, "images are read from local files only; download them first "
                                    "and pass local paths (or --image-root)")
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    root = Path(image_root).expanduser() if image_root else Path(rec.source).expanduser().parent
    return root / path


def require_file(path: Path, rec: Record, field_name: str) -> Path:
    """``path`` if it is a file, else an error naming the record and field."""
    if not path.is_file():
        raise rec.error(field_name, f"image file not found: {path}")
    return path


class BuildRun:
    """One recipe run: inputs, warnings, stand-ins, stage counts and dropped ids, then the publish."""

    def __init__(self, recipe: str, cfg: BuildOptions, out: str, overwrite: bool) -> None:
        self.recipe, self.cfg, self.overwrite = recipe, cfg, overwrite
        self.out = Path(out).expanduser()
        if self.out.exists() and not overwrite and not cfg.dry_run:
            raise MmkitError("already exists (pass --overwrite to replace it)", file=str(self.out), field="--out")
        self.work = Path(cfg.work_dir).expanduser() if cfg.work_dir else self.out.with_name(self.out.name + ".work")
        self.started = time.time()
        self.inputs: list[Any] = []  # specs, or ready fingerprint entries
        self.warnings: list[str] = []
        self.standins: list[Any] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.images: dict[str, Path] = {}  # reference as given -> file, for --hash-images
        self.stages: list[dict[str, Any]] = []
        self.dropped: list[dict[str, str]] = []
        self._log_handler: logging.Handler | None = None
        if not cfg.dry_run:
            self.work.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.work / "log.txt", encoding="utf-8")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(self._log_handler)

    def read(self, spec: str, required: Sequence[str] = (), *, limit: bool = True) -> list[Record]:
        """All records of ``spec`` (with ``--field`` renames and, if ``limit``, ``--limit``)."""
        self.inputs.append(spec)
        records = []
        for rec in read_records(spec, fields=self.cfg.fields, required=required):
            if limit and self.cfg.limit is not None and len(records) >= self.cfg.limit:
                break
            records.append(rec)
        return records

    def warn(self, message: str) -> None:
        """A warning for the log and the manifest."""
        log.warning("%s", message)
        self.warnings.append(message)

    def stage(self, name: str, n_in: int, kept: int, dropped: Mapping[str, int] | None = None) -> None:
        """Count one stage (``in`` must equal the previous stage's ``kept``)."""
        from mmkit.build.manifest import stage_counts

        self.stages.append(stage_counts(name, n_in, kept, {k: v for k, v in (dropped or {}).items() if v}))

    def drop(self, item_id: str, reason: str) -> None:
        """Remember a dropped id (the first :data:`MAX_DROPPED_LISTED` go to ``dropped.jsonl``)."""
        if len(self.dropped) < MAX_DROPPED_LISTED:
            self.dropped.append({"id": str(item_id), "reason": reason})

    def publish(self, write: Callable[[Path], None]) -> dict[str, Any]:
        """Write ``<out>`` atomically: ``write(tmp)``, then ``dropped.jsonl`` and ``manifest.json``.

        Under ``--dry-run`` nothing is written; the stage counts come back as the manifest's
        ``metrics`` with ``dry_run: true``.
        """
        from mmkit.build.manifest import check_stages, write_manifest

        if self.cfg.dry_run:
            return {"method": self.recipe, "dry_run": True, "metrics": {"stages": check_stages(self.stages)},
                    "warnings": self.warnings}
        with atomic_dir(self.out, overwrite=self.overwrite) as tmp:
            write(tmp)
            if self.dropped:
                write_jsonl(tmp / "dropped.jsonl", self.dropped)
            manifest = write_manifest(tmp, self.recipe, self.cfg, self.inputs + self._images_entry(), self.stages,
                                      models=self.models, warnings=self.warnings, standins=self.standins,
                                      started=self.started, device=_device(self.cfg.device))
        if self.cfg.clean_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return manifest

    def _images_entry(self) -> list[dict[str, Any]]:
        """``--hash-images``: one ``data`` entry digesting the (reference, sha256) of every existing image."""
        from mmkit.build.manifest import images_digest

        if not self.cfg.hash_images:
            return []
        files = [(ref, p) for ref, p in self.images.items() if p.is_file()]
        return [{"spec": "images", "kind": "images", "bytes": sum(p.stat().st_size for _, p in files),
                 "sha256": images_digest(files), "hash_mode": "full", "revision": None}]

    def __enter__(self) -> "BuildRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach the work-dir log (also after a failed run)."""
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def _device(device: str) -> str:
    """``auto`` -> the device a recipe would use; the record-based recipes never need a GPU."""
    return "cpu" if device == "auto" else device


def on_invalid(run: BuildRun, policy: str, err: DataError, item_id: str, reason: str) -> None:
    """``--on-invalid``: raise ``err`` (``error``) or drop the item under ``reason`` (``skip``)."""
    if policy != "skip":
        raise err
    log.warning("skipped: %s", err)
    run.drop(item_id, reason)


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """A text file of ``lines``: UTF-8, LF endings, a final newline (nothing for no lines)."""
    from mmkit.io import atomic_write

    with atomic_write(path) as fh:
        fh.write("".join(line + "\n" for line in lines))


def place_image(src: Path, dst: Path, mode: str) -> None:
    """Put an image into ``<out>``: ``copy`` (bytes and times) or ``link`` (an absolute symlink)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def image_mode(copy_images: bool, link_images: bool) -> str | None:
    """``--copy-images`` / ``--link-images`` as ``copy``, ``link`` or None (they exclude each other)."""
    from mmkit.errors import ConfigError

    if copy_images and link_images:
        raise ConfigError("choose one of --copy-images and --link-images", field="copy_images")
    return "copy" if copy_images else "link" if link_images else None
