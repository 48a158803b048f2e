"""Tests of mmkit/io.py: record readers, error locations, atomic writes, run dirs, results."""

from __future__ import annotations

import io as stdio
import json
from pathlib import Path

import pytest

from mmkit import __version__
from mmkit import io as mio
from mmkit.errors import DataError, MmkitError

ROWS = [{"q": "a dog", "label": 1}, {"q": "a cat", "label": 0}]


def write_all_formats(tmp_path):
    """The same two records in every file format the readers take."""
    import pandas as pd
    from datasets import Dataset

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS, indent=1))
    paths["csv"] = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(paths["csv"], index=False)
    paths["tsv"] = tmp_path / "d.tsv"
    pd.DataFrame(ROWS).to_csv(paths["tsv"], index=False, sep="\t")
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(paths["parquet"])
    paths["hf"] = tmp_path / "hf"
    Dataset.from_list(ROWS).save_to_disk(str(paths["hf"]))
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet", "hf"])
def test_every_format_reads_the_same_records_with_mapping(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    assert mio.detect_format(str(path)) == fmt
    recs = list(mio.read_records(str(path), fields={"text": "q"}, required=["text", "label"]))
    assert [r["text"] for r in recs] == ["a dog", "a cat"]
    assert [int(r["label"]) for r in recs] == [1, 0]  # CSV gives strings; callers coerce
    tabular = fmt in {"csv", "tsv", "parquet", "hf"}
    expected_locs = ["row 1", "row 2"] if tabular else ([1, 2] if fmt == "jsonl" else [2, 6])
    assert [r.loc for r in recs] == expected_locs


def test_json_array_lines_point_at_each_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"q": "a"},\n\n  {"x": "b"}\n]\n')
    with pytest.raises(DataError) as err:
        list(mio.read_records(str(path), required=["q"]))
    assert str(err.value).startswith(f"{path}:4: q: missing field")


def test_malformed_jsonl_names_line_and_skip_mode(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a"}\n{"q": \n[1, 2]\n{"q": "d"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: json: malformed JSON"):
        list(mio.read_records(str(path)))
    kept = list(mio.read_records(str(path), on_invalid="skip"))
    assert [r.loc for r in kept] == [1, 4]
    assert "expected a JSON object" in caplog.text


def test_missing_field_reports_the_users_name(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a"}\n{"questoin": "b"}\n')
    with pytest.raises(DataError) as err:
        list(mio.read_records(str(path), fields={"text": "question"}, required=["text"]))
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: question: missing field (mapped to 'text')")
    assert "did you mean 'questoin'" in msg


def test_csv_rows_and_extra_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,label\na,1\nb,0,extra\n")
    with pytest.raises(DataError, match=rf"{path}:row 2: csv: more values"):
        list(mio.read_records(str(path)))


def test_record_require_checks_type_and_emptiness(tmp_path):
    rec = mio.Record({"a": "", "b": 3}, "f.jsonl", 7)
    with pytest.raises(DataError, match="f.jsonl:7: a: expected a non-empty value"):
        rec.require("a")
    with pytest.raises(DataError, match="f.jsonl:7: b: expected str, got int"):
        rec.require("b")
    assert rec.require("b", int) == 3


def test_directory_of_files_in_lexicographic_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"q": "second"}\n')
    (tmp_path / "a.jsonl").write_text('{"q": "first"}\n')
    recs = list(mio.read_records(str(tmp_path)))
    assert [r["q"] for r in recs] == ["first", "second"]
    assert recs[1].source.endswith("b.jsonl")


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", stdio.StringIO('{"q": "a"}\n'))
    recs = list(mio.read_records("-"))
    assert recs[0]["q"] == "a" and recs[0].source == "<stdin>"


def test_missing_paths_and_unknown_types(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        mio.detect_format("./nope.jsonl")
    odd = tmp_path / "d.xml"
    odd.write_text("<a/>")
    with pytest.raises(DataError, match="unknown file type .xml"):
        mio.detect_format(str(odd))
    assert mio.detect_format("org/dataset") == "hub"
    with pytest.raises(MmkitError, match="unknown built-in data set 'sharegtp'.*'sharegpt'"):
        list(mio.read_records("builtin:sharegtp"))


def test_builtin_sharegpt_pairs(sharegpt_available):
    """The truncated packaged file decodes incrementally into 61,089 human->gpt pairs (cluster.md §2)."""
    n, first = 0, None
    for rec in mio.read_records("builtin:sharegpt", required=["instruction", "output"]):
        first = first or rec
        n += 1
    assert n == 61_089
    assert first["input"] == "" and "#" in first["id"] and first["instruction"].strip() == first["instruction"]


def test_iter_json_array_truncated():
    text = '[{"a": 1}, {"a": 2}, {"a": '
    assert [o for _, o in mio.iter_json_array(text, "t", truncated_ok=True)] == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match="t:1: json: malformed JSON"):
        list(mio.iter_json_array(text, "t"))


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with mio.atomic_write(target) as fh:
            fh.write("half")
            raise RuntimeError
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with mio.atomic_dir(target) as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with mio.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(MmkitError, match="already exists"):
        with mio.atomic_dir(target):
            pass
    with mio.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


# ------------------------------------------------------------------ run dirs and results


