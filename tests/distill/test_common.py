"""Tests of mmkit/distill/common.py: loss statistics kept across checkpoints, the student saver, counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmkit.distill.common import Indices, StepStats, param_count, param_counts, saver


def test_step_stats_sum_per_epoch_and_keep_the_last_epochs_means():
    stats = StepStats()
    assert stats.means() == {}
    stats.add({"loss": torch.tensor(1.0), "ce": torch.tensor(0.5)})
    stats.add({"loss": torch.tensor(3.0), "ce": torch.tensor(1.5)})
    assert stats.means() == {"loss": 2.0, "ce": 1.0} and stats.batches == 2
    assert stats.end_epoch() == {"loss": 2.0, "ce": 1.0}
    assert (stats.sums, stats.batches, stats.means()) == ({}, 0, {"loss": 2.0, "ce": 1.0})  # final until new sums
    stats.add({"loss": torch.tensor(6.0), "ce": torch.tensor(0.0)})
    assert stats.means() == {"loss": 6.0, "ce": 0.0}


def test_stats_are_saved_on_the_main_process_and_resumed_from_the_latest_complete_checkpoint(tmp_path):
    assert StepStats.resume(tmp_path, "s.json") is None
    stats = StepStats(sums={"loss": 4.0}, batches=2, final={"loss": 1.5})
    for step, complete in ((3, True), (7, True), (9, False)):  # step 9 has no trainer_state.json: incomplete
        ckpt = tmp_path / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
        StepStats(batches=step).save(SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True)), ckpt / "s.json")
    stats.save(SimpleNamespace(accelerator=SimpleNamespace(is_main_process=False)), tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()
    assert json.loads((tmp_path / "checkpoints" / "step-7" / "s.json").read_text())["batches"] == 7
    assert StepStats.resume(tmp_path, "s.json") == StepStats(batches=7)
    assert StepStats.resume(tmp_path, "missing.json") is None


def test_indices_and_parameter_counts():
    assert len(Indices(5)) == 5 and [Indices(5)[i] for i in range(5)] == [0, 1, 2, 3, 4]
    teacher, student = nn.Linear(10, 4), nn.Linear(3, 2, bias=False)
    assert param_count(teacher) == 44 and param_count(student) == 6
    assert param_counts(teacher, student) == {"teacher": 44, "student": 6, "ratio": pytest.approx(6 / 44)}


def test_saver_writes_the_part_alone_with_its_record_and_tokenizer(tmp_path, tiny_bert_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_classifier)
    tok = AutoTokenizer.from_pretrained(tiny_bert_classifier)
    wrapper = SimpleNamespace(student=model, adapter=nn.Linear(2, 2))
    saver(tok, {"method": "x", "layers": [1, 2]}, "student")(wrapper, tmp_path / "a")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    assert reloaded.config.distill == {"method": "x", "layers": [1, 2]}
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), model.parameters()))
    assert AutoTokenizer.from_pretrained(tmp_path / "a").get_vocab() == tok.get_vocab()
    saver(None, {}, "student")(wrapper, tmp_path / "b")  # no preprocessor: the model alone
    assert (tmp_path / "b" / "model.safetensors").is_file() and not list((tmp_path / "b").glob("tokenizer*"))
