"""The normalised view of instruction data (cluster.md §2).

:func:`load_records` reads any source :func:`mmkit.io.read_records` reads (plus a directory of
record files with one group per file) and builds an :class:`InstructionRecords`: the original
records, untouched, next to the texts the metrics use. Two record shapes are recognised per
record: (a) ``instruction``/``input``/``output`` and (b) ShareGPT-style ``conversations``
(``[{from, value}]``); every field name and role list is configurable through
:class:`RecordFields`. A bad record is one line, ``file:line: field: what was expected``.
Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mmkit.errors import DataError, MmkitError
from mmkit.io import Record, detect_format, fingerprint, read_records, record_files
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

SYSTEM_ROLE = "system"
ON_INVALID = ("error", "skip")
_MISSING = object()


@dataclass(frozen=True)
class RecordFields:
    """Field names, roles and text options of the input (the §7 option defaults)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    conversations: str = "conversations"
    role: str = "from"
    content: str = "value"
    user_roles: tuple[str, ...] = ("human", "user")
    assistant_roles: tuple[str, ...] = ("gpt", "assistant")
    task: str = "task"
    task_from: str = "field"  # "field" | "file" (directory input)
    embed_text: str = "instruction+input"  # "instruction" | "instruction+input"
    group_field: str = "group"  # the output column; an input that already has it is an error

    def option(self, name: str) -> str:
        """The CLI option that renames the field ``name`` (for error hints)."""
        return f"--{name}-field"


@dataclass(frozen=True)
class _Texts:
    """One record's normalised texts."""

    instruction: str
    response: str
    prompt_turns: tuple[str, ...]
    response_turns: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]  # (system | user | assistant, text) in conversation order