def test_run_dir_create_resume_overwrite(tmp_path):
    out = tmp_path / "run"
    run = mio.open_run_dir(out, "toy")
    assert not run.resumed
    (out / "results.json").write_text("{}")
    assert mio.open_run_dir(out, "toy").resumed
    fresh = mio.open_run_dir(out, "toy", overwrite=True)
    assert not fresh.resumed and not (out / "results.json").exists()


def test_run_dir_refuses_foreign_folders(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(MmkitError, match="not an mmkit run directory"):
        mio.open_run_dir(tmp_path, "toy", overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def test_default_out_is_timestamped():
    assert mio.default_out("prune-data").startswith("runs/prune-data-")


def test_results_schema(tmp_path):
    run = mio.open_run_dir(tmp_path / "r", "evaluate")
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": 1}\n')
    res = mio.write_results(run, method="mmr", config={"k": 1}, metrics={"ra": 50.0},
                            per_category={"color": {"ra": 100.0}}, seed=3,
                            models={"m": {"id": "x", "revision": None}}, data=mio.fingerprint(str(data), 1))
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk == res
    assert list(res) == ["mmkit_version", "command", "method", "config", "metrics", "per_category", "seed",
                         "models", "data", "started", "finished", "wall_s"]
    assert res["mmkit_version"] == __version__ and res["command"] == "evaluate"
    assert res["data"]["sha256"] == mio.sha256_file(data) and res["data"]["n"] == 1
    assert res["wall_s"] >= 0


def test_percent_null_on_zero_denominator(caplog):
    assert mio.percent(1, 4, "acc") == 25.0
    assert mio.percent(0, 0, "acc") is None
    assert "acc: denominator is 0" in caplog.text


def test_fingerprints(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("x")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "f").write_text("1")
    before = mio.fingerprint(str(d))["sha256"]
    (d / "f").write_text("2")
    assert mio.fingerprint(str(d))["sha256"] != before
    import hashlib

    assert mio.fingerprint(str(a))["sha256"] == hashlib.sha256(b"x").hexdigest()
    assert mio.fingerprint("org/ds", revision="abc")["fingerprint"] == "org/ds@abc"


def test_predictions_resume_drops_a_cut_off_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    preds = mio.Predictions(path)
    preds.append({"uid": "a#0", "prediction": "A"})
    preds.append({"uid": "a#1", "prediction": "B"})
    with open(path, "a") as fh:
        fh.write('{"uid": "b#0", "predic')  # killed mid-write
    again = mio.Predictions(path)
    assert "a#0" in again and "a#1" in again and "b#0" not in again
    again.append({"uid": "b#0", "prediction": "C"})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["uid"] for x in lines] == ["a#0", "a#1", "b#0"]


def test_predictions_mid_file_damage_is_an_error_not_a_silent_truncation(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"uid": "a"}\nnot json\n{"uid": "c"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: uid: expected a JSON object"):
        mio.Predictions(path)
    assert path.read_text().count("\n") == 3  # nothing deleted


def test_run_dir_of_another_command_is_refused(tmp_path):
    mio.open_run_dir(tmp_path / "r", "distill")
    (tmp_path / "r" / "results.json").write_text("{}")
    with pytest.raises(MmkitError, match="holds a run of 'mmkit distill'"):
        mio.open_run_dir(tmp_path / "r", "evaluate")


def test_null_field_is_not_called_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": null}\n')
    with pytest.raises(DataError, match=rf"{path}:1: q: expected a value, got null"):
        list(mio.read_records(str(path), required=["q"]))


def test_write_jsonl_to_stdout(capsys):
    assert mio.write_jsonl("-", [{"a": 1}, {"b": "é"}]) == 2
    assert capsys.readouterr().out == '{"a": 1}\n{"b": "é"}\n'


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "env"))
    assert mio.cache_root() == tmp_path / "env"
    assert mio.cache_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("MMKIT_CACHE")
    assert mio.cache_root() == Path("~/.cache/mmkit").expanduser()


def test_start_run_saves_config_and_logs(tmp_path):
    import logging
    from dataclasses import dataclass

    import yaml

    @dataclass
    class C:
        k: int = 3

    run = mio.start_run(tmp_path / "r", "toy", C())
    logging.getLogger("mmkit").info("hello log")
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"k": 3}
    assert "hello log" in (run / "log.txt").read_text()
    second = mio.start_run(tmp_path / "r2", "toy", C())
    logging.getLogger("mmkit").info("second")
    assert "second" not in (run / "log.txt").read_text()  # the old run's log is detached
    assert "second" in (second / "log.txt").read_text()


@pytest.mark.parametrize("fmt", sorted(mio.WRITERS))
def test_write_records_round_trips_through_the_readers(tmp_path, fmt):
    recs = [{"q": "a dog", "label": 1, "tags": ["x"]}, {"q": "a cat", "label": 0, "tags": []}]
    path = mio.write_records(tmp_path / "out", recs, fmt)
    assert mio.detect_format(str(path)) == fmt
    assert [dict(r) for r in mio.read_records(str(path))] == recs


def test_atomic_outputs_get_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        mio.write_json(tmp_path / "a.json", {})
        with mio.atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_discard_removes_a_new_run_but_never_a_resumed_one(tmp_path):
    run = mio.open_run_dir(tmp_path / "new", "toy")
    run.discard()
    assert not (tmp_path / "new").exists()
    first = mio.open_run_dir(tmp_path / "old", "toy")
    (first / "results.json").write_text("{}")
    again = mio.open_run_dir(tmp_path / "old", "toy")
    again.discard()
    assert (tmp_path / "old" / "results.json").exists()
