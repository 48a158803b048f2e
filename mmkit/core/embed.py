"""The one encoder used by cluster, evaluate and build: texts and images to unit vectors, cached.

``encode_texts(texts, model)`` tokenises every text once (truncation, no padding), sorts by
token count (longest first), runs padded batches under ``torch.inference_mode()`` and
scatters the rows back into a preallocated ``float32[N, d]`` array in input order. Pooling
functions live in the :data:`POOLINGS` registry: ``mean`` over the attention mask (what
sentence-transformers does), ``cls``, ``eos`` (last real token), ``pooler`` (the model's
``pooler_output``) and ``projected`` (a dual encoder's ``get_text_features().pooler_output``,
the default for CLIP-like models). ``encode_images(images, model)`` runs a dual encoder's
``get_image_features`` on images loaded with :func:`mmkit.core.data.load_image`.

Results are cached under ``cache_root() / "embed" / <key>/`` as ``shard-NNNNN.safetensors``
files (tensor ``embeddings``, at most ``shard_rows`` rows each) plus ``manifest.json``; the
entry counts only once ``manifest.json`` exists and the folder is written atomically. The key
is the sha256 of a canonical JSON of everything that changes the numbers (see
:func:`text_cache_fields`). Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mmkit.core.models import MINILM_HUB_ID, LoadedModel
from mmkit.errors import DataError, MmkitError, ModelError
from mmkit.io import cache_root
from mmkit.progress import Progress
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

DEFAULT_TEXT_MODEL = MINILM_HUB_ID
DEFAULT_MAX_LENGTH = 512
SHARD_ROWS = 100_000
CACHE_FORMAT = "mmkit-embed-cache"
CACHE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
_HASH_CHUNK = 65_536


# --------------------------------------------------------------------------- cache locations


def embed_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_root(cache_dir) / "embed"``: the folder holding one sub-folder per cache key."""
    return cache_root(cache_dir) / "embed"


# --------------------------------------------------------------------------- poolings

#: name -> ``fn(model, input_ids, attention_mask) -> Tensor[B, d]``; plugins may add entries.
POOLINGS: Registry = Registry("pooling")


def is_dual_encoder(model_or_config: Any) -> bool:
    """Whether a model (or the class ``AutoModel`` builds for a config) has ``get_text_features``."""
    if hasattr(model_or_config, "get_text_features"):
        return True
    if not hasattr(model_or_config, "model_type"):  # a model without get_text_features
        return False
    try:
        from transformers import AutoModel

        return hasattr(AutoModel._model_mapping[type(model_or_config)], "get_text_features")
    except Exception:  # noqa: BLE001 - unknown config class: fall back to its layout
        return hasattr(model_or_config, "text_config") and hasattr(model_or_config, "vision_config")


def text_tower_outputs(model: Any, input_ids, attention_mask):
    """Hidden states of the text tower: the base model (no task head), or a dual encoder's ``text_model``."""
    tower = model.text_model if is_dual_encoder(model) and hasattr(model, "text_model") else model.base_model
    return tower(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)


def _last_hidden(model, input_ids, attention_mask):
    out = text_tower_outputs(model, input_ids, attention_mask)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise ModelError(f"{type(model).__name__} returns no last_hidden_state to pool", field="pooling")
    return out, hidden.float()


@POOLINGS.register("mean")
def mean_pooling(model, input_ids, attention_mask):
    """Mean of the last hidden states over the attention mask (sentence-transformers' mean pooling)."""
    _, hidden = _last_hidden(model, input_ids, attention_mask)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@POOLINGS.register("cls")
def cls_pooling(model, input_ids, attention_mask):
    """The first token's last hidden state."""
    _, hidden = _last_hidden(model, input_ids, attention_mask)
    return hidden[:, 0]