@dataclass
class InstructionRecords:
    """Original records plus the per-record texts and task labels the metrics use (§2).

    ``rows[i]`` is record i's 0-based position in the input (records skipped as invalid keep
    their positions); ``source_file`` is set for directory input; ``task`` is set when the task
    was requested (``need_task``) or comes from the file name, and ``task_order`` then fixes the
    order of task ids (file order for ``--task-from file``; None means byte order).
    """

    records: list[Record]
    instruction_text: list[str]
    response_text: list[str]
    prompt_turns: list[tuple[str, ...]]
    response_turns: list[tuple[str, ...]]
    conversations: list[tuple[tuple[str, str], ...]]  # every turn with its role, for training
    rows: np.ndarray
    source: dict[str, Any]
    fields: RecordFields
    task: list[str] | None = None
    task_order: list[str] | None = None
    source_file: list[str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, idx: np.ndarray) -> "InstructionRecords":
        """The records at ``idx`` (in that order), with ``source["n_records"]`` updated."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = idx.tolist()

        def take(values):
            return None if values is None else [values[i] for i in pick]

        return replace(
            self, records=take(self.records), instruction_text=take(self.instruction_text),
            response_text=take(self.response_text), prompt_turns=take(self.prompt_turns),
            response_turns=take(self.response_turns), conversations=take(self.conversations), rows=self.rows[idx], task=take(self.task),
            source_file=take(self.source_file), source={**self.source, "n_records": len(pick)},
        )

    def sample(self, n: int, seed: int = 0) -> "InstructionRecords":
        """``n`` records drawn uniformly without replacement (stream ``SeedSequence([seed, 1])``, §2),
        kept in input order. ``n`` at or above the record count keeps everything."""
        total = len(self)
        if n < 1:
            raise MmkitError(f"must be at least 1, got {n}", field="--sample")
        if n >= total:
            log.warning("--sample %d: the input has only %d records; using all of them", n, total)
            return self
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        picked = self.subset(np.sort(rng.choice(total, size=n, replace=False)))
        picked.source["sampled_from"] = total
        return picked

    def turn_texts(self, side: str = "response") -> tuple[list[str], np.ndarray]:
        """Flat texts of one side (``response``, ``prompt`` or ``total``) and the record each belongs to.

        Token counts of the flat texts summed by owner give per-record lengths (§3.3).
        """
        turns = LENGTH_SIDES.resolve(side, field="--length-of")(self)
        sizes = np.fromiter(map(len, turns), dtype=np.int64, count=len(turns))
        owner = np.repeat(np.arange(len(turns), dtype=np.int64), sizes)
        return list(chain.from_iterable(turns)), owner


#: ``--length-of`` -> the turns counted per record (system turns never are).
LENGTH_SIDES: Registry = Registry("--length-of side")
LENGTH_SIDES.register("response", lambda r: r.response_turns)
LENGTH_SIDES.register("prompt", lambda r: r.prompt_turns)
LENGTH_SIDES.register("total", lambda r: [p + q for p, q in zip(r.prompt_turns, r.response_turns)])

#: ``--embed-text`` -> how shape (a) builds ``instruction_text`` from (instruction, input).
EMBED_TEXTS: Registry = Registry("--embed-text mode")
EMBED_TEXTS.register("instruction", lambda instruction, extra: instruction)
EMBED_TEXTS.register("instruction+input",
                     lambda instruction, extra: f"{instruction}\n{extra}" if extra else instruction)


# --------------------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(rec: Record, name: str, value: Any, hint: str, *, nonempty: bool = True) -> str:
    """``value`` as a (non-empty) string, or a DataError at ``rec``/``name``."""
    expected = "a non-empty string" if nonempty else "a string"
    if value is _MISSING:
        raise rec.error(name, f"{expected} (field missing; see {hint})")
    if not isinstance(value, str):
        raise rec.error(name, f"{expected} (got {_describe(value)})")
    if nonempty and not value.strip():
        raise rec.error(name, f"{expected} (got an empty string)")
    return value


def _instruction_shape(rec: Record, f: RecordFields) -> _Texts:
    """Shape (a): ``instruction`` (+ optional ``input``) and ``output``."""
    hint = f.option("instruction")
    if f.instruction not in rec:
        hint += f", or {f.option('conversations')} for conversation records"
    instruction = _text(rec, f.instruction, rec.get(f.instruction, _MISSING), hint)
    extra = rec.get(f.input)
    if extra is not None and not isinstance(extra, str):
        raise rec.error(f.input, f"a string (got {_describe(extra)})")
    extra = extra if extra and extra.strip() else ""
    output = _text(rec, f.output, rec.get(f.output, _MISSING), f.option("output"))
    prompt = f"{instruction}\n{extra}" if extra else instruction
    embed = EMBED_TEXTS[f.embed_text](instruction, extra)
    return _Texts(embed, output, (prompt,), (output,), (("user", prompt), ("assistant", output)))


def _conversation_shape(rec: Record, f: RecordFields) -> _Texts:
    """Shape (b): ``conversations: [{from, value}]``; system turns are kept but not used."""
    conv = rec[f.conversations]
    if not isinstance(conv, list) or not conv:
        got = "an empty list" if isinstance(conv, list) else _describe(conv)
        raise rec.error(f.conversations, f"a non-empty list of turns (got {got})")
    known = (*f.user_roles, *f.assistant_roles, SYSTEM_ROLE)
    users: list[str] = []
    assistants: list[str] = []
    turns: list[tuple[str, str]] = []
    for t, turn in enumerate(conv):
        where = f"{f.conversations}[{t}]"
        if not isinstance(turn, dict):
            raise rec.error(where, f"a turn object with {f.role!r} and {f.content!r} (got {_describe(turn)})")
        role = _text(rec, f"{where}.{f.role}", turn.get(f.role, _MISSING), f.option("role"))
        if role not in known:
            raise rec.error(f"{where}.{f.role}", f"a role in {', '.join(known)} (got {role!r}; "
                                                 "see --user-roles, --assistant-roles)")
        is_system = role not in f.user_roles and role not in f.assistant_roles
        content = _text(rec, f"{where}.{f.content}", turn.get(f.content, _MISSING), f.option("content"),
                        nonempty=not is_system)
        if role in f.user_roles:
            users.append(content)
            turns.append(("user", content))
        elif role in f.assistant_roles:
            assistants.append(content)
            turns.append(("assistant", content))
        else:
            turns.append((SYSTEM_ROLE, content))
    if not users:
        raise rec.error(f.conversations, f"a conversation with a user turn (roles {', '.join(f.user_roles)}; "
                                         "see --user-roles)")
    if not assistants:
        raise rec.error(f.conversations, f"a conversation with an assistant turn (roles "
                                         f"{', '.join(f.assistant_roles)}; see --assistant-roles)")
    return _Texts(users[0], "\n".join(assistants), tuple(users), tuple(assistants), tuple(turns))


#: Whether a record has a (non-null) conversations field -> the normaliser of its shape.
SHAPES: dict[bool, Callable[[Record, RecordFields], _Texts]] = {True: _conversation_shape, False: _instruction_shape}


def _task_from_field(rec: Record, f: RecordFields, file: str | None) -> str:
    return _text(rec, f.task, rec.get(f.task, _MISSING), "--task-field, or --task-from file for "
                 "a directory of one file per task").strip()


def _task_from_file(rec: Record, f: RecordFields, file: str | None) -> str:
    return Path(file).stem


#: ``--task-from`` -> ``fn(record, fields, source file name or None) -> task label``.
TASK_SOURCES: Registry = Registry("--task-from source")
TASK_SOURCES.register("field", _task_from_field)
TASK_SOURCES.register("file", _task_from_file)


# --------------------------------------------------------------------------- reading


def file_order_key(name: str) -> tuple:
    """Sort key for per-group files: the first integer in the name (``2.json`` before ``10.json``), then the name."""
    match = re.search(r"\d+", name)
    return (0, int(match.group()), name) if match else (1, 0, name)


def _read_directory(source: str, on_invalid: str) -> Iterator[tuple[Record, str]]:
    for path in record_files(source, key=lambda p: file_order_key(p.name)):
        for rec in read_records(str(path), on_invalid=on_invalid):
            yield rec, path.name


def load_records(
    source: str,
    fields: RecordFields = RecordFields(),
    *,
    format: str = "auto",
    split: str = "train",
    on_invalid: str = "error",
    need_task: bool = False,
    grouped: bool = False,
) -> InstructionRecords:
    """Read ``source`` and normalise every record (§2).

    ``need_task`` requires a task label on every record (the Task metric); with
    ``fields.task_from == "file"`` the label is the file stem and ``source`` must be a
    directory. A bad record raises a one-line :class:`DataError`; ``on_invalid="skip"`` drops
    it, counting it in ``source["n_skipped"]``. ``grouped`` reads a grouping run's output, whose
    records carry ``fields.group_field`` already.
    """
    if on_invalid not in ON_INVALID:
        raise MmkitError(f"expected one of {', '.join(ON_INVALID)}, got {on_invalid!r}", field="--on-invalid")
    EMBED_TEXTS.resolve(fields.embed_text, field="--embed-text")
    task_of = TASK_SOURCES.resolve(fields.task_from, field="--task-from")
    fmt = detect_format(source) if format == "auto" else format
    directory = fmt == "dir"
    if fields.task_from == "file" and not directory:
        raise MmkitError("--task-from file needs a directory of record files, one file per task",
                         file=source, field="--task-from")
    need_task = need_task or fields.task_from == "file"
    stream = (_read_directory(source, on_invalid) if directory else
              ((rec, None) for rec in read_records(source, format=fmt, split=split, on_invalid=on_invalid)))
    records: list[Record] = []
    texts: list[_Texts] = []
    tasks: list[str] = []
    files: list[str] = []
    rows: list[int] = []
    skipped = 0
    for row, (rec, file) in enumerate(stream):
        if fields.group_field in rec and not grouped:
            raise rec.error(fields.group_field, f"no {fields.group_field!r} field (the grouped output adds it; "
                                                "pass --group-field NAME to name that column differently)")
        try:
            normalised = SHAPES[rec.get(fields.conversations) is not None](rec, fields)
            task = task_of(rec, fields, file) if need_task else None
        except DataError as err:
            if on_invalid != "skip":
                raise
            skipped += 1
            log.warning("skipped: %s", err)
            continue
        records.append(rec)
        texts.append(normalised)
        rows.append(row)
        if need_task:
            tasks.append(task)
        if directory:
            files.append(file)
    if skipped:
        log.warning("%s: skipped %d invalid record(s) (--on-invalid skip)", source, skipped)
    if not records:
        raise DataError("no valid records" if skipped else "no records", file=source)
    entry = fingerprint(source)
    info = {"path": source, "format": fmt, "n_records": len(records), "n_skipped": skipped,
            "sha256": entry.get("sha256")}
    task_order = None
    if fields.task_from == "file":
        task_order = list(dict.fromkeys(Path(name).stem for name in files))
    return InstructionRecords(
        records=records, instruction_text=[t.instruction for t in texts], response_text=[t.response for t in texts],
        prompt_turns=[t.prompt_turns for t in texts], response_turns=[t.response_turns for t in texts],
        conversations=[t.turns for t in texts],
        rows=np.asarray(rows, dtype=np.int64), source=info, fields=fields,
        task=tasks if need_task else None, task_order=task_order, source_file=files if directory else None,
    )
