"""Teacher cache: run a frozen teacher once, read its targets back every epoch (distill.md §5).

A cache is a folder ``<cache_dir>/<method>-<first 16 hex of the key>/`` holding
``shard-00000.safetensors ...`` (contiguous example-index ranges) and ``manifest.json``, written
last by atomic rename: without it the cache is incomplete and unused. Per-example targets are
``[n, dim]`` tensors; token-level targets (names starting ``tok.``) are stored without padding as
``[Σ lengths, dim]`` plus ``tok_offsets`` int64 ``[n + 1]``, and re-padded on read. An interrupted
build resumes from the shards listed in ``manifest.partial*.json`` whose hashes check.

Rows are read from the shard files memory-mapped with numpy at the offsets of the safetensors
header (the documented safetensors layout), so a batch of random rows is one vectorised gather
per shard; caches that fit ``ram_gb`` are loaded into RAM instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

try:
    import fcntl
except ImportError:  # Windows: no lock, builds are not shared between runs
    fcntl = None

import numpy as np

from mmkit.core.data import length_sorted_batches
from mmkit.errors import ConfigError, MmkitError
from mmkit.io import atomic_write, cache_root, sha256_file, write_json
from mmkit.progress import Progress
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

FORMAT_VERSION = 1
SHARD_EXAMPLES = 8192
SHARD_BYTES = 2 * 1024 ** 3
MANIFEST = "manifest.json"
TOKEN_PREFIX = "tok."
OFFSETS = "tok_offsets"
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
_ST = {"F32": np.float32, "F16": np.float16, "I64": np.int64}

#: ``mmkit distill build-cache``: method -> ``"module:function"``, called as
#: ``function(file=, sets=, out=, overwrite=) -> results``. Methods register their own.
CACHE_BUILDERS: Registry = Registry("cache-building method")
CACHE_BUILDERS.register("bert-kd", "mmkit.distill.bert_kd:build_cache")
CACHE_BUILDERS.register("pesf", "mmkit.distill.pesf:build_cache")


@dataclass
class CacheConfig:
    """The ``cache`` section of a method's config."""

    mode: Literal["auto", "on", "off"] | bool = "auto"  # YAML reads a bare on/off as a boolean
    max_gb: float = 50.0
    dtype: Literal["float16", "float32"] = "float16"
    dir: str | None = None  # default <cache root>/teacher
    ram_gb: float = 2.0
    verify: bool = False
    batch_size: int = 64
    shard_examples: int = 8192

    def validate(self) -> None:
        if isinstance(self.mode, bool):
            self.mode = "on" if self.mode else "off"


@dataclass(frozen=True)
class Target:
    """One cached tensor: per ``example`` ([n, dim]) or per ``token`` ([Σ lengths, dim])."""

    name: str
    per: str
    dim: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.per not in ("example", "token") or (self.per == "token") != self.name.startswith(TOKEN_PREFIX):
            raise ValueError(f"token-level targets (and only they) are named {TOKEN_PREFIX}*: {self}")

    @property
    def itemsize(self) -> int:
        return np.dtype(_NP[self.dtype]).itemsize * self.dim


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def make_key(method: str, targets: Sequence[Target], **parts: Any) -> dict[str, Any]:
    """The cache key (distill.md §5): format version, method, the target spec and ``parts``
    (teacher id + commit or weight hashes, tokenizer hash, data fingerprint, max_len, ...)."""
    return {"format": FORMAT_VERSION, "method": method, "targets": [asdict(t) for t in targets], **parts}


def key_digest(key: Mapping[str, Any]) -> str:
    """sha256 of the key's canonical JSON (sorted keys)."""
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