@POOLINGS.register("eos")
def eos_pooling(model, input_ids, attention_mask):
    """The last real token's hidden state (works with left or right padding)."""
    import torch

    _, hidden = _last_hidden(model, input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@POOLINGS.register("pooler")
def pooler_pooling(model, input_ids, attention_mask):
    """The model's own ``pooler_output`` (BERT: tanh(W h_cls))."""
    out = text_tower_outputs(model, input_ids, attention_mask)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ModelError(f"{type(model).__name__} has no pooler_output; use pooling 'mean' or 'cls'",
                         field="pooling")
    return pooled.float()


@POOLINGS.register("projected")
def projected_pooling(model, input_ids, attention_mask):
    """A dual encoder's text features: ``get_text_features(...).pooler_output`` (projected)."""
    if not hasattr(model, "get_text_features"):
        raise ModelError(f"{type(model).__name__} is not a dual encoder (no get_text_features); "
                         "use pooling 'mean'", field="pooling")
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return _features(out).float()


def _features(out: Any):
    # transformers 5 returns BaseModelOutputWithPooling (design.md section 6); 4.x a tensor.
    return out.pooler_output if hasattr(out, "pooler_output") else out


def resolve_pooling(pooling: str | None, config_or_model: Any) -> str:
    """``auto``/None is ``projected`` for dual encoders and ``mean`` otherwise; names are checked."""
    if pooling in (None, "auto"):
        return "projected" if is_dual_encoder(config_or_model) else "mean"
    POOLINGS.resolve(pooling, field="pooling")
    return pooling


# --------------------------------------------------------------------------- results and cache


@dataclass
class EncodeInfo:
    """What :func:`encode_texts` / :func:`encode_images` did (for logs and ``results.json``)."""

    model: str
    path: str
    revision: str | None
    pooling: str
    normalize: bool
    max_length: int | None
    n: int
    d: int
    cache_hit: bool
    cache_path: str | None
    key: str | None
    seconds: float
    n_at_max_length: int | None = None  # texts whose token count reached max_length (possibly truncated)
    fields: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, str | None]:
        """The ``{"id", "revision"}`` entry of ``results.json``'s ``models``."""
        return {"id": self.model, "revision": self.revision}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of ``fields``."""
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 of all texts joined by ``\\x1e`` (hashed in chunks, so never one giant string)."""
    h = hashlib.sha256()
    for start in range(0, len(texts), _HASH_CHUNK):
        chunk = texts[start:start + _HASH_CHUNK]
        if start:
            h.update(b"\x1e")
        try:
            h.update("\x1e".join(chunk).encode("utf-8"))
        except TypeError:
            bad = next(i for i, t in enumerate(chunk) if not isinstance(t, str))
            raise DataError(f"text {start + bad} is {type(chunk[bad]).__name__}, expected str",
                            field="text") from None
    return h.hexdigest()


