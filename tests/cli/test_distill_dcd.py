"""End-to-end tests of `mmkit distill dcd` (mmkit/cli/distill.py, mmkit/distill/dcd.py), offline."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkit.cli import build_app
from tests.distill.test_dcd import write_shapes

runner = CliRunner()
SMALL = ["--negatives", "5", "--topk", "3", "--epochs", "1", "--batch-size", "4", "--set", "train.grad_accum=1"]


def invoke(*args: str):
    return runner.invoke(build_app(), ["distill", "dcd", *args])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    train = write_shapes(folder, 8, name="train.jsonl")
    test = write_shapes(folder, 4, name="test.jsonl", start=8)
    return folder, train, test


def test_dcd_runs_end_to_end_and_evaluates(tmp_path, sets, tiny_vilt, tiny_clip):
    folder, train, test = sets
    out = tmp_path / "run"
    result = invoke("--teacher", tiny_vilt, "--data", str(train), "--eval-data", str(test), *SMALL,
                    "--shortlist", tiny_clip, "--rerank-k", "3", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout[result.stdout.index("{"):])
    assert results["command"] == "distill dcd" and results["method"] == "dcd" and results["seed"] == 12345
    metrics = results["metrics"]
    assert metrics["train"]["steps"] == 4 and metrics["train"]["student_layers"] == [0, 3, 5]
    assert metrics["modes"] == ["full", "rerank"]
    for name in ("teacher", "student"):
        for mode in ("full", "rerank"):
            assert 0 <= metrics[name][mode]["rsum"] <= 600
    assert metrics["rerank"]["k"] == 3 and metrics["rerank"]["shortlist"]["id"] == tiny_clip
    assert "teacher_full/student_rerank" in metrics["timing"]["ratios"]
    assert results["models"]["shortlist"]["id"] == tiny_clip
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "results.json", "log.txt", "student", "checkpoints", "scores_teacher_full.safetensors",
            "scores_student_full.safetensors", "scores_teacher_rerank.safetensors",
            "scores_student_rerank.safetensors"} <= names
    full = load_file(out / "scores_student_full.safetensors")
    assert full["sims"].shape == (4, 8) and full["text_to_image"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    rerank = load_file(out / "scores_student_rerank.safetensors")
    assert rerank["shortlist"].shape == (4, 8) and len(rerank["itm_score"]) == len(rerank["itm_image"])

    # Same --out: training resumes from the last checkpoint (nothing left to do), then eval-only on the student.
    again = invoke("--teacher", tiny_vilt, "--data", str(train), *SMALL, "--out", str(out))
    assert again.exit_code == 0, again.output
    evaluated = invoke("--eval-only", "--student", str(out / "student"), "--eval-data", str(test),
                       "--mode", "full", "--out", str(tmp_path / "eval"), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    only = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])["metrics"]
    assert only["modes"] == ["full"] and "teacher" not in only
    assert only["student"]["full"] == metrics["student"]["full"]  # the saved student scores as in memory


@pytest.mark.parametrize("case, args, message", [
    ("topk", ["--topk", "9", "--negatives", "5"], "topk: K = 9 must be in 2..6"),
    ("negatives", ["--negatives", "15"], "--negatives: 15 negatives per example"),
    ("rerank-k", ["--negatives", "5", "--topk", "3", "--rerank-k", "9"], "--rerank-k: K = 9 is larger than the gallery"),
    ("mode", ["--negatives", "5", "--topk", "3", "--mode", "fast"], "unknown mode 'fast'"),
    ("eval-only", ["--eval-only"], "--eval-only needs --student"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, sets, tiny_vilt, case, args, message):
    folder, train, test = sets
    out = tmp_path / "run"
    result = invoke("--teacher", tiny_vilt, "--data", str(train), "--eval-data", str(test), "--epochs", "1",
                    *args, "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()  # nothing half-written


def test_a_caption_pointing_at_a_missing_image_exits_2(tmp_path, sets, tiny_vilt):
    folder, train, _ = sets
    bad = folder / "bad.jsonl"
    bad.write_text(train.read_text() + json.dumps({"image": "images/missing.png", "captions": ["a red cat"]}) + "\n")
    result = invoke("--teacher", tiny_vilt, "--data", str(bad), *SMALL, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"error: {bad}:9: image: image file not found") and "\n" not in line
    assert not (tmp_path / "run").exists()
