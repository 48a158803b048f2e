"""mmkit/cluster/records.py: the normalised view of instruction data (cluster.md §2, §10 item 12)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmkit.cluster.metrics import METRICS, MetricOptions
from mmkit.cluster.records import InstructionRecords, RecordFields, file_order_key, load_records
from mmkit.errors import DataError, MmkitError

ROWS = [
    {"instruction": f"{verb} the {noun}", "input": extra, "output": " ".join(["word"] * (i % 5 + 1)),
     "task": task}
    for i, (verb, noun, extra, task) in enumerate([
        ("sort", "list", "", "code"), ("explain", "rule", "offside", "sport"), ("bake", "cake", "", "food"),
        ("reverse", "string", "abc", "code"), ("score", "goal", "", "sport"), ("slice", "bread", "", "food"),
        ("merge", "dicts", "", "code"), ("name", "team", "", "sport"), ("roast", "chicken", "2 kg", "food"),
        ("parse", "json", "", "code"), ("count", "players", "", "sport"), ("boil", "eggs", "", "food"),
    ])
]


def write_forms(tmp_path, rows) -> dict[str, str]:
    """The same records as JSONL, JSON, parquet and a save_to_disk directory."""
    import pandas as pd
    from datasets import Dataset

    paths = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
             "hf": tmp_path / "hf"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows, indent=1))
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    Dataset.from_list(rows).save_to_disk(str(paths["hf"]))
    return {k: str(v) for k, v in paths.items()}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_import_does_not_import_torch():
    code = ("import sys, mmkit.cluster.records, mmkit.cluster.metrics, mmkit.cluster.summary; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_four_file_forms_give_identical_views_and_labels(tmp_path):
    views = {fmt: load_records(path, need_task=True) for fmt, path in write_forms(tmp_path, ROWS).items()}
    ref = views["jsonl"]
    assert ref.instruction_text[1] == "explain the rule\noffside" and ref.instruction_text[0] == "sort the list"
    options = MetricOptions(tokenizer="whitespace", k=3)
    expected = {m: METRICS[m](ref, options if m == "length" else MetricOptions()).labels for m in ("task", "length")}
    for fmt, view in views.items():
        assert view.instruction_text == ref.instruction_text and view.response_text == ref.response_text
        assert view.task == ref.task and view.source["format"] == fmt and view.source["n_records"] == 12
        for metric, labels in expected.items():
            got = METRICS[metric](view, options if metric == "length" else MetricOptions()).labels
            np.testing.assert_array_equal(got, labels, err_msg=f"{fmt} {metric}")
    assert ref.source["sha256"] and ref.source["n_skipped"] == 0
    assert ref.records[1] == ROWS[1]  # the original record, unchanged


def test_embed_text_modes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    only = load_records(path, RecordFields(embed_text="instruction"))
    assert only.instruction_text[1] == "explain the rule"
    assert load_records(path).prompt_turns[1] == ("explain the rule\noffside",)
    with pytest.raises(MmkitError, match="--embed-text.*unknown --embed-text mode 'instruction\\+inptu'"):
        load_records(path, RecordFields(embed_text="instruction+inptu"))


def test_sharegpt_shape_roles_and_custom_fields(tmp_path):
    conv = [
        {"role": "system", "text": "be brief"},
        {"role": "customer", "text": "first question"},
        {"role": "agent", "text": "first answer"},
        {"role": "customer", "text": "second question"},
        {"role": "agent", "text": "second answer here"},
    ]
    rows = [{"dialog": conv}, {"q": "plain", "a": "reply"}]
    fields = RecordFields(conversations="dialog", role="role", content="text", user_roles=("customer",),
                          assistant_roles=("agent",), instruction="q", output="a")
    view = load_records(write_jsonl(tmp_path / "c.jsonl", rows), fields)
    assert view.instruction_text == ["first question", "plain"]
    assert view.response_text == ["first answer\nsecond answer here", "reply"]
    assert view.response_turns[0] == ("first answer", "second answer here")
    assert view.prompt_turns[0] == ("first question", "second question")
    texts, owner = view.turn_texts("total")
    assert "be brief" not in texts and owner.tolist() == [0, 0, 0, 0, 1, 1]
    lengths = METRICS["length"](view, MetricOptions(tokenizer="whitespace")).extra["lengths"]
    assert lengths.tolist() == [2 + 3, 1]  # summed over assistant turns, system never counted

    mixed = write_forms(tmp_path, [{**row, **{k: None for k in ("dialog", "q", "a") if k not in row}} for row in rows])
    for fmt, path in mixed.items():  # tables hold both shapes, with nulls in the other shape's columns
        assert load_records(path, fields).response_text == view.response_text, fmt

    default = load_records(write_jsonl(tmp_path / "d.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                           {"from": "user", "value": "more"}, {"from": "assistant", "value": "sure"}]}]))
    assert default.instruction_text == ["hi"] and default.response_text == ["hello\nsure"]


@pytest.mark.parametrize("record, message", [
    ({"instruction": "x"}, "output: a non-empty string (field missing; see --output-field)"),
    ({"instruction": "x", "output": 3}, "output: a non-empty string (got int)"),
    ({"instruction": "x", "output": None}, "output: a non-empty string (got null)"),
    ({"instruction": "  ", "output": "y"}, "instruction: a non-empty string (got an empty string)"),
    ({"instruction": "x", "input": 5, "output": "y"}, "input: a string (got int)"),
    ({"prompt": "x", "output": "y"}, "instruction: a non-empty string (field missing; see --instruction-field, "
                                     "or --conversations-field for conversation records)"),
    ({"conversations": [{"from": "bot", "value": "x"}]},
     "conversations[0].from: a role in human, user, gpt, assistant, system (got 'bot'; "
     "see --user-roles, --assistant-roles)"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]},
     "conversations[1].value: a non-empty string (field missing; see --content-field)"),
    ({"conversations": [{"from": "human", "value": "x"}]},
     "conversations: a conversation with an assistant turn (roles gpt, assistant; see --assistant-roles)"),
    ({"conversations": []}, "conversations: a non-empty list of turns (got an empty list)"),
    ({"conversations": ["hi"]}, "conversations[0]: a turn object with 'from' and 'value' (got str)"),
    ({"instruction": "x", "output": "y", "group": 3},
     "group: no 'group' field (the grouped output adds it; pass --group-field NAME to name that column differently)"),
])
def test_errors_are_one_line_with_file_line_and_field(tmp_path, monkeypatch, record, message):
    monkeypatch.chdir(tmp_path)
    rows = [ROWS[i % 12] for i in range(16)] + [record]
    write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_records("data.jsonl")
    assert str(err.value) == f"data.jsonl:17: {message}"
    assert "\n" not in str(err.value)


def test_error_hints_use_the_configured_name_and_rows_for_tables(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame([{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": ""}]).to_parquet(path)
    with pytest.raises(DataError, match=r"d.parquet:row 2: answer: a non-empty string \(got an empty string\)$"):
        load_records(str(path), RecordFields(instruction="prompt", output="answer"))


def test_missing_task_label_when_needed(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [ROWS[0], {"instruction": "x", "output": "y"}])
    assert load_records(path).task is None  # not needed, not checked
    with pytest.raises(DataError, match=r"t.jsonl:2: task: a non-empty string \(field missing; see --task-field"):
        load_records(path, need_task=True)


def test_skip_drops_and_counts_invalid_records(tmp_path, caplog):
    rows = [ROWS[0], {"instruction": "x"}, ROWS[1], {"instruction": "x", "output": ""}, ROWS[2]]
    with caplog.at_level("WARNING", logger="mmkit"):
        view = load_records(write_jsonl(tmp_path / "s.jsonl", rows), on_invalid="skip")
    assert len(view) == 3 and view.source["n_skipped"] == 2 and view.source["n_records"] == 3
    assert view.rows.tolist() == [0, 2, 4]  # positions in the input
    assert "skipped 2 invalid record(s)" in caplog.text
    with pytest.raises(MmkitError, match="--on-invalid: expected one of error, skip"):
        load_records(write_jsonl(tmp_path / "s.jsonl", rows), on_invalid="drop")


def test_directory_one_file_per_task_in_numeric_order(tmp_path):
    root = tmp_path / "groups"
    root.mkdir()
    for name, rows in [("10.json", ROWS[:2]), ("2.json", ROWS[2:5]), ("b.jsonl", ROWS[5:6]), ("1a.jsonl", ROWS[6:7])]:
        if name.endswith(".json"):
            (root / name).write_text(json.dumps(rows))
        else:
            write_jsonl(root / name, rows)
    assert sorted(["10.json", "2.json", "b.jsonl", "1a.jsonl"], key=file_order_key) == \
        ["1a.jsonl", "2.json", "10.json", "b.jsonl"]
    view = load_records(str(root), RecordFields(task_from="file"))
    assert view.source_file == ["1a.jsonl", "2.json", "2.json", "2.json", "10.json", "10.json", "b.jsonl"]
    assert view.task_order == ["1a", "2", "10", "b"] and view.task[1] == "2"
    assert view.records[1:4] == ROWS[2:5]
    by_field = load_records(str(root), need_task=True)
    assert by_field.task[1] == ROWS[2]["task"] and by_field.task_order is None
    with pytest.raises(MmkitError, match="--task-from: --task-from file needs a directory"):
        load_records(write_jsonl(tmp_path / "one.jsonl", ROWS), RecordFields(task_from="file"))


def test_sample_is_uniform_seeded_and_in_input_order(tmp_path):
    rows = [dict(ROWS[i % 12], id=i) for i in range(40)]
    view = load_records(write_jsonl(tmp_path / "d.jsonl", rows), need_task=True)
    picked = view.sample(10, seed=3)
    rng = np.random.default_rng(np.random.SeedSequence([3, 1]))
    expected = np.sort(rng.choice(40, size=10, replace=False))
    assert [r["id"] for r in picked.records] == expected.tolist()
    assert picked.rows.tolist() == expected.tolist() and len(picked.task) == 10
    assert picked.source["n_records"] == 10 and picked.source["sampled_from"] == 40
    assert view.sample(10, seed=3).rows.tolist() == expected.tolist()
    assert view.sample(10, seed=4).rows.tolist() != expected.tolist()
    assert view.sample(100) is view


def test_builtin_sharegpt_pairs(sharegpt_available):
    view = load_records("builtin:sharegpt")
    assert isinstance(view, InstructionRecords) and len(view) == 61_089
    assert view.source["n_skipped"] == 0 and view.source["format"] == "builtin"
    picked = view.sample(2000, seed=0)
    assert len(picked) == 2000 and all(picked.instruction_text) and all(picked.response_text)