def model_fingerprint(path: str, files: Sequence[str] = ("config.json", "tokenizer.json")) -> dict[str, Any]:
    """sha256 of the named files and byte sizes of the weight files, for a local model directory.

    A hub id (not a local directory) has no local files to hash: its id and revision identify it.
    """
    root = Path(path)
    if not root.is_dir():
        return {"files": None, "weights": None}
    from mmkit.io import sha256_file

    hashes = {name: sha256_file(root / name) if (root / name).is_file() else None for name in files}
    weights = {p.name: p.stat().st_size for p in sorted(root.iterdir())
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    return {"files": hashes, "weights": weights}


def load_cached(key: str, cache_dir: str | os.PathLike | None = None, *, n: int | None = None) -> np.ndarray | None:
    """The cached ``float32[n, d]`` embeddings for ``key``, or None (no manifest, or a damaged entry)."""
    entry = embed_cache_dir(cache_dir) / key
    manifest_path = entry / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        from safetensors.numpy import load_file

        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        rows, d = int(manifest["n"]), int(manifest["d"])
        if n is not None and rows != n:
            raise ValueError(f"holds {rows} rows, expected {n}")
        out = np.empty((rows, d), dtype=np.float32)
        at = 0
        for shard in manifest["shards"]:
            block = load_file(str(entry / shard["file"]))["embeddings"]
            if block.ndim != 2 or block.shape[1] != d or at + len(block) > rows:
                raise ValueError(f"{shard['file']} has shape {block.shape}")
            out[at:at + len(block)] = block
            at += len(block)
        if at != rows:
            raise ValueError(f"shards hold {at} rows, manifest says {rows}")
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("embed cache entry %s is damaged (%s); recomputing it", entry, exc)
        return None


def store_cached(key: str, embeddings: np.ndarray, fields: dict[str, Any], *, model: str,
                 cache_dir: str | os.PathLike | None = None, shard_rows: int = SHARD_ROWS) -> Path | None:
    """Write ``embeddings`` as ``<embed dir>/<key>/shard-NNNNN.safetensors`` + ``manifest.json``, atomically.

    A failed write (disk full, read-only cache) is logged and returns None: the caller still
    has its embeddings.
    """
    from safetensors.numpy import save_file

    from mmkit import __version__
    from mmkit.io import atomic_dir, write_json

    if shard_rows < 1:
        raise MmkitError(f"shard_rows must be >= 1, got {shard_rows}", field="shard_rows")
    entry = embed_cache_dir(cache_dir) / key
    n, d = embeddings.shape
    try:
        with atomic_dir(entry, overwrite=True) as tmp:
            shards = []
            for s, start in enumerate(range(0, max(n, 1), shard_rows)):
                name = f"shard-{s:05d}.safetensors"
                block = np.ascontiguousarray(embeddings[start:start + shard_rows], dtype=np.float32)
                save_file({"embeddings": block}, str(tmp / name))
                shards.append({"file": name, "rows": int(len(block))})
            write_json(tmp / "manifest.json", {
                "format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "model": model,
                "n": int(n), "d": int(d), "dtype": "float32", "shard_rows": shard_rows,
                "shards": shards, "fields": fields, "mmkit_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
    except OSError as exc:
        log.warning("could not write the embed cache entry %s: %s", entry, exc)
        return None
    return entry


# --------------------------------------------------------------------------- shared helpers


def _as_list(items: Iterable[Any]) -> list[Any] | tuple[Any, ...]:
    return items if isinstance(items, (list, tuple)) else list(items)


def _tokenizer_of(preprocessor: Any) -> Any:
    return getattr(preprocessor, "tokenizer", None) or preprocessor


def _image_processor_of(preprocessor: Any) -> Any:
    return getattr(preprocessor, "image_processor", None) or preprocessor


def _compute_tag(device: str, model: Any | None = None) -> tuple[str, Any]:
    """(``"cpu-float32"``-style tag for the cache key, autocast dtype or None) for ``device``."""
    import torch

    if device.startswith("cuda"):
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return f"cuda-{str(amp).removeprefix('torch.')}", amp
    dtype = next(model.parameters()).dtype if model is not None else torch.float32
    return f"{device.split(':')[0]}-{str(dtype).removeprefix('torch.')}", None


def _model_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _optional_json(path: str, name: str, revision: str | None) -> dict[str, Any] | None:
    """A small JSON file next to the model (local dir, or a hub repo's cached/downloadable copy)."""
    local = Path(path) / name
    if Path(path).is_dir():
        if not local.is_file():
            return None
        return json.loads(local.read_text(encoding="utf-8"))
    try:
        from transformers.utils import cached_file

        found = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - optional file: absent or unreachable
        return None
    return json.loads(Path(found).read_text(encoding="utf-8")) if found else None


def resolve_max_length(path: str, config: Any, tokenizer: Any, requested: int | None,
                       revision: str | None = None) -> int:
    """``max_seq_length`` from ``sentence_bert_config.json`` when present, else ``requested``, else 512;
    capped by the tokenizer's ``model_max_length`` and the text config's position embeddings."""
    sbert = _optional_json(path, "sentence_bert_config.json", revision) or {}
    length = int(sbert.get("max_seq_length") or requested or DEFAULT_MAX_LENGTH)
    if sbert.get("max_seq_length") and requested and int(requested) != length:
        log.info("max length %d comes from sentence_bert_config.json (requested %d)", length, requested)
    caps = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        caps.append(tok_max)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(text_config, "model_type", "").endswith("roberta"):
            positions -= 2  # RoBERTa-style position ids start after padding_idx
        caps.append(positions)
    return min([length, *caps])


def _output_dim(config: Any, pooling: str, image: bool = False) -> int:
    if pooling == "projected" or image:
        dim = getattr(config, "projection_dim", None)
        if dim:
            return int(dim)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text_config, "hidden_size", 0) or 0)


@dataclass
class _Source:
    """A model identified (and, on a cache miss, loaded) lazily."""

    id: str
    path: str
    revision: str | None
    config: Any
    preprocessor: Any
    loaded: LoadedModel | None


def _open_source(model: str | LoadedModel | None, loaded: LoadedModel | None, revision: str | None,
                 which: str) -> _Source:
    """Identify a model and load its config and preprocessor, but not its weights."""
    if isinstance(model, LoadedModel) and loaded is None:
        loaded = model
    if loaded is not None:
        pre = loaded.preprocessor
        if pre is None:
            from mmkit.core.models import _load_preprocessor

            pre = _load_preprocessor(which, loaded.path, loaded.id, {"revision": loaded.revision})
            loaded.preprocessor = pre
        return _Source(loaded.id, loaded.path, loaded.revision, loaded.model.config, pre, loaded)
    if not isinstance(model, str) or not model:
        raise ModelError("no model given", field="model")
    from mmkit.core.models import _load_config, _load_preprocessor, resolve_source

    path, _ = resolve_source(model)
    common = {"revision": revision, "trust_remote_code": False}
    config = _load_config(path, model, common)
    pre = _load_preprocessor(which, path, model, common)
    return _Source(model, path, revision or getattr(config, "_commit_hash", None), config, pre, None)


def _ensure_loaded(src: _Source, kind: str, device: str) -> LoadedModel:
    if src.loaded is None:
        from mmkit.core.models import load_model

        src.loaded = load_model(src.id, kind, device=device, revision=src.revision, preprocessor=False)
        src.loaded.preprocessor = src.preprocessor
        log.info("loaded %s from %s", src.id, src.path)
    return src.loaded


# --------------------------------------------------------------------------- texts


def _lookup(fields: dict[str, Any], cache_dir: str | os.PathLike | None, n: int) -> tuple[str, np.ndarray | None]:
    """The cache key of ``fields`` and the cached embeddings, if a complete entry exists."""
    key = cache_key(fields)
    cached = load_cached(key, cache_dir, n=n)
    log.info("embed cache %s: %s", "hit" if cached is not None else "miss", embed_cache_dir(cache_dir) / key)
    return key, cached


def text_cache_fields(*, path: str, revision: str | None, pooling: str, normalize: bool,
                      max_length: int, text_mode: str, compute: str, data_sha256: str) -> dict[str, Any]:
    """The fields hashed into a text cache key (also stored in the manifest)."""
    fp = model_fingerprint(path, ("config.json", "tokenizer.json"))
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "input": "text", "model": path,
            "revision": revision, "files": fp["files"], "weights": fp["weights"], "pooling": pooling,
            "normalize": bool(normalize), "max_length": int(max_length), "text_mode": text_mode,
            "compute": compute, "texts_sha256": data_sha256}