def weights_fingerprint(path: str, revision: str | None) -> dict[str, Any]:
    """A teacher's identity: sha256 of its local weight files, else its resolved hub revision."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
        return {"weights": {f.name: sha256_file(f) for f in files}}
    return {"revision": revision}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition (the fast tokenizer's JSON, else its vocabulary)
    together with its class, truncation and padding sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else canonical_json(sorted(tokenizer.get_vocab().items()))
    meta = canonical_json([type(tokenizer).__name__, getattr(tokenizer, "truncation_side", None),
                           getattr(tokenizer, "padding_side", None)])
    return hashlib.sha256((meta + body).encode("utf-8")).hexdigest()


def text_key_parts(teacher_path: str, revision: str | None, tokenizer: Any, data: Any, max_len: int) -> dict[str, Any]:
    """The key parts of a text-classification teacher (:func:`make_key`): teacher (id + weight
    hashes or revision, compute dtype), tokenizer hash, data fingerprint (a ``TextClsSet``'s, with
    split, fields and size), max_len, truncation and padding side."""
    return {"teacher": {"id": teacher_path, "dtype": "float32", **weights_fingerprint(teacher_path, revision)},
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": {**{k: v for k, v in data.data.items() if k != "path"}, "source": data.source,
                     "fields": data.fields},
            "max_len": max_len, "truncation": "longest_first",
            "padding_side": getattr(tokenizer, "padding_side", "right")}


def estimate_bytes(targets: Sequence[Target], n: int, total_tokens: int) -> int:
    """Storage size of the targets for ``n`` examples of ``total_tokens`` tokens in all."""
    per_example = sum(t.itemsize for t in targets if t.per == "example")
    per_token = sum(t.itemsize for t in targets if t.per == "token")
    return n * per_example + total_tokens * per_token + (8 * (n + 1) if per_token else 0)


def plan(mode: str, *, frozen: bool, augmented: bool, size_bytes: int, max_gb: float) -> tuple[bool, str]:
    """Whether to use the cache: ``(use, reason)``. ``on`` fails instead of falling back (§5)."""
    if mode == "off":
        return False, "cache.mode is off"
    reasons = []
    if not frozen:
        reasons.append("the teacher is trained")
    if augmented:
        reasons.append("inputs are augmented")
    if size_bytes > max_gb * 1024 ** 3:
        reasons.append(f"estimated size {size_bytes / 1024 ** 3:.2f} GB exceeds cache.max_gb = {max_gb}")
    if not reasons:
        return True, ""
    if mode == "on":
        raise ConfigError(f"the teacher cache cannot be used: {'; '.join(reasons)}", field="cache.mode")
    return False, "; ".join(reasons)


def open_cache(method: str, settings: CacheConfig, targets: Sequence[Target], lengths: np.ndarray,
               compute: Callable[[np.ndarray], Mapping[str, Any]], key_parts: Callable[[], Mapping[str, Any]], *,
               frozen: bool) -> tuple[CacheReader | None, str]:
    """A method's teacher cache as ``settings`` asks: ``(reader, "hit" | "built")``, or ``(None,
    "disabled: why")`` when :func:`plan` rules it out. An incomplete cache is first built with
    ``compute`` over the examples of token counts ``lengths`` (under ``accelerate launch`` each
    process builds its share), then re-hashed if ``settings.verify``. ``key_parts()`` (what
    :func:`make_key` adds to method and targets) is only called when the cache is used: it may
    hash the teacher's weights."""
    size = estimate_bytes(targets, len(lengths), int(lengths.sum()))
    log.info("teacher cache: estimated size %.1f MB for %d examples", size / 1024 ** 2, len(lengths))
    use, reason = plan(settings.mode, frozen=frozen, augmented=False, size_bytes=size, max_gb=settings.max_gb)
    if not use:
        log.info("teacher cache disabled: %s", reason)
        return None, f"disabled: {reason}"
    cache = TeacherCache(method, make_key(method, targets, **key_parts()), settings.dir)
    status = "hit"
    if not cache.complete:
        rank, world, barrier = _processes()
        with _build_lock(cache.dir, world):
            if not cache.complete:  # another run may have built it while this one waited
                cache.build(lengths, compute, batch_size=settings.batch_size, shard_examples=settings.shard_examples,
                            rank=rank, world=world, barrier=barrier)
                status = "built"
    if settings.verify:
        cache.verify()
    log.info("teacher cache %s: %s", status, cache.dir)
    return cache.open(settings.ram_gb), status


