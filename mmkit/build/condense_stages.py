"""The nine stages of ``condense`` (build.md §2), each reading only earlier stages' work files.

A stage is a :class:`Stage`: its work ``units`` (shards or buckets, each written atomically so
a stopped run redoes only missing ones), ``run_units`` and ``finish`` (the stage's counts).
:mod:`mmkit.build.condense` chains them, hashes their parameters and publishes ``<out>``.
Memory stays bounded by one shard, the k-means sample, one bucket and the band columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from mmkit.build import condense_select as sel
from mmkit.core.seeding import stable_rng, stable_seed
from mmkit.errors import DataError
from mmkit.io import Record, read_records
from mmkit.progress import Progress
from mmkit.registry import Registry

if TYPE_CHECKING:
    from mmkit.build.condense import CondenseConfig

log = logging.getLogger("mmkit")

DROPPED_SAMPLE = 1000  # dropped ids kept per stage for dropped.jsonl (build.md §1)
EMBED_CHUNK = 1024  # rows whose images are decoded at once while embedding
CLIP_TEXT_LENGTH = 77  # CLIP's maximum text length
PART_ROWS = 1_000_000  # rows per exported data part
STAGE_FILE = "_STAGE.json"


# --------------------------------------------------------------------------- files


def save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, Any] | None = None) -> None:
    """Write a safetensors file atomically (temp name, then rename). The metadata is one JSON
    entry, ``mmkit``: safetensors does not keep the order of several entries stable."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        meta = {"mmkit": json.dumps(metadata or {}, sort_keys=True)}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The named tensors (all when ``names`` is None) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return {k: fh.get_tensor(k) for k in (names or fh.keys())}


def tensor_meta(path: Path) -> dict[str, Any]:
    """A safetensors file's metadata (what :func:`save_tensors` stored)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return json.loads((fh.metadata() or {}).get("mmkit", "{}"))


def save_rows(path: Path, rows: np.ndarray) -> None:
    """An int64 row array as ``.npy``, atomically."""
    from mmkit.io import atomic_write

    with atomic_write(path, "wb") as fh:
        np.save(fh, np.asarray(rows, dtype=np.int64), allow_pickle=False)


def load_rows(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def first_rows(rows: np.ndarray, limit: int = DROPPED_SAMPLE) -> list[int]:
    """The smallest ``limit`` rows, ascending."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > limit:
        rows = np.partition(rows, limit - 1)[:limit]
    return np.sort(rows).tolist()


# --------------------------------------------------------------------------- pairs


def key_digest(key: str) -> bytes:
    """A 128-bit digest of a key: an order-free key index of 16 bytes per row."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


@dataclass
class Pairs:
    """What one validating pass over ``--pairs`` learns: N, key digests (row order) and which
    captions are empty. Records are streamed again when needed, never held."""

    source: str
    fields: dict[str, str]
    limit: int | None
    image_root: Path
    n: int = 0
    digests: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S16"))
    empty_caption: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    _sorted: tuple[np.ndarray, np.ndarray] | None = None

    def records(self) -> Iterator[tuple[int, Record]]:
        """``(row, record)`` in input order (the first ``limit``), each checked by :func:`check_pair`."""
        it = read_records(self.source, fields=self.fields, required=("key", "image", "caption"))
        for row, rec in enumerate(it):
            if self.limit is not None and row >= self.limit:
                return
            check_pair(rec)
            yield row, rec

    def lookup(self, digests: np.ndarray) -> np.ndarray:
        """The row of each key digest, or -1 when the key is not in ``--pairs``."""
        if self._sorted is None:
            order = np.argsort(self.digests, kind="stable")
            self._sorted = (self.digests[order], order)
        keys, order = self._sorted
        pos = np.minimum(np.searchsorted(keys, digests), max(len(keys) - 1, 0))
        found = (keys[pos] == digests) if len(keys) else np.zeros(len(digests), dtype=bool)
        return np.where(found, order[pos] if len(keys) else -1, -1)


def check_pair(rec: Record) -> None:
    """``key`` (str or int, made a str), ``image`` (non-empty str) and ``caption`` (str, may be
    empty: an empty caption is a drop, not an error)."""
    if isinstance(rec["key"], int) and not isinstance(rec["key"], bool):
        rec["key"] = str(rec["key"])
    rec.require("key", str)
    rec.require("image", str)
    rec.require("caption", str, nonempty=False)


def scan_pairs(cfg: "CondenseConfig") -> Pairs:
    """Read and validate every record of ``--pairs`` once; a duplicate key is an error naming
    its second occurrence."""
    root = Path(cfg.image_root) if cfg.image_root else (
        Path(cfg.pairs).parent if Path(cfg.pairs).is_file() else Path("."))
    pairs = Pairs(cfg.pairs, dict(cfg.fields), cfg.limit, root)
    digests, empty = bytearray(), bytearray()  # 17 bytes per pair, not Python objects
    with Progress(cfg.limit, "condense: reading pairs") as bar:
        for _, rec in pairs.records():
            digests += key_digest(rec["key"])
            empty.append(not rec["caption"].strip())
            bar.update(1)
    pairs.n = len(empty)
    pairs.digests = np.frombuffer(bytes(digests), dtype="S16").copy()
    pairs.empty_caption = np.frombuffer(bytes(empty), dtype=np.uint8).astype(bool)
    if pairs.n == 0:
        raise DataError("no records", file=cfg.pairs)
    order = np.argsort(pairs.digests, kind="stable")
    dup = pairs.digests[order][1:] == pairs.digests[order][:-1]
    if dup.any():
        second = int(order[1:][dup].min())
        first = int(order[np.searchsorted(pairs.digests[order], pairs.digests[second])])
        seen: dict[int, Record] = {r: rec for r, rec in pairs.records() if r in (first, second)}
        raise seen[second].error("key", f"duplicate key {seen[second]['key']!r} "
                                 f"(first at {seen[first].loc})")
    return pairs


# --------------------------------------------------------------------------- stage plumbing


@dataclass
class Ctx:
    """Everything a stage needs: the config, the work dir, the pairs index, the rank."""

    cfg: "CondenseConfig"
    work: Path
    pairs: Pairs
    rank: int = 0
    world: int = 1
    inputs: dict[str, Any] = field(default_factory=dict)  # input fingerprints (enter embed's hash)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished stages' counts
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished stages' info

    def kept(self, stage: str) -> int:
        return int(self.counts[stage]["kept"])


@dataclass
class Result:
    """A finished stage: ``counts`` = {in, kept, dropped}; ``dropped_rows`` = [[row, reason]]
    (at most :data:`DROPPED_SAMPLE`); ``info`` = anything later stages or the manifest need."""

    counts: dict[str, Any]
    dropped_rows: list[list[Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage: where it writes, what it depends on, its units and how to run and finish it."""

    name: str
    dir: str  # its folder in the work dir (holds _STAGE.json)
    files: tuple[str, ...]  # other work files it owns (removed when it is redone)
    params: Callable[[Ctx], dict[str, Any]]
    units: Callable[[Ctx], list[int]]
    done: Callable[[Ctx, int], bool]
    run_units: Callable[[Ctx, list[int]], None]
    finish: Callable[[Ctx], Result]
    distributed: bool = False  # units split across ranks (index mod world size)


