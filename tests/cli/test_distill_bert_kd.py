"""End-to-end tests of `mmkit distill bert-kd` and `mmkit distill build-cache` (mmkit/cli/distill.py), offline."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from mmkit.cli import build_app
from tests.distill.test_bert_kd import write_task

runner = CliRunner()
SMALL = ["--epochs", "1", "--batch-size", "16", "--set", "loss.attention.relation_heads=4"]


def invoke(*args: str):
    return runner.invoke(build_app(), ["distill", *args])


@pytest.fixture(scope="module")
def models(make_tiny_bert):
    return make_tiny_bert(num_layers=4, hidden=64, classifier=True, num_attention_heads=4), make_tiny_bert()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-kd-cli")
    return write_task(folder / "train.jsonl", 64, 0), write_task(folder / "test.jsonl", 32, 1), folder


def test_bert_kd_cli_end_to_end_then_resume(tmp_path, models, data):
    from transformers import AutoModelForSequenceClassification

    teacher, student = models
    out = tmp_path / "run"
    args = ["--teacher", teacher, "--student", student, "--task", data[0], "--eval-data", data[1], *SMALL,
            "--set", "diagnostic.metrics=[cca]", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    result = invoke("bert-kd", *args, "--json")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout[result.stdout.index("{"):])
    metrics = results["metrics"]
    assert results["command"] == "distill bert-kd" and results["cca_term"] == "mmkit stand-in"
    assert metrics["cache"] == "built" and metrics["steps"] == 4 and metrics["layer_map"] == [2, 4]
    assert 0 <= metrics["student"]["accuracy"] <= 100 and metrics["eval_examples"] == 32
    assert set(metrics["cca_mapped_mean_before"]) == {"cca"}
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "results.json", "log.txt", "checkpoint", "checkpoints", "distill_heads.safetensors",
            "layer_map.json", "cca_before.json", "cca_after.json", "cca_before_cca.png", "cca_after_cca.png"} <= names
    model = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint")
    assert model.config.num_labels == 2 and model.config.distill["cca_term"] == "mmkit stand-in"

    again = invoke("bert-kd", *args, "--json")  # same --out: resumes (nothing left to train); cache hit
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout[again.stdout.index("{"):])["metrics"]["cache"] == "hit"


def test_build_cache_then_bert_kd_reads_it(tmp_path, models, data):
    teacher, student = models
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": "bert-kd", "teacher": {"id": teacher, "finetune": False}, "student": {"id": student},
        "data": {"task": data[0]}, "loss": {"attention": {"relation_heads": 4}},
        "train": {"epochs": 1, "batch_size": 32}, "diagnostic": {"enabled": False},
        "cache": {"mode": "on", "dir": str(tmp_path / "cache")}}))
    built = invoke("build-cache", "--config", str(config), "--out", str(tmp_path / "build"), "--json")
    assert built.exit_code == 0, built.output
    metrics = json.loads(built.stdout[built.stdout.index("{"):])["metrics"]
    assert metrics["cache"] == "built" and metrics["examples"] == 64
    assert "tok.h.L4" in metrics["targets"] and "tok.v.L2" in metrics["targets"]
    used = invoke("bert-kd", "--config", str(config), "--out", str(tmp_path / "run"), "--json")
    assert used.exit_code == 0, used.output
    assert json.loads(used.stdout[used.stdout.index("{"):])["metrics"]["cache"] == "hit"


def test_diagnose_only_writes_the_grid_and_trains_nothing(tmp_path, models, data):
    teacher, student = models
    out = tmp_path / "diag"
    result = invoke("bert-kd", "--teacher", teacher, "--student", student, "--task", data[0], *SMALL,
                    "--set", "diagnostic.plots=false", "--diagnose-only", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{"):])["metrics"]
    assert "steps" not in metrics and "cca_mapped_mean_after" not in metrics
    report = json.loads((out / "cca_before.json").read_text())
    assert report["unit"] == "token" and report["student_layers"] == [0, 1, 2] and report["teacher_layers"] == [0, 1, 2, 3, 4]
    assert not (out / "checkpoint").exists()


def _other_tokenizer_student(student: str, folder) -> str:
    from transformers import AutoTokenizer

    path = folder / "other-vocab"
    if not path.exists():
        shutil.copytree(student, path)
        tok = AutoTokenizer.from_pretrained(student)
        tok.add_tokens(["zzzunseen"])
        tok.save_pretrained(path)
    return str(path)


def _labels3(folder) -> str:
    path = folder / "three.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                            for t, lab in [("a dog", "a"), ("a cat", "b"), ("a car", "c")]))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("tokenizer", "the teacher and student tokenizers differ, but loss terms hid, att, cca compare token positions"),
    ("layer_map", "layer_map: teacher layer 5 is out of range 1..4"),
    ("label_field", "train.jsonl:1: y: missing field; fields here: text, text_pair, label"),
    ("labels", "the teacher's classification head has 2 labels but the task"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, models, data, case, message):
    teacher, student = models
    task = data[0]
    extra: list[str] = []
    if case == "tokenizer":
        student = _other_tokenizer_student(student, data[2])
    elif case == "layer_map":
        extra = ["--layer-map", "2,5"]
    elif case == "label_field":
        extra = ["--label-field", "y"]
    else:
        task = _labels3(data[2])
    out = tmp_path / "run"
    result = invoke("bert-kd", "--teacher", teacher, "--student", student, "--task", task, "--eval-data", task,
                    *SMALL, *extra, "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()  # nothing half-written