def encode_texts(
    texts: Sequence[str] | Iterable[str],
    model: str | LoadedModel = DEFAULT_TEXT_MODEL,
    *,
    pooling: str | None = "auto",
    normalize: bool = True,
    max_length: int | None = None,
    batch_size: int = 128,
    device: str = "auto",
    revision: str | None = None,
    text_mode: str = "",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    shard_rows: int = SHARD_ROWS,
    sorted_by_length: bool = True,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, EncodeInfo]:
    """Encode ``texts`` into ``float32[N, d]`` rows in input order (L2-normalised by default).

    ``model`` is a hub id, a local directory, ``bundled:minilm`` or a :class:`LoadedModel`
    (``loaded=`` does the same and wins). ``pooling``: ``auto`` (``projected`` for dual
    encoders, else ``mean``), or any :data:`POOLINGS` name. ``max_length``: see
    :func:`resolve_max_length`. ``text_mode`` is a caller's tag for how texts were built
    (it only enters the cache key). ``sorted_by_length=False`` batches in input order (same
    numbers, more padding; for benchmarks). With ``return_info`` the result is
    ``(embeddings, EncodeInfo)``.
    """
    t0 = time.perf_counter()
    texts = _as_list(texts)
    if batch_size < 1:
        raise MmkitError(f"batch size must be >= 1, got {batch_size}", field="batch_size")
    src = _open_source(model, loaded, revision, "tokenizer")
    tokenizer = _tokenizer_of(src.preprocessor)
    pooling = resolve_pooling(pooling, src.loaded.model if src.loaded else src.config)
    length = resolve_max_length(src.path, src.config, tokenizer, max_length, src.revision)
    from mmkit.core.models import resolve_device

    device = _model_device(src.loaded.model) if src.loaded else resolve_device(device)
    compute, amp = _compute_tag(device, src.loaded.model if src.loaded else None)
    n = len(texts)
    key = entry = None
    fields: dict[str, Any] = {}
    log.info("encoding %d texts with %s (%s), pooling %s, max length %d, on %s",
             n, src.id, src.path, pooling, length, device)

    def info(emb: np.ndarray, hit: bool, at_max: int | None = None) -> EncodeInfo:
        return EncodeInfo(src.id, src.path, src.revision, pooling, normalize, length, n,
                          int(emb.shape[1]), hit, str(entry) if entry else None, key,
                          round(time.perf_counter() - t0, 3), at_max, fields)

    def done(emb: np.ndarray, hit: bool, at_max: int | None = None):
        return (emb, info(emb, hit, at_max)) if return_info else emb

    if n == 0:
        return done(np.zeros((0, _output_dim(src.config, pooling)), dtype=np.float32), False)
    if use_cache:
        fields = text_cache_fields(path=src.path, revision=src.revision, pooling=pooling, normalize=normalize,
                                   max_length=length, text_mode=text_mode, compute=compute,
                                   data_sha256=texts_sha256(texts))
        key, cached = _lookup(fields, cache_dir, n)
        entry = embed_cache_dir(cache_dir) / key
        if cached is not None:
            return done(cached, True)

    from mmkit.core.data import input_order_batches, length_sorted_batches, tokenize_flat

    try:
        tokens = tokenize_flat(tokenizer, texts, max_length=length)
    except (TypeError, ValueError):
        texts_sha256(texts)  # names the first text that is not a str
        raise
    at_max = int((tokens.lengths >= length).sum())
    batches = (length_sorted_batches(tokens.lengths, batch_size) if sorted_by_length
               else input_order_batches(n, batch_size))
    lm = _ensure_loaded(src, "encoder", device)
    pad_id = _pad_id(tokenizer)
    pool = POOLINGS.resolve(pooling, field="pooling")
    emb = _run_text_batches(lm.model, tokens, batches, pad_id, pool, device, amp, normalize, progress,
                            f"encoding texts ({src.id})")
    if at_max:
        log.info("%d of %d texts reached the max length %d (truncated or exactly that long)", at_max, n, length)
    if use_cache:
        entry = store_cached(key, emb, fields, model=src.id, cache_dir=cache_dir, shard_rows=shard_rows)
    return done(emb, False, at_max)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _run_text_batches(model, tokens, batches, pad_id: int, pool: Callable, device: str, amp,
                      normalize: bool, progress: bool, description: str) -> np.ndarray:
    import torch

    from mmkit.core.data import pad_flat

    n = len(tokens)
    out: np.ndarray | None = None
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    with _eval_mode(model), torch.inference_mode(), autocast, Progress(n, description, enabled=progress) as bar:
        for rows in batches:
            ids, mask = pad_flat(tokens, rows, pad_id)
            out = _scatter(out, rows, pool(model, ids.to(device), mask.to(device)), n, normalize)
            bar.update(len(rows))
    assert out is not None
    return out


