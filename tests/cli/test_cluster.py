"""End-to-end tests of `mmkit cluster-instructions` (mmkit/cli/cluster.py, cluster/grouping.py)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mmkit.cli import app

runner = CliRunner()
TOPICS = {"code": "write python code to sort a list of numbers",
          "cook": "how do i bake a loaf of bread at home",
          "math": "what is the derivative of x squared"}


@pytest.fixture
def data(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "data.jsonl"
    with open(path, "w") as fh:
        for i in range(60):
            task = list(TOPICS)[i % 3]
            fh.write(json.dumps({"instruction": f"{TOPICS[task]} {i}", "input": "",
                                 "output": " ".join(["word"] * rng.randint(1, 30)), "task": task}) + "\n")
    return path


def invoke(*args: str):
    result = runner.invoke(app, ["cluster-instructions", *args])
    return result


SUMMARY_KEYS = {"mmkit_version", "argv", "metric", "params", "source", "k_requested", "k_effective", "groups",
                "small_groups", "quality", "kmeans", "timings_s", "versions"}


@pytest.mark.parametrize("metric, extra", [
    ("task", []),
    ("length", ["--tokenizer", "whitespace", "--k", "4"]),
    ("embedding", ["--k", "3"]),
])
def test_each_metric_writes_the_run_directory(tmp_path, data, tiny_bert, metric, extra):
    if metric == "embedding":
        extra = [*extra, "--encoder", tiny_bert]
    out = tmp_path / "run"
    result = invoke(str(data), "--metric", metric, *extra, "--batch-size", "4", "--epochs", "2",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"grouped.jsonl", "summary.json", "order.jsonl", "results.json", "config.yaml", "log.txt"} <= names
    assert ("centroids.safetensors" in names) == (metric == "embedding")
    grouped = [json.loads(x) for x in (out / "grouped.jsonl").read_text().splitlines()]
    original = [json.loads(x) for x in data.read_text().splitlines()]
    assert [g["_row"] for g in grouped] == list(range(60))
    assert all({k: g[k] for k in o} == o for g, o in zip(grouped, original))  # records unchanged
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert sum(g["size"] for g in summary["groups"]) == 60
    results = json.loads((out / "results.json").read_text())
    assert {"k_requested", "k_effective", "group_sizes", "small_groups", "quality"} <= set(results["metrics"])
    order = [json.loads(x) for x in (out / "order.jsonl").read_text().splitlines()]
    header = order[0]["header"]
    assert (header["B"], header["W"], header["A"], header["epochs"]) == (4, 1, 1, 2)
    steps = order[1:]
    assert len(steps) == 2 * header["steps_per_epoch"]
    labels = [g["group"] for g in grouped]
    for step in steps:  # every update comes from the group it names
        rows = [i for a in step["batches"] for w in a for i in w]
        assert {labels[i] for i in rows} == {step["group"]}
    if metric == "task":  # the groups are exactly the task labels
        assert {g["group_name"] for g in grouped if g["task"] == "code"} == {"code"}


def test_out_dash_streams_records_only(tmp_path, data):
    proc = subprocess.run([sys.executable, "-m", "mmkit", "cluster-instructions", str(data), "--metric", "length",
                           "--tokenizer", "whitespace", "--out", "-"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 60 and all({"group", "group_name", "_row"} <= set(x) for x in lines)
    refused = invoke(str(data), "--metric", "task", "--out", "-", "--batch-size", "4")
    assert refused.exit_code == 2 and "--batch-size needs a run directory" in refused.output


def test_stdin_input(tmp_path, data):
    proc = subprocess.run([sys.executable, "-m", "mmkit", "cluster-instructions", "-", "--metric", "task",
                           "--out", "-"], input=data.read_text(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 60


def test_order_subcommand_and_materialize(tmp_path, data):
    first = tmp_path / "run"
    assert invoke(str(data), "--metric", "task", "--out", str(first)).exit_code == 0
    out, rows = tmp_path / "w2", tmp_path / "e0.jsonl"
    result = invoke("order", str(first / "grouped.jsonl"), "--batch-size", "2", "--world-size", "2",
                    "--epochs", "1", "--out", str(out), "--materialize", str(rows))
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "order.jsonl").read_text().splitlines()]
    assert lines[0]["header"]["U"] == 4 and len(lines) == 1 + 15
    flat = [i for step in lines[1:] for a in step["batches"] for w in a for i in w]
    materialized = [json.loads(x)["_row"] for x in rows.read_text().splitlines()]
    assert materialized == flat and sorted(flat) == list(range(60))


def test_train_two_steps_both_orderings(tmp_path, data, tiny_causal_lm):
    first = tmp_path / "run"
    assert invoke(str(data), "--metric", "task", "--out", str(first)).exit_code == 0
    out = tmp_path / "sft"
    result = invoke("train", str(first / "grouped.jsonl"), "--model", tiny_causal_lm, "--max-steps", "2",
                    "--batch-size", "4", "--max-length", "64", "--logging-steps", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison) == {"commonit", "random"}
    for ordering in comparison:
        metrics = json.loads((out / ordering / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["heldout_loss"] > 0
        groups = [s["group"] for s in metrics["train_loss"]]
        assert all(g >= 0 for g in groups) if ordering == "commonit" else True
        assert (out / ordering / "model" / "model.safetensors").exists()


def test_help_shows_examples():
    result = runner.invoke(app, ["cluster-instructions", "--help"])
    assert result.exit_code == 0 and "mmkit cluster-instructions order" in result.output


# ------------------------------------------------------------------ bad input: one line, exit 2


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_missing_instruction_field_names_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"prompt": "a", "output": "b"}\n')
    line = one_error_line(invoke(str(bad), "--metric", "length", "--tokenizer", "whitespace",
                                 "--out", str(tmp_path / "o")))
    assert f"{bad}:2: instruction: a non-empty string (field missing" in line
    assert not (tmp_path / "o" / "grouped.jsonl").exists()


def test_k_larger_than_records(tmp_path, data, tiny_bert):
    line = one_error_line(invoke(str(data), "--metric", "embedding", "--encoder", tiny_bert, "--k", "100",
                                 "--out", str(tmp_path / "o")))
    assert "--k" in line and "100" in line


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = one_error_line(invoke(str(empty), "--metric", "task", "--out", str(tmp_path / "o")))
    assert f"{empty}: no records" in line


def test_tokenizer_that_cannot_be_loaded(tmp_path, data):
    nothing = tmp_path / "no-tokenizer"
    nothing.mkdir()
    line = one_error_line(invoke(str(data), "--metric", "length", "--tokenizer", str(nothing),
                                 "--out", str(tmp_path / "o")))
    assert str(nothing) in line


def test_k_with_task_is_an_error(tmp_path, data):
    line = one_error_line(invoke(str(data), "--metric", "task", "--k", "3", "--out", str(tmp_path / "o")))
    assert "--k: has no meaning with --metric task" in line


def test_bad_input_leaves_no_run_directory(tmp_path, data, tiny_bert):
    out = tmp_path / "o"
    one_error_line(invoke(str(data), "--metric", "embedding", "--encoder", tiny_bert, "--k", "100", "--out", str(out)))
    assert not out.exists()


def test_train_preset_survives_unset_flags_and_keeps_recipe_defaults(tmp_path, monkeypatch):
    """--preset values reach the config unless a flag is given; unset training keys keep the
    recipe's (paper) defaults, not the generic loop's."""
    import mmkit.cluster.train as sft

    seen = {}
    monkeypatch.setattr(sft, "run_sft", lambda cfg, out, overwrite=False: seen.setdefault("cfg", cfg) and {})
    assert invoke("train", "g.jsonl", "--preset", "cpu-demo", "--batch-size", "4").exit_code == 0
    cfg = seen.pop("cfg")
    assert (cfg.max_length, cfg.records, cfg.train.max_steps, cfg.train.lr) == (512, 2000, 200, 5e-5)
    assert cfg.train.batch_size == 4
    assert invoke("train", "g.jsonl", "--max-steps", "3").exit_code == 0
    cfg = seen.pop("cfg")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.warmup_ratio, cfg.train.max_steps) == (5e-6, 3, 0.03, 3)