def _counts(n_in: int, kept: int, dropped: dict[str, int] | None = None) -> dict[str, Any]:
    return {"in": int(n_in), "kept": int(kept), "dropped": {k: int(v) for k, v in (dropped or {}).items() if v}}


def _no_units(ctx: Ctx) -> list[int]:
    return []


def _never(ctx: Ctx, unit: int) -> bool:
    return False


def _nothing(ctx: Ctx, units: list[int]) -> None:
    return None


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _emb_shards(ctx: Ctx) -> list[int]:
    return list(range(math.ceil(ctx.pairs.n / ctx.cfg.shard_rows)))


def _emb_path(ctx: Ctx, s: int) -> Path:
    return ctx.work / "emb" / _shard_name(s)


# --------------------------------------------------------------------------- 0 embed


def _embed_done(ctx: Ctx, s: int) -> bool:
    return _emb_path(ctx, s).exists()


def _embed_run(ctx: Ctx, shards: list[int]) -> None:
    if ctx.cfg.embeddings:
        import_embeddings(ctx, shards)
    else:
        embed_with_clip(ctx, shards)


def embed_with_clip(ctx: Ctx, shards: list[int]) -> None:
    """Embed the given shards' images and captions with CLIP, one pass over ``--pairs``."""
    from mmkit.core.models import load_model

    cfg, todo = ctx.cfg, set(shards)
    lm = load_model(cfg.clip, "dual-encoder", device=cfg.device, revision=cfg.revision)
    rows_per = cfg.shard_rows
    buffer: list[tuple[int, Record]] = []
    with Progress(len(todo), "condense: embed shards") as bar:
        for row, rec in ctx.pairs.records():
            if row // rows_per in todo:
                buffer.append((row, rec))
            if (row + 1) % rows_per == 0 or row + 1 == ctx.pairs.n:
                if buffer:
                    _embed_shard(ctx, lm, row // rows_per, buffer)
                    bar.update(1)
                buffer = []


def _embed_shard(ctx: Ctx, lm: Any, s: int, recs: list[tuple[int, Record]]) -> None:
    """L2-normalised float32 features, ``clip_score`` = their dot product, stored as float16."""
    from mmkit.core.data import load_image
    from mmkit.core.embed import encode_images, encode_texts

    cfg = ctx.cfg
    dropped: dict[str, list[int]] = {"empty_caption": [], "unreadable_image": []}
    rows, img_parts, txt_parts = [], [], []
    for start in range(0, len(recs), EMBED_CHUNK):
        images, captions = [], []
        for row, rec in recs[start:start + EMBED_CHUNK]:
            if not rec["caption"].strip():
                dropped["empty_caption"].append(row)
                continue
            try:
                images.append(load_image(rec["image"], ctx.pairs.image_root))
            except DataError as exc:
                if exc.__cause__ is None:  # missing file or URL: malformed input, not a drop
                    raise rec.error("image", f"{exc.message}: {exc.file}") from None
                dropped["unreadable_image"].append(row)  # exists but cannot be read or decoded
                continue
            rows.append(row)
            captions.append(rec["caption"])
        if images:
            img_parts.append(encode_images(images, loaded=lm, batch_size=cfg.batch_size, use_cache=False,
                                           progress=False))
            txt_parts.append(encode_texts(captions, loaded=lm, pooling="projected", max_length=CLIP_TEXT_LENGTH,
                                          batch_size=cfg.batch_size, use_cache=False, progress=False))
    d = int(img_parts[0].shape[1]) if img_parts else int(lm.model.config.projection_dim)
    img = np.concatenate(img_parts) if img_parts else np.zeros((0, d), dtype=np.float32)
    txt = np.concatenate(txt_parts) if txt_parts else np.zeros((0, d), dtype=np.float32)
    _write_emb_shard(ctx, s, np.asarray(rows, dtype=np.int64), img, txt, dropped,
                     {"model": lm.id, "revision": lm.revision})


def _write_emb_shard(ctx: Ctx, s: int, rows: np.ndarray, img: np.ndarray, txt: np.ndarray,
                     dropped: dict[str, list[int]], model: dict[str, Any]) -> None:
    """Normalise in float32, score, store: row int64, image f16, clip_score f32 (+ text f16)."""
    img = _unit(img)
    txt = _unit(txt)
    tensors = {"row": rows, "image": img.astype(np.float16),
               "clip_score": np.einsum("ij,ij->i", img, txt).astype(np.float32)}
    if ctx.cfg.store_text_emb:
        tensors["text"] = txt.astype(np.float16)
    meta = {"model": model.get("model"), "revision": model.get("revision"), "dim": int(img.shape[1]),
            "dropped": {k: v for k, v in dropped.items() if v}}
    save_tensors(_emb_path(ctx, s), tensors, meta)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _embed_finish(ctx: Ctx) -> Result:
    dropped: dict[str, int] = {}
    sample: list[list[Any]] = []
    kept, model, dims = 0, {}, set()
    for s in _emb_shards(ctx):
        meta = tensor_meta(_emb_path(ctx, s))
        kept += len(load_tensors(_emb_path(ctx, s), ("row",))["row"])
        dims.add(meta["dim"])
        model = {"id": meta.get("model"), "revision": meta.get("revision")}
        for reason, rows in meta["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + len(rows)
            sample += [[r, reason] for r in rows]
    sample.sort()
    dims.discard(0)
    info = {"dim": dims.pop() if dims else 0, "model": model if model.get("id") else None}
    return Result(_counts(ctx.pairs.n, kept, dropped), sample[:DROPPED_SAMPLE], info)


# ----------------------------------------------------------------- 0 embed from --embeddings


@dataclass(frozen=True)
class InShard:
    """One input embedding shard: its files and a reader giving (rows, image, clip_score, text)."""

    name: str
    read: Callable[[Ctx], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]


def embedding_shards(directory: str) -> list[InShard]:
    """The shards of ``--embeddings DIR``: clip-retrieval (``img_emb/``, ``text_emb/``,
    ``metadata/``) or mmkit (``shard-NNNNN.safetensors``, also under ``emb/``)."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError("no such directory", file=directory, field="--embeddings")
    if (root / "img_emb").is_dir():
        shards = []
        for img in sorted((root / "img_emb").glob("img_emb_*.npy")):
            num = img.stem.removeprefix("img_emb_")
            txt, meta = root / "text_emb" / f"text_emb_{num}.npy", root / "metadata" / f"metadata_{num}.parquet"
            for need in (txt, meta):
                if not need.is_file():
                    raise DataError(f"missing (the partner of {img.name})", file=str(need), field="--embeddings")
            shards.append(InShard(str(img), _clip_retrieval_reader(img, txt, meta)))
        if not shards:
            raise DataError("no img_emb/img_emb_NNNN.npy files", file=directory, field="--embeddings")
        return shards
    base = root / "emb" if not list(root.glob("shard-*.safetensors")) and (root / "emb").is_dir() else root
    files = sorted(base.glob("shard-*.safetensors"))
    if not files:
        raise DataError("expected the mmkit layout (shard-NNNNN.safetensors) or the clip-retrieval layout "
                        "(img_emb/, text_emb/, metadata/)", file=directory, field="--embeddings")
    return [InShard(str(f), _mmkit_reader(f)) for f in files]


def _mmkit_reader(path: Path):
    def read(ctx: Ctx):
        t = load_tensors(path)
        for name in ("row", "image", "clip_score"):
            if name not in t:
                raise DataError("missing tensor", file=str(path), field=name)
        n = {k: len(v) for k, v in t.items()}
        if len(set(n.values())) != 1:
            raise DataError(f"row counts differ: {n}", file=str(path), field="rows")
        return t["row"].astype(np.int64), t["image"], t["clip_score"].astype(np.float32), t.get("text")
    return read


def _clip_retrieval_reader(img: Path, txt: Path, meta: Path):
    def read(ctx: Ctx):
        import pyarrow.parquet as pq

        image = np.load(img, mmap_mode="r", allow_pickle=False)
        text = np.load(txt, mmap_mode="r", allow_pickle=False)
        table = pq.read_table(meta, columns=None)
        if "key" not in table.column_names:
            raise DataError(f"no 'key' column (columns: {', '.join(table.column_names)})", file=str(meta),
                            field="key")
        if not (len(image) == len(text) == table.num_rows):
            raise DataError(f"row counts differ: {len(image)} image rows, {len(text)} text rows, "
                            f"{table.num_rows} metadata rows", file=str(img), field="rows")
        keys = [str(k) for k in table.column("key").to_pylist()]
        rows = ctx.pairs.lookup(np.array([key_digest(k) for k in keys], dtype="S16"))
        missing = np.flatnonzero(rows < 0)
        if len(missing) and ctx.cfg.limit is None:
            i = int(missing[0])
            raise DataError(f"key {keys[i]!r} is not in --pairs", file=str(meta), line=f"row {i + 1}", field="key")
        ok = rows >= 0
        img_u, txt_u = _unit(image[ok]), _unit(text[ok])
        return rows[ok], img_u, np.einsum("ij,ij->i", img_u, txt_u).astype(np.float32), txt_u
    return read


def import_embeddings(ctx: Ctx, shards: list[int]) -> None:
    """Re-shard ``--embeddings`` by row range: each input shard is split into fragments per
    output shard (``emb/import/``), then each output shard is assembled from its fragments."""
    cfg, work = ctx.cfg, ctx.work / "emb" / "import"
    inputs = embedding_shards(cfg.embeddings)
    dim: int | None = None
    with Progress(len(inputs), "condense: import embedding shards") as bar:
        for i, shard in enumerate(inputs):
            marker = work / "_done" / f"{i:05d}"
            if marker.exists():
                bar.update(1)
                continue
            rows, image, clip, text = shard.read(ctx)
            if image.ndim != 2 or (dim is not None and image.shape[1] != dim):
                raise DataError(f"image embeddings have shape {image.shape}, expected [n, {dim}]",
                                file=shard.name, field="image")
            dim = int(image.shape[1])
            inside = rows < ctx.pairs.n
            if not inside.all() and cfg.limit is None:
                raise DataError(f"row {int(rows[~inside][0])} is outside --pairs ({ctx.pairs.n} records)",
                                file=shard.name, field="row")
            out = rows[inside] // cfg.shard_rows
            for s in np.unique(out).tolist():
                take = np.flatnonzero(inside)[out == s]
                frag = {"row": rows[take], "image": np.asarray(image[take], dtype=np.float16),
                        "clip_score": clip[take]}
                if text is not None and cfg.store_text_emb:
                    frag["text"] = np.asarray(text[take], dtype=np.float16)
                save_tensors(work / f"to-{s:05d}" / f"from-{i:05d}.safetensors", frag)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            bar.update(1)
    any_fragment = next(work.glob("to-*/from-*.safetensors"), None)
    if any_fragment is None:
        raise DataError("no embedding matches a record of --pairs", file=cfg.embeddings, field="--embeddings")
    dim = int(load_tensors(any_fragment, ("image",))["image"].shape[1])
    for s in shards:
        _assemble_shard(ctx, s, work / f"to-{s:05d}", dim)


def _assemble_shard(ctx: Ctx, s: int, folder: Path, dim: int) -> None:
    cfg = ctx.cfg
    lo, hi = s * cfg.shard_rows, min((s + 1) * cfg.shard_rows, ctx.pairs.n)
    parts = [load_tensors(f) for f in sorted(folder.glob("from-*.safetensors"))]
    if parts:
        t = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    else:
        t = {"row": np.zeros(0, np.int64), "image": np.zeros((0, dim), np.float16),
             "clip_score": np.zeros(0, np.float32)}
    order = np.argsort(t["row"], kind="stable")
    t = {k: v[order] for k, v in t.items()}
    twice = np.flatnonzero(np.diff(t["row"]) == 0)
    if len(twice):
        raise DataError(f"row {int(t['row'][twice[0]])} has two embeddings", file=cfg.embeddings, field="key")
    have = np.zeros(hi - lo, dtype=bool)
    have[t["row"] - lo] = True
    empty = ctx.pairs.empty_caption[lo:hi]
    keep = ~empty[t["row"] - lo]
    rows = t["row"][keep]
    dropped = {"empty_caption": (np.flatnonzero(empty) + lo).tolist(),
               "no_embedding": (np.flatnonzero(~have & ~empty) + lo).tolist()}
    tensors = {"row": rows, "image": t["image"][keep], "clip_score": t["clip_score"][keep]}
    if "text" in t:
        tensors["text"] = t["text"][keep]
    meta = {"model": None, "revision": None, "dim": int(tensors["image"].shape[1]), "dropped": dropped}
    save_tensors(_emb_path(ctx, s), tensors, meta)


def embeddings_model(directory: str) -> dict[str, Any] | None:
    """The model an mmkit-layout ``--embeddings`` shard header names, if any."""
    shards = embedding_shards(directory)
    if not shards or not shards[0].name.endswith(".safetensors"):
        return None
    meta = tensor_meta(Path(shards[0].name))
    return {"id": meta["model"], "revision": meta.get("revision")} if meta.get("model") else None


# --------------------------------------------------------------------------- 1 kmeans


def auto_clusters(n: int) -> int:
    """``--clusters auto`` = clamp(round(N / 20,000), 1, 100,000) (build.md §2)."""
    return min(max(round(n / 20_000), 1), 100_000)


def _centroids_path(ctx: Ctx) -> Path:
    return ctx.work / "centroids.safetensors"


def load_centroids(path: str) -> np.ndarray:
    """``--centroids FILE``: npy (``allow_pickle=False``) or safetensors (one k x d tensor)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("no such file", file=path, field="--centroids")
    if p.suffix == ".npy":
        c = np.load(p, allow_pickle=False)
    elif p.suffix == ".safetensors":
        t = load_tensors(p)
        c = t.get("centroids", next(iter(t.values())) if len(t) == 1 else None)
        if c is None:
            raise DataError(f"expected one tensor or 'centroids', found {', '.join(t)}", file=path, field="--centroids")
    else:
        raise DataError("expected a .npy or .safetensors file", file=path, field="--centroids")
    if c.ndim != 2 or not np.isfinite(c).all():
        raise DataError(f"expected a finite k x d matrix, got shape {c.shape}", file=path, field="--centroids")
    return np.ascontiguousarray(c, dtype=np.float32)


def _kmeans_finish(ctx: Ctx) -> Result:
    cfg = ctx.cfg
    n, d = ctx.kept("embed"), ctx.info["embed"]["dim"]
    if cfg.centroids:
        centroids = load_centroids(cfg.centroids)
        if centroids.shape[1] != d:
            raise DataError(f"centroids have dimension {centroids.shape[1]}, the embeddings {d}",
                            file=cfg.centroids, field="--centroids")
        source = "file"
    else:
        centroids = train_centroids(ctx, n, d)
        source = "kmeans"
    save_tensors(_centroids_path(ctx), {"centroids": centroids}, {"k": len(centroids), "d": d, "source": source})
    return Result(_counts(n, n), info={"k": int(len(centroids))})


def train_centroids(ctx: Ctx, n: int, d: int) -> np.ndarray:
    """k-means on a seeded uniform sample of min(N, points-per-centroid x k) rows per epoch,
    read shard by shard; each epoch warm-starts from the previous centroids."""
    from mmkit.core.kmeans import kmeans

    cfg = ctx.cfg
    k = auto_clusters(n) if cfg.clusters == "auto" else int(cfg.clusters)
    size = min(n, cfg.kmeans_points_per_centroid * k)
    centroids = None
    for epoch in range(cfg.kmeans_epochs):
        picks = np.sort(stable_rng(cfg.seed, "condense", "kmeans-sample", epoch).choice(n, size=size, replace=False))
        x = np.empty((size, d), dtype=np.float32)
        at = offset = 0
        for s in _emb_shards(ctx):
            image = load_tensors(_emb_path(ctx, s), ("image",))["image"]
            local = picks[(picks >= offset) & (picks < offset + len(image))] - offset
            x[at:at + len(local)] = image[local]
            at, offset = at + len(local), offset + len(image)
        result = kmeans(x, k, iters=cfg.kmeans_iters, init="auto", spherical=cfg.kmeans_spherical,
                        init_centroids=centroids, seed=cfg.seed)
        centroids = result.centroids
        log.info("condense kmeans epoch %d/%d: k=%d on %d rows, inertia %.4g", epoch + 1, cfg.kmeans_epochs,
                 k, size, result.inertia)
    assert centroids is not None
    return centroids


# --------------------------------------------------------------------------- 2 assign


def _assign_path(ctx: Ctx, s: int) -> Path:
    return ctx.work / "assign" / _shard_name(s)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact L2 nearest centroid of each row (faiss, else scikit-learn), via core/kmeans.py."""
    from mmkit.core.kmeans import BACKENDS, _resolve_backend

    return BACKENDS[_resolve_backend("auto")].assign(x, centroids)


ASSIGN_BLOCK = 65_536  # rows upcast to float32 at once while assigning


def assign_rows(x: np.ndarray, centroids: np.ndarray) -> dict[str, np.ndarray]:
    """``cluster`` (nearest centroid), ``dist`` (Euclidean to the raw centroid) and ``cos``
    (cosine to the L2-normalised centroid) of each row of ``x`` (float32)."""
    cluster = nearest_centroid(x, centroids).astype(np.int32)
    c = centroids[cluster]
    dist = np.linalg.norm(x - c, axis=1).astype(np.float32)
    cos = np.einsum("ij,ij->i", _unit(x), _unit(c)).astype(np.float32)
    return {"cluster": cluster, "dist": dist, "cos": cos}


def _assign_run(ctx: Ctx, shards: list[int]) -> None:
    centroids = load_tensors(_centroids_path(ctx))["centroids"]
    with Progress(len(shards), "condense: assign shards") as bar:
        for s in shards:
            t = load_tensors(_emb_path(ctx, s), ("row", "image"))
            blocks = [assign_rows(t["image"][i:i + ASSIGN_BLOCK].astype(np.float32), centroids)
                      for i in range(0, max(len(t["row"]), 1), ASSIGN_BLOCK)]
            out = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
            save_tensors(_assign_path(ctx, s), {"row": t["row"], **out})
            bar.update(1)


def _assign_finish(ctx: Ctx) -> Result:
    cfg = ctx.cfg
    k = ctx.info["kmeans"]["k"]
    sizes = np.zeros(k, dtype=np.int64)
    for s in _emb_shards(ctx):
        sizes += np.bincount(load_tensors(_assign_path(ctx, s), ("cluster",))["cluster"], minlength=k)
    empty = int((sizes == 0).sum())
    if empty:
        ctx.warnings.append(f"kmeans: {empty} of {k} clusters are empty")
        log.warning("kmeans: %d of %d clusters are empty", empty, k)
    giant = np.flatnonzero(sizes > cfg.max_cluster_size)
    n = ctx.kept("embed")
    if len(giant):
        log.warning("%d giant cluster(s) over %d members (policy %s): %s", len(giant), cfg.max_cluster_size,
                    cfg.giant_cluster, ", ".join(f"{c} ({sizes[c]})" for c in giant[:10]))
    if cfg.giant_cluster != "drop" or not len(giant):
        return Result(_counts(n, n), info={"giant": giant.tolist()})
    rows = [t["row"][np.isin(t["cluster"], giant)] for t in
            (load_tensors(_assign_path(ctx, s), ("row", "cluster")) for s in _emb_shards(ctx))]
    n_drop = int(sizes[giant].sum())
    sample = [[r, "giant_cluster"] for r in first_rows(np.concatenate(rows))]
    return Result(_counts(n, n - n_drop, {"giant_cluster": n_drop}), sample, {"giant": giant.tolist()})


# --------------------------------------------------------------------------- 3 partition


def auto_buckets(n: int) -> int:
    """``--buckets`` default: max(1, ceil(N / 500,000))."""
    return max(1, math.ceil(n / 500_000))


def _buckets(ctx: Ctx) -> int:
    return ctx.cfg.buckets or auto_buckets(ctx.kept("assign"))


def _partition_done(ctx: Ctx, s: int) -> bool:
    return (ctx.work / "part" / "_done" / f"{s:05d}").exists()


def _partition_run(ctx: Ctx, shards: list[int]) -> None:
    """Append each assign shard's rows to its buckets' fragment files (bucket = cluster mod B)."""
    drop = np.asarray(ctx.info["assign"]["giant"] if ctx.cfg.giant_cluster == "drop" else [], dtype=np.int32)
    n_buckets = _buckets(ctx)
    with Progress(len(shards), "condense: partition shards") as bar:
        for s in shards:
            t = {**load_tensors(_emb_path(ctx, s), ("row", "image", "clip_score")),
                 **load_tensors(_assign_path(ctx, s), ("cluster", "dist", "cos"))}
            keep = ~np.isin(t["cluster"], drop)
            bucket = t["cluster"] % n_buckets
            for b in np.unique(bucket[keep]).tolist():
                take = keep & (bucket == b)
                save_tensors(ctx.work / "part" / f"bucket-{b:05d}" / f"from-{s:05d}.safetensors",
                             {k: v[take] for k, v in t.items()})
            marker = ctx.work / "part" / "_done" / f"{s:05d}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            bar.update(1)


def _partition_finish(ctx: Ctx) -> Result:
    n = ctx.kept("assign")
    return Result(_counts(n, n), info={"buckets": _buckets(ctx)})


# --------------------------------------------------------------------------- 4 dedup


def _dedup_path(ctx: Ctx, b: int) -> Path:
    return ctx.work / "dedup" / f"bucket-{b:05d}.safetensors"


def _dedup_units(ctx: Ctx) -> list[int]:
    return list(range(ctx.info["partition"]["buckets"]))


def _dedup_done(ctx: Ctx, b: int) -> bool:
    return _dedup_path(ctx, b).exists()


def _dedup_run(ctx: Ctx, buckets: list[int]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Progress(len(buckets), "condense: dedup buckets") as bar, \
            ThreadPoolExecutor(max_workers=max(1, ctx.cfg.num_workers)) as pool:
        for _ in pool.map(lambda b: dedup_bucket(ctx, b), buckets):
            bar.update(1)


def split_cluster(x: np.ndarray, max_size: int, seed: int, cluster: int, iters: int) -> np.ndarray:
    """``--giant-cluster split``: seeded k-means of a giant cluster's members into
    ceil(n / max) sub-clusters (fewer if it has fewer distinct rows); the sub-cluster per row."""
    from mmkit.core.kmeans import kmeans

    k = min(math.ceil(len(x) / max_size), len(np.unique(x, axis=0)))
    if k <= 1:
        return np.zeros(len(x), dtype=np.int32)
    result = kmeans(x, k, iters=iters, init="auto", seed=stable_seed(seed, "condense", "split", cluster) % 2**31)
    return result.assignments.astype(np.int32)


def dedup_bucket(ctx: Ctx, b: int) -> None:
    """Per cluster (ascending id; members by row), split giants if asked, then keep one
    representative per near-duplicate component (build.md §2, dedup)."""
    cfg = ctx.cfg
    frags = sorted((ctx.work / "part" / f"bucket-{b:05d}").glob("from-*.safetensors"))
    names = ("row", "image", "clip_score", "cluster", "dist", "cos")
    parts = [load_tensors(f, names) for f in frags]
    t = {k: np.concatenate([p[k] for p in parts]) for k in names} if parts else {
        "row": np.zeros(0, np.int64), "image": np.zeros((0, 1), np.float16), "clip_score": np.zeros(0, np.float32),
        "cluster": np.zeros(0, np.int32), "dist": np.zeros(0, np.float32), "cos": np.zeros(0, np.float32)}
    order = np.argsort(t["cluster"], kind="stable")  # fragments are in row order, so rows stay ascending
    clusters, starts = np.unique(t["cluster"][order], return_index=True)
    kept_idx, subs, comp_sizes = [], [], []
    for c, lo, hi in zip(clusters.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
        members = order[lo:hi]
        x = t["image"][members].astype(np.float32)
        sub = (split_cluster(x, cfg.max_cluster_size, cfg.seed, c, cfg.kmeans_iters)
               if cfg.giant_cluster == "split" and len(members) > cfg.max_cluster_size
               else np.zeros(len(members), dtype=np.int32))
        for sc in np.unique(sub).tolist():
            m = np.flatnonzero(sub == sc)
            keep, size = sel.dedup_cluster(x[m], t["dist"][members[m]], t["clip_score"][members[m]],
                                           t["row"][members[m]], c, threshold=cfg.dedup_threshold,
                                           representative=cfg.representative, seed=cfg.seed, tile=cfg.dedup_tile)
            kept_idx.append(members[m[keep]])
            subs.append(np.full(len(keep), sc, dtype=np.int32))
            comp_sizes.append(size.astype(np.int64))
    kept = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
    sub_all = np.concatenate(subs) if subs else np.zeros(0, np.int32)
    size_all = np.concatenate(comp_sizes) if comp_sizes else np.zeros(0, np.int64)
    by_row = np.argsort(t["row"][kept], kind="stable")
    kept, sub_all, size_all = kept[by_row], sub_all[by_row], size_all[by_row]
    is_kept = np.zeros(len(t["row"]), dtype=bool)
    is_kept[kept] = True
    save_tensors(_dedup_path(ctx, b), {
        "row": t["row"][kept], "cluster": t["cluster"][kept].astype(np.int32), "subcluster": sub_all,
        "clip_score": t["clip_score"][kept].astype(np.float32), "cos": t["cos"][kept].astype(np.float32),
        "component_size": size_all,
    }, {"in": int(len(t["row"])), "dropped": first_rows(t["row"][~is_kept])})


def _dedup_finish(ctx: Ctx) -> Result:
    n_in, kept, sample = 0, 0, []
    for b in _dedup_units(ctx):
        meta = tensor_meta(_dedup_path(ctx, b))
        n_in += meta["in"]
        kept += len(load_tensors(_dedup_path(ctx, b), ("row",))["row"])
        sample += meta["dropped"]
    if n_in != ctx.kept("partition"):
        raise RuntimeError(f"dedup read {n_in} rows, partition kept {ctx.kept('partition')}")
    return Result(_counts(n_in, kept, {"duplicate": n_in - kept}),
                  [[r, "duplicate"] for r in first_rows(np.asarray(sample, dtype=np.int64))])


def dedup_columns(ctx: Ctx, names: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """The named columns of each dedup bucket, in bucket order."""
    for b in _dedup_units(ctx):
        yield load_tensors(_dedup_path(ctx, b), names)


# --------------------------------------------------------------------------- 5, 6 bands


def _band_finish(ctx: Ctx, stage: str, column: str, band: tuple[float, float], upstream_rows: Path | None,
                 out: Path, reason: str, absolute: tuple[float | None, float | None] = (None, None)) -> Result:
    """Keep the survivors ranked [floor(lo·M), floor(hi·M)) by ``column`` descending (ties by row),
    after the optional absolute filters ``column >= min`` / ``<= max``."""
    cfg = ctx.cfg
    allowed = load_rows(upstream_rows) if upstream_rows is not None else None
    lo_abs, hi_abs = absolute

    def filtered(apply_abs: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for t in dedup_columns(ctx, ("row", column)):
            score, rows = t[column], t["row"]
            keep = np.ones(len(rows), dtype=bool) if allowed is None else _member(rows, allowed)
            if apply_abs and lo_abs is not None:
                keep &= score >= lo_abs
            if apply_abs and hi_abs is not None:
                keep &= score <= hi_abs
            yield score[keep], rows[keep]

    n_in = sum(len(r) for _, r in filtered(False))
    m = sum(len(r) for _, r in filtered(True))
    dropped: dict[str, int] = {}
    if lo_abs is not None or hi_abs is not None:
        for name, bound, cmp in (("clip_min", lo_abs, np.less), ("clip_max", hi_abs, np.greater)):
            if bound is not None:
                dropped[name] = sum(int(cmp(s, bound).sum()) for s, _ in filtered(False))
    kept = sel.band_select(lambda: filtered(True), m, band[0], band[1], cfg.max_memory_bytes)
    dropped[reason] = m - len(kept)
    save_rows(out, kept)
    gone = [r[~_member(r, kept)] for _, r in filtered(False)]
    sample = first_rows(np.concatenate(gone)) if gone else []
    reasons = _reason_of(ctx, column, sample, kept, lo_abs, hi_abs, reason)
    return Result(_counts(n_in, len(kept), dropped), [[r, reasons[r]] for r in sample])


def _reason_of(ctx: Ctx, column: str, rows: list[int], kept: np.ndarray, lo_abs, hi_abs,
               reason: str) -> dict[int, str]:
    """The drop reason of each sampled dropped row (absolute filters first, then the band)."""
    want = np.asarray(rows, dtype=np.int64)
    out = {}
    for t in dedup_columns(ctx, ("row", column)):
        hit = _member(t["row"], want)
        for r, s in zip(t["row"][hit].tolist(), t[column][hit].tolist()):
            out[r] = ("clip_min" if lo_abs is not None and s < lo_abs else
                      "clip_max" if hi_abs is not None and s > hi_abs else reason)
    return out


def _member(rows: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Whether each row is in the sorted array ``sorted_set``."""
    if not len(sorted_set):
        return np.zeros(len(rows), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, rows), len(sorted_set) - 1)
    return sorted_set[pos] == rows


def _clip_band_finish(ctx: Ctx) -> Result:
    cfg = ctx.cfg
    return _band_finish(ctx, "clip-band", "clip_score", tuple(cfg.clip_band), None, ctx.work / "clip_band.rows.npy",
                        "clip_band", (cfg.clip_min, cfg.clip_max))


def _centroid_band_finish(ctx: Ctx) -> Result:
    return _band_finish(ctx, "centroid-band", "cos", tuple(ctx.cfg.centroid_band), ctx.work / "clip_band.rows.npy",
                        ctx.work / "centroid_band.rows.npy", "centroid_band")


# --------------------------------------------------------------------------- 7 sample


def _sample_finish(ctx: Ctx) -> Result:
    cfg = ctx.cfg
    survivors = load_rows(ctx.work / "centroid_band.rows.npy")
    kept, m = sel.sample_rows(sel.iter_chunks(survivors), cfg.target, cfg.seed)
    if cfg.target >= m:
        msg = f"target_not_reached: --target {cfg.target} but only {m} pairs survive the filters; keeping all"
        ctx.warnings.append(msg)
        log.warning(msg)
    save_rows(ctx.work / "sample.rows.npy", kept)
    sample = first_rows(survivors[~_member(survivors, kept)])
    return Result(_counts(m, len(kept), {"not_sampled": m - len(kept)}), [[r, "not_sampled"] for r in sample])


# --------------------------------------------------------------------------- 8 export


def final_columns(ctx: Ctx, rows: np.ndarray) -> dict[str, np.ndarray]:
    """clip_score, cluster and cos of the final rows (sorted), from the dedup buckets."""
    parts = []
    for t in dedup_columns(ctx, ("row", "clip_score", "cluster", "cos")):
        hit = _member(t["row"], rows)
        parts.append({k: v[hit] for k, v in t.items()})
    cols = {k: np.concatenate([p[k] for p in parts]) for k in ("row", "clip_score", "cluster", "cos")}
    order = np.argsort(cols["row"])
    return {k: v[order] for k, v in cols.items()}


def gather_pairs(ctx: Ctx, rows: np.ndarray) -> Iterator[tuple[int, Record]]:
    """The ``--pairs`` records at ``rows`` (sorted, unique), streamed in row order."""
    i = 0
    for row, rec in ctx.pairs.records():
        if i == len(rows):
            return
        if rows[i] == row:
            i += 1
            yield row, rec


def llava_prompt(prompts: list[str], seed: int, row: int) -> str:
    """The prompt of one row: ``prompts[stable_seed(seed, "llava-prompt", row) mod len]``."""
    return prompts[stable_seed(seed, "llava-prompt", row) % len(prompts)]


def _item(fmt: str, ctx: Ctx, rec: Record, row: int, cols: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    if fmt == "llava":
        return {"id": rec["key"], "image": rec["image"], "conversations": [
            {"from": "human", "value": "<image>\n" + llava_prompt(ctx.cfg.llava_prompt, ctx.cfg.seed, row)},
            {"from": "gpt", "value": rec["caption"]}]}
    return {"key": rec["key"], "image": rec["image"], "caption": rec["caption"],
            "clip_score": float(cols["clip_score"][i]), "cluster": int(cols["cluster"][i]),
            "cos_to_centroid": float(cols["cos"][i])}


def export(ctx: Ctx, out: Path, dropped: list[tuple[int, str, str]]) -> None:
    """Write the kept pairs (``--format``), ``dropped.jsonl`` (``(row, stage, reason)`` joined
    with their keys) and a copy of the centroids to ``out``."""
    import shutil

    from mmkit.io import write_jsonl

    cfg = ctx.cfg
    rows = load_rows(ctx.work / "sample.rows.npy")
    cols = final_columns(ctx, rows)
    drop_rows = {r for r, _, _ in dropped}
    keys: dict[int, str] = {}
    writer = EXPORTERS.resolve(cfg.format, field="format")(out)
    with Progress(len(rows), f"condense: export ({cfg.format})") as bar:
        i = 0
        for row, rec in gather_pairs(ctx, np.union1d(rows, np.fromiter(drop_rows, dtype=np.int64))):
            if row in drop_rows:
                keys[row] = rec["key"]
            if i < len(rows) and rows[i] == row:
                writer.add(_item(cfg.format, ctx, rec, row, cols, i))
                i += 1
                bar.update(1)
    writer.close()
    write_jsonl(out / "dropped.jsonl", ({"key": keys[r], "row": r, "stage": stage, "reason": reason}
                                        for r, stage, reason in dropped))
    shutil.copyfile(ctx.work / "centroids.safetensors", out / "centroids.safetensors")


EXPORT_COLUMNS = {"key": "string", "image": "string", "caption": "string", "clip_score": "float64",
                  "cluster": "int64", "cos_to_centroid": "float64"}


class _PartWriter:
    """``data/part-NNNNN.<ext>``, at most :data:`PART_ROWS` rows each (rows arrive sorted)."""

    def __init__(self, out: Path, ext: str) -> None:
        self.out, self.ext, self.items, self.part = out / "data", ext, [], 0

    def add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        if len(self.items) == PART_ROWS:
            self.flush()

    def close(self) -> None:
        if self.items or self.part == 0:
            self.flush()

    def flush(self) -> None:
        path = self.out / f"part-{self.part:05d}.{self.ext}"
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ext == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            from mmkit.io import atomic_write

            schema = pa.schema([(k, getattr(pa, t)()) for k, t in EXPORT_COLUMNS.items()])
            with atomic_write(path, "wb") as fh:
                pq.write_table(pa.Table.from_pylist(self.items, schema=schema), fh)
        else:
            from mmkit.io import write_jsonl

            write_jsonl(path, self.items)
        self.items, self.part = [], self.part + 1


class _LlavaWriter:
    """``pretrain.json``: a JSON array written item by item (2-space indent, like json.dump)."""

    def __init__(self, out: Path) -> None:
        from mmkit.io import atomic_write

        self._ctx = atomic_write(out / "pretrain.json")
        self.fh = self._ctx.__enter__()
        self.n = 0

    def add(self, item: dict[str, Any]) -> None:
        text = json.dumps(item, indent=2, ensure_ascii=False)
        self.fh.write(("[\n" if self.n == 0 else ",\n") + "\n".join("  " + line for line in text.splitlines()))
        self.n += 1

    def close(self) -> None:
        self.fh.write("\n]\n" if self.n else "[]\n")
        self._ctx.__exit__(None, None, None)


def _parquet_writer(out: Path) -> "_PartWriter":
    return _PartWriter(out, "parquet")


def _jsonl_writer(out: Path) -> "_PartWriter":
    return _PartWriter(out, "jsonl")


#: ``--format`` -> writer factory(out) with ``add(item)`` and ``close()``
EXPORTERS: Registry = Registry("export format")
EXPORTERS.register("parquet", _parquet_writer)
EXPORTERS.register("jsonl", _jsonl_writer)
EXPORTERS.register("llava", _LlavaWriter)


# --------------------------------------------------------------------------- funnel


def funnel_rows(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage: stage, in, kept, % of the stage input, % of the original input, drops."""
    total = stages[0]["in"] if stages else 0
    return [{"stage": s["name"], "in": s["in"], "kept": s["kept"],
             "pct_of_stage_input": round(100.0 * s["kept"] / s["in"], 4) if s["in"] else None,
             "pct_of_input": round(100.0 * s["kept"] / total, 4) if total else None,
             "dropped": dict(s["dropped"])} for s in stages]


def write_funnel(out: Path, rows: list[dict[str, Any]]) -> None:
    """``funnel.json``, ``funnel.csv`` and ``funnel.png`` (log-scale horizontal bars)."""
    from mmkit.io import atomic_write, write_json

    write_json(out / "funnel.json", rows)
    with atomic_write(out / "funnel.csv") as fh:
        fh.write("stage,in,kept,pct_of_stage_input,pct_of_input,dropped\n")
        for r in rows:
            drops = ";".join(f"{k}={v}" for k, v in r["dropped"].items())
            fh.write(f"{r['stage']},{r['in']},{r['kept']},{_fmt(r['pct_of_stage_input'])},"
                     f"{_fmt(r['pct_of_input'])},{drops}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    counts = [max(r["kept"], 1) for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, counts, color="#4c72b0")
    ax.set_xscale("log")
    ax.set_yticks(y, [r["stage"] for r in rows])
    ax.set_xlim(right=max(counts) * 30)
    for yy, r, c in zip(y, rows, counts):
        ax.text(c, yy, f" {r['kept']:,} ({_fmt(r['pct_of_input'])}%)", va="center", fontsize=8)
    ax.set_xlabel("pairs kept (log scale)")
    ax.set_title("condense funnel")
    fig.tight_layout()
    with atomic_write(out / "funnel.png", "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"



# --------------------------------------------------------------------------- the stage table


def _embed_params(ctx: Ctx) -> dict[str, Any]:
    cfg = ctx.cfg
    inputs = {k: v for k, v in ctx.inputs.items() if k in ("pairs", "embeddings")}
    return {"inputs": inputs, "clip": None if cfg.embeddings else cfg.clip,
            "revision": None if cfg.embeddings else cfg.revision, "shard_rows": cfg.shard_rows,
            "store_text_emb": cfg.store_text_emb, "limit": cfg.limit, "fields": dict(cfg.fields),
            "image_root": cfg.image_root}


def _kmeans_params(ctx: Ctx) -> dict[str, Any]:
    cfg = ctx.cfg
    if cfg.centroids:
        return {"centroids": ctx.inputs.get("centroids")}
    return {"clusters": cfg.clusters, "points_per_centroid": cfg.kmeans_points_per_centroid,
            "iters": cfg.kmeans_iters, "epochs": cfg.kmeans_epochs, "spherical": cfg.kmeans_spherical,
            "seed": cfg.seed}


STAGES: tuple[Stage, ...] = (
    Stage("embed", "emb", (), _embed_params, _emb_shards, _embed_done, _embed_run, _embed_finish, distributed=True),
    Stage("kmeans", "kmeans", ("centroids.safetensors",), _kmeans_params, _no_units, _never, _nothing,
          _kmeans_finish),
    Stage("assign", "assign", (), lambda ctx: {"max_cluster_size": ctx.cfg.max_cluster_size,
                                              "giant_cluster": ctx.cfg.giant_cluster},
          _emb_shards, lambda ctx, s: _assign_path(ctx, s).exists(), _assign_run, _assign_finish),
    Stage("partition", "part", (), lambda ctx: {"buckets": ctx.cfg.buckets}, _emb_shards, _partition_done,
          _partition_run, _partition_finish),
    Stage("dedup", "dedup", (), lambda ctx: {"threshold": ctx.cfg.dedup_threshold,
                                            "representative": ctx.cfg.representative, "seed": ctx.cfg.seed,
                                            "kmeans_iters": ctx.cfg.kmeans_iters},
          _dedup_units, _dedup_done, _dedup_run, _dedup_finish, distributed=True),
    Stage("clip-band", "clip_band", ("clip_band.rows.npy",),
          lambda ctx: {"band": list(ctx.cfg.clip_band), "min": ctx.cfg.clip_min, "max": ctx.cfg.clip_max},
          _no_units, _never, _nothing, _clip_band_finish),
    Stage("centroid-band", "centroid_band", ("centroid_band.rows.npy",),
          lambda ctx: {"band": list(ctx.cfg.centroid_band)}, _no_units, _never, _nothing, _centroid_band_finish),
    Stage("sample", "sample", ("sample.rows.npy",), lambda ctx: {"target": ctx.cfg.target, "seed": ctx.cfg.seed},
          _no_units, _never, _nothing, _sample_finish),
)
STAGE_NAMES = tuple(s.name for s in STAGES) + ("export",)