def _scatter(out: np.ndarray | None, rows: np.ndarray, vec: Any, n: int, normalize: bool) -> np.ndarray:
    """Write a batch's float32 (optionally L2-normalised) rows into the preallocated output."""
    import torch.nn.functional as F

    vec = vec.float()
    if normalize:
        vec = F.normalize(vec, p=2, dim=-1)
    vec = vec.cpu().numpy()
    if out is None:
        out = np.empty((n, vec.shape[1]), dtype=np.float32)
    out[rows] = vec
    return out


# --------------------------------------------------------------------------- images


def images_sha256(images: Sequence[Any], root: str | os.PathLike | None = None) -> str:
    """sha256 over the per-image content digests (file bytes, raw bytes, or PIL mode/size/pixels)."""
    from mmkit.io import sha256_file

    h = hashlib.sha256()
    for i, image in enumerate(images):
        if i:
            h.update(b"\x1e")
        if hasattr(image, "tobytes") and hasattr(image, "mode"):
            d = hashlib.sha256(f"{image.mode}\x1f{image.size}\x1f".encode())
            d.update(image.tobytes())
            h.update(d.hexdigest().encode())
        elif isinstance(image, (bytes, bytearray, memoryview)):
            h.update(hashlib.sha256(bytes(image)).hexdigest().encode())
        elif isinstance(image, dict) and image.get("bytes"):
            h.update(hashlib.sha256(image["bytes"]).hexdigest().encode())
        else:
            name = image.get("path") if isinstance(image, dict) else image
            path = Path(os.fspath(name)).expanduser()
            if root is not None and not path.is_absolute():
                path = Path(root).expanduser() / path
            if not path.is_file():
                from mmkit.core.data import load_image

                load_image(name, root)  # raises the usual error naming the file
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def encode_images(
    images: Sequence[Any] | Iterable[Any],
    model: str | LoadedModel | None = None,
    *,
    root: str | os.PathLike | None = None,
    normalize: bool = True,
    batch_size: int = 64,
    device: str = "auto",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, EncodeInfo]:
    """Encode images (paths under ``root``, PIL images, bytes) with a dual encoder's image tower.

    Features are ``get_image_features(pixel_values).pooler_output`` (projected), L2-normalised,
    ``float32[N, d]`` in input order. The next batch is loaded and preprocessed in a background
    thread while the current one runs. A missing or unreadable image is a ``DataError`` naming
    the file (callers that drop bad images check them with ``load_image`` first).
    """
    t0 = time.perf_counter()
    images = _as_list(images)
    if batch_size < 1:
        raise MmkitError(f"batch size must be >= 1, got {batch_size}", field="batch_size")
    src = _open_source(model, loaded, revision, "processor")
    if not is_dual_encoder(src.loaded.model if src.loaded else src.config):
        raise ModelError(f"{src.id} is not a dual encoder (no get_image_features)", field="model")
    from mmkit.core.models import resolve_device

    device = _model_device(src.loaded.model) if src.loaded else resolve_device(device)
    compute, amp = _compute_tag(device, src.loaded.model if src.loaded else None)
    n = len(images)
    key = entry = None
    fields: dict[str, Any] = {}
    log.info("encoding %d images with %s (%s) on %s", n, src.id, src.path, device)

    def done(emb: np.ndarray, hit: bool):
        if not return_info:
            return emb
        return emb, EncodeInfo(src.id, src.path, src.revision, "projected", normalize, None, n,
                               int(emb.shape[1]), hit, str(entry) if entry else None, key,
                               round(time.perf_counter() - t0, 3), None, fields)

    if n == 0:
        return done(np.zeros((0, _output_dim(src.config, "projected", image=True)), dtype=np.float32), False)
    if use_cache:
        fp = model_fingerprint(src.path, ("config.json", "preprocessor_config.json"))
        fields = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "input": "image", "model": src.path,
                  "revision": src.revision, "files": fp["files"], "weights": fp["weights"],
                  "pooling": "projected", "normalize": bool(normalize), "compute": compute,
                  "images_sha256": images_sha256(images, root)}
        key, cached = _lookup(fields, cache_dir, n)
        entry = embed_cache_dir(cache_dir) / key
        if cached is not None:
            return done(cached, True)

    lm = _ensure_loaded(src, "dual-encoder", device)
    emb = _run_image_batches(lm.model, _image_processor_of(src.preprocessor), images, root, batch_size,
                             device, amp, normalize, progress, f"encoding images ({src.id})")
    if use_cache:
        entry = store_cached(key, emb, fields, model=src.id, cache_dir=cache_dir, shard_rows=shard_rows)
    return done(emb, False)


def _run_image_batches(model, processor, images, root, batch_size: int, device: str, amp,
                       normalize: bool, progress: bool, description: str) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mmkit.core.data import input_order_batches, load_image

    dtype = next(model.parameters()).dtype

    def prepare(rows: np.ndarray):
        pil = [load_image(images[i], root) for i in rows]
        return processor(images=pil, return_tensors="pt")["pixel_values"]

    n = len(images)
    batches = input_order_batches(n, batch_size)
    out: np.ndarray | None = None
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    with ThreadPoolExecutor(max_workers=1) as pool, _eval_mode(model), torch.inference_mode(), autocast, \
            Progress(n, description, enabled=progress) as bar:
        pending = pool.submit(prepare, batches[0])
        for b, rows in enumerate(batches):
            pixels = pending.result()
            if b + 1 < len(batches):
                pending = pool.submit(prepare, batches[b + 1])
            vec = _features(model.get_image_features(pixel_values=pixels.to(device, dtype)))
            out = _scatter(out, rows, vec, n, normalize)
            bar.update(len(rows))
    assert out is not None
    return out
