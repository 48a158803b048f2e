"""End-to-end tests of `mmkit distill pesf` (mmkit/cli/distill.py, mmkit/distill/pesf.py), offline:
teacher 4 x 32 classifier, student 2 x 32 encoder (distill.md §2.7)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkit.cli import build_app
from mmkit.distill import pesf
from mmkit.io import sha256_file
from tests.distill.test_pesf import write_task

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(build_app(), ["distill", "pesf", *args])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pesf-cli")
    return (write_task(folder / "train.jsonl", 80, 0), write_task(folder / "test.jsonl", 16, 1),
            write_task(folder / "small.jsonl", 32, 2))


@pytest.fixture(scope="module")
def teacher(make_tiny_bert):
    return make_tiny_bert(num_layers=4, classifier=True)


def _results(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def _eval_logits(model, tokenizer, path, pooled: bool = False):
    """Logits (and pooled outputs) of a plain HF model on every record of ``path``, one padded batch."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        return (logits, model.bert(**enc).pooler_output) if pooled else logits


def test_pesf_end_to_end_writes_a_loadable_student_and_a_reproducible_adapter(tmp_path, sets, teacher, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, test, _ = sets
    teacher_hash = sha256_file(f"{teacher}/model.safetensors")
    out = tmp_path / "run"
    results = _results(invoke("--teacher", teacher, "--student", tiny_bert, "--task", str(train), "--eval-data",
                              str(test), "--epochs", "2", "--out", str(out), "--json"))
    assert results["command"] == "distill pesf" and results["method"] == "pesf" and results["seed"] == 44
    assert results["models"]["teacher"]["id"] == teacher and results["data"]["eval"]["n"] == 16
    m = results["metrics"]
    assert m["mode"] == "faithful" and m["steps"] == 20 and m["pkd_map"] == [[1, 2]] and m["cache"] == "built"
    assert m["adapter_params"] == 32 * 2 + 2 + 32 * 64 + 64 + 64 * 2 + 2
    assert set(m["loss_final"]) == {"loss", "soft", "ce", "pkd"}
    sharp = m["sharpness"]
    assert sharp["temperature"] == 5.0
    for who in ("teacher", "teacher_adapted", "student_init", "student_final"):
        assert set(sharp[who]) == {"t1", "tT"}
    for t in ("t1", "tT"):
        assert m["gap_before"][t] == pytest.approx(sharp["teacher"][t] - sharp["student_init"][t])
        assert m["gap_after"][t] == pytest.approx(sharp["teacher_adapted"][t] - sharp["student_final"][t])
        assert m["gap_after_original_teacher"][t] == pytest.approx(sharp["teacher"][t] - sharp["student_final"][t])
    assert {"config.yaml", "results.json", "log.txt", "checkpoint", pesf.ADAPTER_WEIGHTS, pesf.ADAPTER_CONFIG,
            "checkpoints"} <= {p.name for p in out.iterdir()}
    assert len([line for line in (out / "log.txt").read_text().splitlines() if "sharpness gap (adapted teacher" in line]) == 2

    # The student loads without mmkit and scores as the run reported.
    student = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint").eval()
    assert student.config.num_hidden_layers == 2 and student.config.distill["method"] == "pesf"
    tok = AutoTokenizer.from_pretrained(out / "checkpoint")
    z_s = _eval_logits(student, tok, test)
    labels = torch.tensor([json.loads(line)["label"] for line in test.read_text().splitlines()])
    assert m["student"]["accuracy"] == pytest.approx(100.0 * float((z_s.argmax(-1) == labels).float().mean()))
    assert pesf.sharpness_means(z_s, 5.0) == pytest.approx(sharp["student_final"], abs=1e-5)

    # The teacher is untouched; with the reloaded adapter it reproduces z_t^a.
    assert sha256_file(f"{teacher}/model.safetensors") == teacher_hash
    frozen = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    z_t, h = _eval_logits(frozen, tok, test, pooled=True)
    adapter = pesf.load_adapter(out)
    assert json.loads((out / pesf.ADAPTER_CONFIG).read_text())["teacher"]["id"] == teacher
    with torch.no_grad():
        z_ta = z_t + adapter(h)
    assert pesf.sharpness_means(z_t, 5.0) == pytest.approx(sharp["teacher"], abs=1e-5)
    assert pesf.sharpness_means(z_ta, 5.0) == pytest.approx(sharp["teacher_adapted"], abs=1e-5)
    assert m["teacher_adapted"]["accuracy"] == pytest.approx(
        100.0 * float((z_ta.argmax(-1) == labels).float().mean()))


class Killed(Exception):
    """Simulates a kill right after a checkpoint is written."""


def test_a_killed_run_resumes_to_the_same_student_and_adapter(tmp_path, sets, teacher, tiny_bert, monkeypatch):
    _, test, small = sets
    args = ["--teacher", teacher, "--student", tiny_bert, "--task", str(small), "--eval-data", str(test),
            "--epochs", "2", "--set", "train.save_every=3"]
    straight = _results(invoke(*args, "--out", str(tmp_path / "a"), "--json"))
    save = pesf.PesfStep.on_save

    def kill_at_3(self, state, checkpoint):
        save(self, state, checkpoint)
        if state.step == 3:
            raise Killed

    monkeypatch.setattr(pesf.PesfStep, "on_save", kill_at_3)
    killed = invoke(*args, "--out", str(tmp_path / "b"))
    assert isinstance(killed.exception, Killed) and not (tmp_path / "b" / "results.json").exists()
    monkeypatch.setattr(pesf.PesfStep, "on_save", save)
    resumed = _results(invoke(*args, "--out", str(tmp_path / "b"), "--json"))
    assert resumed["metrics"]["steps"] == straight["metrics"]["steps"] == 8
    for name in ("checkpoint/model.safetensors", pesf.ADAPTER_WEIGHTS):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["metrics"]["loss_final"] == pytest.approx(straight["metrics"]["loss_final"])
    assert resumed["metrics"]["gap_before"] == straight["metrics"]["gap_before"]


def test_reproduce_released_trains_and_saves_the_teacher(tmp_path, sets, teacher, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, test, small = sets
    out = tmp_path / "run"
    m = _results(invoke("--teacher", teacher, "--student", tiny_bert, "--task", str(small), "--eval-data", str(test),
                        "--epochs", "1", "--reproduce-released", "--out", str(out), "--json"))["metrics"]
    assert m["mode"] == "reproduce-released" and m["cache"] == "disabled: the teacher is trained"
    trained = AutoModelForSequenceClassification.from_pretrained(out / "teacher").eval()
    original = AutoModelForSequenceClassification.from_pretrained(teacher)
    assert not torch.equal(trained.classifier.weight, original.classifier.weight)
    z_t, h = _eval_logits(trained, AutoTokenizer.from_pretrained(out / "teacher"), test, pooled=True)
    with torch.no_grad():
        z_ta = z_t + pesf.load_adapter(out)(h)
    assert pesf.sharpness_means(z_ta, 5.0) == pytest.approx(m["sharpness"]["teacher_adapted"], abs=1e-5)


def test_help_shows_an_example():
    result = invoke("--help")
    assert result.exit_code == 0 and "mmkit distill pesf --teacher" in result.output and "--reproduce-released" in result.output


@pytest.mark.parametrize("case", ["width", "reproduce-cache", "no-eval", "labels", "layers"])
def test_user_mistakes_exit_2_with_one_line(tmp_path, sets, teacher, tiny_bert, make_tiny_bert, case):
    _, test, small = sets
    args = {"teacher": teacher, "task": str(small), "eval": ["--eval-data", str(test)], "extra": []}
    if case == "width":
        args["teacher"], message = make_tiny_bert(num_layers=4, hidden=64, classifier=True), "mmkit distill bert-kd"
    elif case == "reproduce-cache":
        args["extra"], message = ["--reproduce-released", "--cache"], "drop --cache"
    elif case == "no-eval":
        args["eval"], message = [], "pass --eval-data"
    elif case == "labels":
        three = tmp_path / "three.jsonl"
        three.write_text("".join(json.dumps({"text": f"the {w}", "label": w}) + "\n" for w in ("dog", "cat", "car")))
        args["task"], args["eval"], message = str(three), ["--eval-data", str(three)], "has 2 labels but the task"
    else:
        args["extra"], message = ["--student-layers", "5"], "--student-layers 5 but the student has 2 layers"
    out = tmp_path / "run"
    result = invoke("--teacher", args["teacher"], "--student", tiny_bert, "--task", args["task"], *args["eval"],
                    *args["extra"], "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()  # nothing half-written


def test_a_teacher_without_a_head_is_fine_tuned_first(tmp_path, sets, make_tiny_bert, tiny_bert):
    _, test, small = sets
    encoder = make_tiny_bert(num_layers=4)  # a bare BertModel: teacher.finetune auto fine-tunes it
    out = tmp_path / "run"
    results = _results(invoke("--teacher", encoder, "--student", tiny_bert, "--task", str(small), "--eval-data",
                              str(test), "--epochs", "1", "--set", "teacher.train.epochs=1", "--out", str(out),
                              "--json"))
    assert results["models"]["teacher_finetuned"]["id"] == str(out / "teacher_finetune" / "model")
    assert results["metrics"]["teacher_finetune"]["steps"] == 4 and results["metrics"]["steps"] == 4
    assert json.loads((out / pesf.ADAPTER_CONFIG).read_text())["teacher"]["finetuned"] == str(
        out / "teacher_finetune" / "model")
