"""Recipe ``condense``: Bunny-style condensation of an image-text corpus (build.md §2).

embed -> kmeans -> assign -> partition -> dedup -> clip-band -> centroid-band -> sample -> export.
Every stage keeps its state in the work directory (``<out>.work``): its outputs, written
atomically per shard or bucket, then ``_STAGE.json`` = {stage, params_hash, upstream_hash,
counts}. A rerun reuses a stage whose hashes match, redoes only the missing shards of an
unfinished one, and recomputes a stage (and what follows) whose parameters changed.
``<out>`` is assembled in a temporary sibling and renamed into place at the end.

Peak memory ~ max(one embedding shard, the k-means sample, the largest bucket, the band
columns (12 B per survivor) or its histogram) + centroids (k·d·4 B) + 17 B per input pair
(key digest and caption flag).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmkit.build.manifest import Recipe, fingerprint_input, images_digest, stage_counts, write_manifest
from mmkit.errors import ConfigError, MmkitError, suggest

log = logging.getLogger("mmkit")

DEFAULT_LLAVA_PROMPT = "Write a short description of the image."
REPRESENTATIVE_NAMES = ("middle", "far", "near", "inner-middle", "clip-max", "random", "semdedup")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """``4GiB``, ``512MB``, ``1e9``-free plain integers: a byte count (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"expected a size such as 4GiB or 512MiB, got {text!r}", field="max_memory")
    unit = (m.group(2) or "B").upper()[0]
    return int(float(m.group(1)) * 1024 ** "BKMGT".index(unit))


@dataclass
class CondenseConfig:
    """Every option of ``mmkit build-dataset condense`` (build.md §1-2), defaults included."""

    pairs: str = ""
    embeddings: str | None = None
    image_root: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    clip: str = "openai/clip-vit-large-patch14"
    revision: str | None = None
    centroids: str | None = None
    seed: int = 0
    limit: int | None = None
    work_dir: str | None = None
    device: str = "auto"
    num_workers: int = 1
    batch_size: int = 64
    shard_rows: int = 1_000_000
    store_text_emb: bool = False
    clusters: int | str = "auto"
    kmeans_points_per_centroid: int = 64
    kmeans_iters: int = 20
    kmeans_epochs: int = 1
    kmeans_spherical: bool = False
    max_cluster_size: int = 1_000_000
    giant_cluster: Literal["split", "drop", "keep"] = "split"
    buckets: int | None = None
    dedup_threshold: float = 0.86
    dedup_tile: int = 8192
    representative: Literal["middle", "far", "near", "inner-middle", "clip-max", "random", "semdedup"] = "middle"
    clip_band: tuple[float, float] = (0.40, 0.60)
    centroid_band: tuple[float, float] = (0.15, 0.35)
    clip_min: float | None = None
    clip_max: float | None = None
    max_memory: str = "4GiB"
    target: int = 2_000_000
    format: Literal["parquet", "jsonl", "llava"] = "parquet"
    llava_prompt: list[str] = field(default_factory=lambda: [DEFAULT_LLAVA_PROMPT])
    stages: list[str] = field(default_factory=list)
    from_stage: str | None = None
    hash_images: bool = False
    hash_max_bytes: int = 1 << 30
    dry_run: bool = False
    clean_work: bool = False

    def validate(self) -> None:
        from mmkit.build.condense_select import check_band
        from mmkit.build.condense_stages import STAGE_NAMES

        if not self.pairs:
            raise ConfigError("required: the image-text records (key, image, caption)", field="--pairs")
        if self.clusters != "auto" and not (isinstance(self.clusters, int) and self.clusters >= 1):
            raise ConfigError(f"expected 'auto' or an integer >= 1, got {self.clusters!r}", field="clusters")
        for name in ("shard_rows", "kmeans_points_per_centroid", "kmeans_iters", "kmeans_epochs",
                     "max_cluster_size", "dedup_tile", "target", "batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected an integer >= 1, got {getattr(self, name)}", field=name)
        for name in ("buckets", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"expected an integer >= 1, got {getattr(self, name)}", field=name)
        if not -1.0 <= self.dedup_threshold <= 1.0:
            raise ConfigError(f"expected a cosine in [-1, 1], got {self.dedup_threshold}", field="dedup_threshold")
        check_band(*self.clip_band, "clip_band")
        check_band(*self.centroid_band, "centroid_band")
        for name in (*self.stages, *([self.from_stage] if self.from_stage else [])):
            if name not in STAGE_NAMES:
                raise ConfigError(f"unknown stage {name!r}{suggest(name, STAGE_NAMES)}; "
                                  f"stages: {', '.join(STAGE_NAMES)}", field="stages")
        if not self.llava_prompt:
            raise ConfigError("expected at least one prompt", field="llava_prompt")
        parse_bytes(self.max_memory)

    @property
    def max_memory_bytes(self) -> int:
        return parse_bytes(self.max_memory)


