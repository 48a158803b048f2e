"""``manifest.json`` for every ``build-dataset`` output (build.md §1).

A recipe assembles its files in the temporary ``<out>`` (``io.atomic_dir``) and calls
:func:`write_manifest` last, so the manifest lists every other file with its size and sha256.
Only ``started``, ``finished``, ``wall_s`` and ``run`` vary between identical runs
(:data:`VOLATILE`); :func:`stable_view` drops them for determinism checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mmkit import __version__

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: files up to this size are hashed in full; larger ones are ``sampled`` (build.md §1)
HASH_MAX_BYTES = 1 << 30
#: a sampled hash covers the size plus the first and last this many bytes
SAMPLE_BYTES = 8 << 20
#: the fields that may differ between two otherwise identical runs
VOLATILE = ("started", "finished", "wall_s", "run")
#: ``environment`` lists these distributions' versions (``faiss``: the first one installed)
_PACKAGES = {"torch": ("torch",), "transformers": ("transformers",), "datasets": ("datasets",),
             "faiss": ("faiss-cpu", "faiss-gpu", "faiss"), "numpy": ("numpy",)}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a recipe module exposes as ``RECIPE`` (build.md §1): its config dataclass, ``run``,
    and the one-line summary and example that ``mmkit build-dataset --help`` lists."""

    name: str
    config: type
    run: Callable[..., dict[str, Any]]  # run(cfg, out, overwrite) -> the manifest it wrote
    summary: str
    example: str


def hash_file(path: str | os.PathLike, hash_max_bytes: int = HASH_MAX_BYTES) -> tuple[str, str]:
    """``(sha256, hash_mode)`` of a file: ``full`` up to ``hash_max_bytes``, else ``sampled``
    (sha256 over the decimal size, then the first and last :data:`SAMPLE_BYTES`)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= hash_max_bytes:
            while block := fh.read(1 << 20):
                h.update(block)
            return h.hexdigest(), "full"
        h.update(str(size).encode())
        h.update(fh.read(SAMPLE_BYTES))
        fh.seek(max(0, size - SAMPLE_BYTES))
        h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest(), "sampled"


def fingerprint_input(spec: str, *, revision: str | None = None, hub_fingerprint: str | None = None,
                      hash_max_bytes: int = HASH_MAX_BYTES) -> dict[str, Any]:
    """One ``data`` entry: ``{spec, kind, bytes, sha256, hash_mode, revision}``.

    A file hashes its bytes (:func:`hash_file`); a directory hashes its sorted
    ``(relative path, file hash)`` pairs and is ``sampled`` if any file was; anything else is
    a hub id, identified by ``hub_fingerprint`` (the ``datasets`` fingerprint) and ``revision``.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        digest, mode = hash_file(path, hash_max_bytes)
        return _entry(spec, "file", path.stat().st_size, digest, mode, revision)
    if path.is_dir():
        h, total, modes = hashlib.sha256(), 0, set()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest, mode = hash_file(f, hash_max_bytes)
            h.update(f"{f.relative_to(path).as_posix()}\x1f{digest}\x1e".encode())
            total += f.stat().st_size
            modes.add(mode)
        return _entry(spec, "dir", total, h.hexdigest(), "sampled" if "sampled" in modes else "full", revision)
    return _entry(spec, "hub", None, hub_fingerprint, "hub-fingerprint", revision)


def _entry(spec: str, kind: str, size: int | None, digest: str | None, mode: str,
           revision: str | None) -> dict[str, Any]:
    return {"spec": spec, "kind": kind, "bytes": size, "sha256": digest, "hash_mode": mode, "revision": revision}


def images_digest(files: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """``--hash-images``: sha256 over the sorted ``(relative path, sha256)`` pairs of the images."""
    h = hashlib.sha256()
    for rel, digest in sorted((rel, hash_file(p, 1 << 62)[0]) for rel, p in files):
        h.update(f"{rel}\x1f{digest}\x1e".encode())
    return h.hexdigest()


def stage_counts(name: str, n_in: int, kept: int, dropped: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One ``metrics.stages`` row, ``{name, in, kept, dropped: {reason: count}}``."""
    return {"name": name, "in": int(n_in), "kept": int(kept),
            "dropped": {str(k): int(v) for k, v in (dropped or {}).items()}}


def check_stages(stages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The stage rows in spec key order; each stage's ``in`` must equal the previous ``kept``,
    and ``in - kept`` must equal the sum of its drops (a mismatch is a bug: ``ValueError``)."""
    rows = [stage_counts(s["name"], s["in"], s["kept"], s.get("dropped")) for s in stages]
    for prev, row in zip([None, *rows], rows):
        if prev is not None and row["in"] != prev["kept"]:
            raise ValueError(f"stage {row['name']!r}: in={row['in']} but {prev['name']!r} kept {prev['kept']}")
        if row["in"] - row["kept"] != sum(row["dropped"].values()):
            raise ValueError(f"stage {row['name']!r}: in - kept = {row['in'] - row['kept']} "
                             f"but the drops add up to {sum(row['dropped'].values())}")
    return rows


def output_entries(out: str | os.PathLike) -> list[dict[str, Any]]:
    """``[{path, bytes, sha256}]`` for every file under ``out`` but the manifest, sorted by path."""
    root = Path(out)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
             "sha256": hash_file(p, 1 << 62)[0]} for p in files]


def environment() -> dict[str, str | None]:
    """Python and library versions (read from package metadata, so nothing heavy is imported)."""
    env: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in _PACKAGES.items():
        env[name] = next((v for v in map(_version, dists) if v is not None), None)
    return env


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _plain_config(cfg: Any) -> dict[str, Any]:
    from mmkit.config import config_dict

    return config_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def write_manifest(
    out: str | os.PathLike,
    recipe: str,
    cfg: Any,
    inputs: Sequence[str | Mapping[str, Any]],
    counts: Sequence[Mapping[str, Any]],
    *,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    warnings: Sequence[str] = (),
    standins: Sequence[Any] = (),
    started: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write ``<out>/manifest.json`` (build.md §1) and return it.

    ``cfg`` is the resolved config (a dataclass or mapping; its ``seed`` is copied to the top);
    ``inputs`` are input specs (fingerprinted here) or ready :func:`fingerprint_input` entries;
    ``counts`` are the stage rows (:func:`stage_counts`), checked by :func:`check_stages`.
    Call it after every other file of ``out`` is written: ``outputs`` lists them.
    """
    from mmkit.io import write_json

    config = _plain_config(cfg)
    finished = time.time()
    started = finished if started is None else started
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "mmkit_version": __version__,
        "command": "build-dataset",
        "method": recipe,
        "seed": config.get("seed"),
        "config": config,
        "models": {name: dict(m) for name, m in (models or {}).items()},
        "data": [dict(x) if isinstance(x, Mapping) else fingerprint_input(x) for x in inputs],
        "metrics": {"stages": check_stages(counts)},
        "outputs": output_entries(out),
        "environment": environment(),
        "warnings": list(warnings),
        "standins": list(standins),
        "started": _iso(started),
        "finished": _iso(finished),
        "wall_s": round(finished - started, 3),
        "run": {"device": device},
    }
    write_json(Path(out) / MANIFEST, manifest)
    return manifest


def stable_view(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest without its volatile fields (what determinism checks compare)."""
    return {k: v for k, v in manifest.items() if k not in VOLATILE}
