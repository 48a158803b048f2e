"""Slow real-model smoke test of mmkit/distill/bert_kd.py: the quickstart's bert-kd job
(examples/quickstart.sh: the same flags, on 200 instead of 400 training rows to stay near a
minute on one thread) with all-MiniLM-L6-v2 and a ShareGPT matching set, through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmkit.cli import build_app
from mmkit.distill import sharegpt_match


@pytest.mark.slow
def test_quickstart_bert_kd_job_fine_tunes_minilm_and_saves_a_loadable_student(minilm_path, sharegpt_available,
                                                                               tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sharegpt_match.build(tmp_path / "match", train=200, test=100)
    out = tmp_path / "bert-kd"
    result = CliRunner().invoke(build_app(), [
        "distill", "bert-kd", "--teacher", minilm_path, "--student-init", "teacher_layers", "--student-layers", "2",
        "--task", str(tmp_path / "match" / "train.jsonl"), "--eval-data", str(tmp_path / "match" / "test.jsonl"),
        "--epochs", "1", "--batch-size", "16", "--lr", "1e-4", "--max-len", "48", "--set", "teacher.finetune=auto",
        "--set", "teacher.train.epochs=1", "--set", "teacher.train.batch_size=16", "--set", "teacher.train.lr=1e-4",
        "--set", "diagnostic.metrics=[cca,cka]", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{"):])["metrics"]
    assert metrics["teacher_finetune"]["steps"] == 13 and metrics["steps"] == 13  # 200 rows / 16, one epoch
    assert metrics["layer_map"] == [3, 6] and metrics["eval_examples"] == 100
    assert 0 <= metrics["student"]["accuracy"] <= 100 and set(metrics["cca_mapped_mean_after"]) == {"cca", "cka"}
    assert (out / "teacher_finetune" / "model" / "config.json").is_file()

    student = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(out / "checkpoint")
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == 2
    assert student.config.hidden_size == 384
    with torch.inference_mode():
        logits = student(**tokenizer(["how do I sort a list?"], ["use sorted()"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