@contextlib.contextmanager
def _build_lock(folder: Path, world: int) -> Iterator[None]:
    """Serialise builds of one cache by independent runs on this machine (an exclusive ``flock``
    on ``<folder>.lock``); the processes of one ``accelerate launch`` share the work instead."""
    if world > 1 or fcntl is None:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _processes() -> tuple[int, int, Callable[[], None] | None]:
    """(rank, world size, barrier) under ``accelerate launch``; (0, 1, None) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes, state.wait_for_everyone


# --------------------------------------------------------------------------- the cache


class TeacherCache:
    """The cache folder for one key under ``<cache_dir or cache root>/teacher/``."""

    def __init__(self, method: str, key: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> None:
        self.key = dict(key)
        self.targets = [Target(**t) for t in self.key["targets"]]
        digest = key_digest(self.key)
        base = Path(cache_dir).expanduser() if cache_dir else cache_root() / "teacher"
        self.dir = base / f"{method}-{digest[:16]}"
        if self._manifest_key() not in (None, self.key):
            self.dir = base / f"{method}-{digest}"  # a prefix collision: never overwrite another key

    def _manifest_key(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        return json.loads(path.read_text(encoding="utf-8"))["key"] if path.is_file() else None

    @property
    def complete(self) -> bool:
        """The manifest exists and holds this key."""
        return self._manifest_key() == self.key

    def build(self, lengths: np.ndarray, compute: Callable[[np.ndarray], Mapping[str, Any]], *,
              batch_size: int = 64, shard_examples: int = SHARD_EXAMPLES, shard_bytes: int = SHARD_BYTES,
              rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None) -> None:
        """Run ``compute(rows) -> {name: tensor}`` over every example and write the shards.

        ``lengths`` are the teacher inputs' token counts (index order); ``compute`` gets
        length-sorted index batches inside each shard and returns per-example targets ``[b, dim]``
        and token-level ones padded on the right ``[b, L, dim]``. With ``world`` processes each
        writes shards ``i % world == rank``; rank 0 writes the manifest after ``barrier``.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(lengths)
        self.dir.mkdir(parents=True, exist_ok=True)
        ranges = _shard_ranges(lengths, self.targets, shard_examples, shard_bytes)
        done = self._resumable()
        mine = [(i, r) for i, r in enumerate(ranges) if i % world == rank and r not in done.values()]
        if done:
            log.info("teacher cache: resuming the build (%d of %d shards done)", len(done), len(ranges))
        partial = self.dir / (f"manifest.partial.r{rank}.json" if rank else "manifest.partial.json")
        entries = [e for e in _read_partial(partial, self.key) if (e["start"], e["stop"]) in done.values()]
        with Progress(sum(b - a for _, (a, b) in mine), "caching teacher targets") as bar:
            for i, (start, stop) in mine:
                entries.append(self._build_shard(i, start, stop, lengths, compute, batch_size, bar))
                write_json(partial, {"key": self.key, "shards": entries})
        if barrier is not None:
            barrier()
        if rank == 0:
            shards = [e for p in sorted(self.dir.glob("manifest.partial*.json")) for e in _read_partial(p, self.key)]
            shards.sort(key=lambda e: e["start"])
            if [(e["start"], e["stop"]) for e in shards] != ranges:
                raise MmkitError("the teacher cache build is missing shards; rerun to resume it",
                                 file=str(self.dir), field="cache")
            write_json(self.dir / MANIFEST, {"key": self.key, "n": n, "shards": shards,
                                             "dtypes": {t.name: t.dtype for t in self.targets},
                                             "bytes": sum(e["bytes"] for e in shards),
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            for p in self.dir.glob("manifest.partial*.json"):
                p.unlink()

    def _resumable(self) -> dict[str, tuple[int, int]]:
        """Shards of an interrupted build whose files hash as recorded: ``{file: (start, stop)}``."""
        out = {}
        for p in self.dir.glob("manifest.partial*.json"):
            for e in _read_partial(p, self.key):
                f = self.dir / e["file"]
                if f.is_file() and sha256_file(f) == e["sha256"]:
                    out[e["file"]] = (e["start"], e["stop"])
        return out

    def _build_shard(self, i: int, start: int, stop: int, lengths: np.ndarray,
                     compute: Callable[[np.ndarray], Mapping[str, Any]], batch_size: int, bar: Progress) -> dict:
        import torch
        from safetensors.torch import save

        lens = lengths[start:stop]
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        arrays = {t.name: np.empty((offsets[-1] if t.per == "token" else len(lens), t.dim), dtype=_NP[t.dtype])
                  for t in self.targets}
        with torch.inference_mode():
            for local in length_sorted_batches(lens, batch_size):
                out = compute(local + start)
                for t in self.targets:
                    value = out[t.name].detach().float().cpu().numpy().astype(_NP[t.dtype], copy=False)
                    if t.per == "example":
                        arrays[t.name][local] = value.reshape(len(local), t.dim)
                    else:
                        arrays[t.name][_token_positions(offsets, lens, local)] = _unpad(value, lens[local])
                bar.update(len(local))
        tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
        tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
        if any(t.per == "token" for t in self.targets):
            tensors[OFFSETS] = torch.from_numpy(offsets)
        name = f"shard-{i:05d}.safetensors"
        with atomic_write(self.dir / name, "wb") as fh:
            fh.write(save(tensors, metadata={"key": canonical_json(self.key), "start": str(start), "stop": str(stop)}))
        path = self.dir / name
        return {"file": name, "start": start, "stop": stop, "bytes": path.stat().st_size,
                "sha256": sha256_file(path)}

    def open(self, ram_gb: float = 0.0) -> "CacheReader":
        """A reader over the complete cache (in RAM when it fits ``ram_gb``)."""
        if not self.complete:
            raise MmkitError("the teacher cache is incomplete (no manifest.json)", file=str(self.dir), field="cache")
        manifest = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
        return CacheReader(self.dir, manifest, in_ram=manifest["bytes"] <= ram_gb * 1024 ** 3)

    def verify(self) -> None:
        """``--cache-verify``: re-hash every shard against the manifest."""
        manifest = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
        for e in manifest["shards"]:
            if sha256_file(self.dir / e["file"]) != e["sha256"]:
                raise MmkitError("shard does not match its hash in manifest.json; delete the cache folder to "
                                 "rebuild it", file=str(self.dir / e["file"]), field="cache")


def _read_partial(path: Path, key: Mapping[str, Any]) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []
    return data["shards"] if data.get("key") == key else []


def _shard_ranges(lengths: np.ndarray, targets: Sequence[Target], shard_examples: int,
                  shard_bytes: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges of at most ``shard_examples`` examples and about ``shard_bytes``."""
    n = len(lengths)
    mean_len = float(lengths.mean()) if n else 0.0
    per_example = max(1.0, estimate_bytes(targets, 1, 0) + mean_len * estimate_bytes(
        [t for t in targets if t.per == "token"], 0, 1))
    size = max(1, min(shard_examples, int(shard_bytes // per_example)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _token_positions(offsets: np.ndarray, lens: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat positions of every token of ``rows`` (row by row) in a ``[Σ lengths]`` array."""
    counts = lens[rows]
    starts = np.repeat(offsets[rows] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return starts + np.arange(int(counts.sum()))


def _unpad(padded: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``[b, L, d]`` right-padded rows -> ``[Σ lens, d]`` real tokens, row by row."""
    mask = np.arange(padded.shape[1])[None, :] < lens[:, None]
    return padded[mask]


# --------------------------------------------------------------------------- reading


class CacheReader:
    """Rows of a complete cache by example index; token targets re-padded to the rows' longest."""

    def __init__(self, directory: Path, manifest: Mapping[str, Any], in_ram: bool = False) -> None:
        self.dir = Path(directory)
        self.n = int(manifest["n"])
        self.shards = manifest["shards"]
        self.starts = np.asarray([e["start"] for e in self.shards], dtype=np.int64)
        self.arrays = [_map_safetensors(self.dir / e["file"], in_ram) for e in self.shards]
        self.names = [k for k in self.arrays[0] if k not in ("index", OFFSETS)] if self.arrays else []

    def __len__(self) -> int:
        return self.n

    def get(self, rows: Iterable[int]) -> dict[str, Any]:
        """``{name: float32 tensor}`` for example indices ``rows``: per-example ``[b, dim]``, token
        targets ``[b, max length of rows, dim]`` with zeros at padding."""
        import torch

        rows = np.asarray(rows if not hasattr(rows, "numpy") else rows.cpu().numpy(), dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise MmkitError(f"example index outside the cache's {self.n} rows", file=str(self.dir), field="cache")
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[shard]
        lens = np.zeros(len(rows), dtype=np.int64)
        if self.arrays and OFFSETS in self.arrays[0]:
            for s in np.unique(shard):
                sel = shard == s
                off = self.arrays[s][OFFSETS]
                lens[sel] = off[local[sel] + 1] - off[local[sel]]
        width = max(int(lens.max()) if len(lens) else 0, 1)
        mask = np.arange(width)[None, :] < lens[:, None]
        out: dict[str, Any] = {}
        for name in self.names:
            token = name.startswith(TOKEN_PREFIX)
            dim = self.arrays[0][name].shape[1]
            dest = np.zeros((len(rows), width, dim) if token else (len(rows), dim), dtype=np.float32)
            for s in np.unique(shard):
                sel = np.flatnonzero(shard == s)
                arr = self.arrays[s][name]
                if token:
                    off = self.arrays[s][OFFSETS]
                    pos = _token_positions(off[:-1], off[1:] - off[:-1], local[sel])
                    block = np.zeros((len(sel), width, dim), dtype=np.float32)
                    block[mask[sel]] = arr[pos]
                    dest[sel] = block
                else:
                    dest[sel] = arr[local[sel]]
            out[name] = torch.from_numpy(dest)
        return out


def _map_safetensors(path: Path, in_ram: bool) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as numpy arrays memory-mapped at their header offsets."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dtype = _ST[info["dtype"]]
        if end == begin:
            arr = np.zeros(shape, dtype=dtype)
        else:
            arr = np.memmap(path, dtype=dtype, mode="r", offset=base + begin, shape=shape)
        out[name] = np.array(arr) if in_ram else arr
    return out