# --------------------------------------------------------------------------- stage state


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _wipe(work: Path, stage: Any) -> None:
    """Remove a stage's folder and files (a changed parameter or ``--from-stage``)."""
    shutil.rmtree(work / stage.dir, ignore_errors=True)
    for name in stage.files:
        (work / name).unlink(missing_ok=True)


def _barrier(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def pending_units(ctx: Any, stage: Any) -> list[int]:
    """The units of ``stage`` this rank still has to run (distributed stages: index mod world
    size; the others run on rank 0)."""
    units = stage.units(ctx)
    if stage.distributed:
        units = [u for u in units if u % ctx.world == ctx.rank]
    elif ctx.rank != 0:
        units = []
    return [u for u in units if not stage.done(ctx, u)]


def run_stages(ctx: Any, selected: set[str], from_stage: str | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) the stages up to the last selected one; returns their state records."""
    from mmkit.build.condense_stages import STAGE_FILE, STAGES

    upstream, states, forced = "", [], False
    wanted = [i for i, s in enumerate(STAGES) if s.name in selected or "export" in selected]
    last = max(wanted, default=-1)
    for i, stage in enumerate(STAGES[:last + 1]):
        forced = forced or stage.name == from_stage
        folder = ctx.work / stage.dir
        params_hash = _hash(stage.params(ctx))
        state = _read_json(folder / STAGE_FILE)
        if not (forced and stage.name in selected) and state and state.get("params_hash") == params_hash \
                and state.get("upstream_hash") == upstream:
            log.info("condense %s: up to date, reused", stage.name)
        elif stage.name not in selected:
            raise MmkitError(f"stage {stage.name!r} has not run with these inputs and settings; "
                             "add it to --stages", field="--stages")
        else:
            state = _run_stage(ctx, stage, params_hash, upstream, forced)
        ctx.counts[stage.name] = state["counts"]
        ctx.info[stage.name] = state["info"]
        ctx.warnings.extend(w for w in state["warnings"] if w not in ctx.warnings)
        states.append(state)
        upstream = _hash({k: state[k] for k in ("stage", "params_hash", "upstream_hash", "counts")})
    return states


def _run_stage(ctx: Any, stage: Any, params_hash: str, upstream: str, forced: bool) -> dict[str, Any]:
    from mmkit.build.condense_stages import STAGE_FILE
    from mmkit.io import write_json

    folder = ctx.work / stage.dir
    marker = {"params_hash": params_hash, "upstream_hash": upstream}
    if ctx.rank == 0:
        if forced or _read_json(folder / "_PARAMS.json") != marker:
            _wipe(ctx.work, stage)
        write_json(folder / "_PARAMS.json", marker)
    _barrier(ctx.world)
    units = pending_units(ctx, stage)
    log.info("condense %s: %d unit(s) to run", stage.name, len(units))
    stage.run_units(ctx, units)
    _barrier(ctx.world)
    if ctx.rank == 0:
        before = list(ctx.warnings)
        result = stage.finish(ctx)
        state = {"stage": stage.name, **marker, "counts": result.counts, "info": result.info,
                 "warnings": [w for w in ctx.warnings if w not in before], "dropped_rows": result.dropped_rows}
        write_json(folder / STAGE_FILE, state)
    _barrier(ctx.world)
    state = _read_json(folder / STAGE_FILE)
    assert state is not None
    return state


# --------------------------------------------------------------------------- the recipe


def _inputs(cfg: CondenseConfig) -> dict[str, Any]:
    """The input fingerprints (manifest ``data``; they also enter the embed stage's hash)."""
    entries = {"pairs": fingerprint_input(cfg.pairs, hash_max_bytes=cfg.hash_max_bytes)}
    if cfg.embeddings:
        entries["embeddings"] = fingerprint_input(cfg.embeddings, hash_max_bytes=cfg.hash_max_bytes)
    if cfg.centroids:
        entries["centroids"] = fingerprint_input(cfg.centroids, hash_max_bytes=cfg.hash_max_bytes)
    return entries


def _images_entry(pairs: Any) -> dict[str, Any]:
    """``--hash-images``: one digest over the (relative path, sha256) of every existing image."""
    files = [(rec["image"], pairs.image_root / rec["image"]) for _, rec in pairs.records()
             if (pairs.image_root / rec["image"]).is_file()]
    return {"spec": str(pairs.image_root), "kind": "images", "bytes": sum(p.stat().st_size for _, p in files),
            "sha256": images_digest(files), "hash_mode": "full", "revision": None}


def _dry_run(ctx: Any) -> dict[str, Any]:
    """Validate every input and report the counts that are cheap to get; write nothing."""
    import numpy as np

    from mmkit.build.condense_stages import embedding_shards
    from mmkit.config import config_dict

    pairs = ctx.pairs
    empty = int(pairs.empty_caption.sum())
    dropped = {"empty_caption": empty}
    if ctx.cfg.embeddings:
        have = np.zeros(pairs.n, dtype=bool)
        for shard in embedding_shards(ctx.cfg.embeddings):
            rows = shard.read(ctx)[0]
            have[rows[rows < pairs.n]] = True
        dropped["no_embedding"] = int((~have & ~pairs.empty_caption).sum())
    kept = pairs.n - sum(dropped.values())
    stages = [stage_counts("embed", pairs.n, kept, {k: v for k, v in dropped.items() if v})]
    return {"method": "condense", "dry_run": True, "config": config_dict(ctx.cfg), "metrics": {"stages": stages},
            "warnings": ctx.warnings}


def run(cfg: CondenseConfig, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Build the condensed dataset in ``out``; returns the manifest (a dry run: the counts)."""
    from mmkit.build.condense_stages import STAGE_NAMES, Ctx, export, funnel_rows, scan_pairs, write_funnel
    from mmkit.io import RunDir, atomic_dir, is_main_process

    started = time.time()
    out = Path(out)
    work = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.name + ".work")
    selected = set(cfg.stages or STAGE_NAMES)
    publish = "export" in selected
    if publish and out.exists() and not overwrite and not cfg.dry_run:
        raise MmkitError("already exists (pass --overwrite to replace it)", file=str(out), field="--out")
    pairs = scan_pairs(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = Ctx(cfg=cfg, work=work, pairs=pairs, rank=int(os.environ.get("RANK", "0")), world=world,
              inputs=_inputs(cfg))
    if cfg.dry_run:
        return _dry_run(ctx)
    work.mkdir(parents=True, exist_ok=True)
    RunDir(path=work, command="build-dataset condense", resumed=True).attach_log()
    states = run_stages(ctx, selected, cfg.from_stage)
    if not publish or not is_main_process():
        return {"method": "condense", "metrics": {"stages": [dict(name=s["stage"], **s["counts"]) for s in states]},
                "warnings": ctx.warnings, "work_dir": str(work)} if is_main_process() else {}
    stages = [stage_counts(s["stage"], s["counts"]["in"], s["counts"]["kept"], s["counts"]["dropped"])
              for s in states]
    stages.append(stage_counts("export", stages[-1]["kept"], stages[-1]["kept"]))
    dropped = [(int(r), s["stage"], reason) for s in states for r, reason in s["dropped_rows"]][:1000]
    model = ctx.info["embed"].get("model")
    if model is None and cfg.embeddings:
        from mmkit.build.condense_stages import embeddings_model

        model = embeddings_model(cfg.embeddings)
    data = list(ctx.inputs.values()) + ([_images_entry(pairs)] if cfg.hash_images else [])
    device = _device(cfg.device)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        export(ctx, tmp, dropped)
        write_funnel(tmp, funnel_rows(stages))
        manifest = write_manifest(tmp, "condense", cfg, data, stages, models={"clip": model} if model else {},
                                  warnings=ctx.warnings, started=started, device=device)
    log.info("condense: %d pairs written to %s", stages[-1]["kept"], out)
    if cfg.clean_work:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _device(device: str) -> str:
    if device != "auto":
        return device
    from mmkit.core.models import resolve_device

    return resolve_device(device)


RECIPE = Recipe(
    name="condense",
    config=CondenseConfig,
    run=run,
    summary="Bunny-style condensation: CLIP embed, k-means, near-duplicate removal, similarity bands, sample.",
    example="mmkit build-dataset condense --pairs laion.parquet --embeddings laion-emb/ --target 2000000 "
            "--out condensed/",
)
