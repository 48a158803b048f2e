"""Tests of mmkit/distill/textcls.py: task loading, labels, tokenisation, metrics, head checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmkit.distill import textcls
from mmkit.errors import ConfigError, DataError, ModelError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_glue_names_map_to_hub_configs_fields_and_metrics():
    assert textcls.GLUE["sst2"].source == "nyu-mll/glue:sst2"
    assert (textcls.GLUE["mrpc"].text, textcls.GLUE["mrpc"].text_pair) == ("sentence1", "sentence2")
    assert textcls.GLUE["stsb"].label_names is None and textcls.GLUE["stsb"].metrics == ("pearson", "spearman")
    assert textcls.GLUE["cola"].metrics[0] == "matthews" and "f1" in textcls.GLUE["qqp"].metrics
    assert textcls.GLUE["mnli"].eval_split == "validation_matched"


def test_string_labels_map_to_sorted_ids_and_eval_splits_reuse_them(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "text_pair": "b", "label": "pos"},
                                                   {"text": "c", "text_pair": "d", "label": "neg"},
                                                   {"text": "e", "text_pair": "f", "label": "mid"}])
    data = textcls.load_textcls(train)
    assert data.label_names == ["mid", "neg", "pos"] and data.labels.tolist() == [2, 1, 0]
    assert data.pairs == ["b", "d", "f"] and data.num_labels == 3 and not data.regression
    assert data.id2label() == {0: "mid", 1: "neg", 2: "pos"} and data.data["n"] == 3 and "sha256" in data.data
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": "neg"}, {"text": "y", "label": "odd"}])
    with pytest.raises(DataError, match=r"test.jsonl:2: label: label 'odd' is not one of the training labels"):
        textcls.load_textcls(test, label_names=data.label_names)


def test_csv_with_custom_fields_int_float_and_missing_label(tmp_path):
    ints = tmp_path / "ints.csv"
    ints.write_text("sentence,y\nhello,1\nworld,0\n", encoding="utf-8")
    data = textcls.load_textcls(str(ints), fields=textcls.TaskFields(text="sentence", label="y"))
    assert data.labels.tolist() == [1, 0] and data.label_names == ["0", "1"] and data.pairs is None
    floats = tmp_path / "floats.csv"
    floats.write_text("text,label\nhello,0.5\nworld,3\n", encoding="utf-8")
    reg = textcls.load_textcls(str(floats))
    assert reg.regression and reg.num_labels == 1 and reg.labels.dtype == np.float32
    assert reg.labels.tolist() == [0.5, 3.0] and reg.metric_names() == ("pearson", "spearman")
    with pytest.raises(DataError, match=r"ints.csv:row 1: label: missing field"):
        textcls.load_textcls(str(ints), fields=textcls.TaskFields(text="sentence"))


def test_negative_class_ids_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": -1}])
    with pytest.raises(DataError, match=r"t.jsonl:2: label: expected a class id >= 0"):
        textcls.load_textcls(path)


def test_encode_pads_dynamically_and_keeps_the_tokenizers_token_types(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"text": "a man", "text_pair": "a dog", "label": 1},
        {"text": "the cat sits on the bed near the window", "text_pair": "dog", "label": 0},
        {"text": "red car", "text_pair": "blue bus on the road", "label": 1}])
    data = textcls.load_textcls(path)
    enc = textcls.encode(tok, data, max_len=8)
    assert enc.lengths.tolist() == [7, 8, 8]  # [CLS] a man [SEP] a dog [SEP]; longer pairs truncated to 8
    batch = textcls.Collate(enc, data.labels)([0, 2])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].sum(1).tolist() == [7, 8]
    reference = tok(["a man"], ["a dog"])
    assert batch["input_ids"][0, :7].tolist() == reference["input_ids"][0]
    assert batch["token_type_ids"][0, :7].tolist() == reference["token_type_ids"][0] == [0, 0, 0, 0, 1, 1, 1]
    assert batch["labels"].tolist() == [1, 1]
    short = textcls.Collate(enc, data.labels)([0])
    assert short["input_ids"].shape == (1, 7)  # padded to the batch's longest, not to max_len


def test_metrics_against_hand_values():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # predictions 0, 1, 1, 0
    labels = np.array([0, 1, 0, 1])
    assert textcls.accuracy(logits, labels) == 50.0
    assert textcls.f1(logits, labels) == pytest.approx(100 * 2 * 1 / (2 + 2))  # tp 1, 2 predicted, 2 true
    assert textcls.matthews(logits, labels) == pytest.approx(0.0)
    x = np.array([[1.0], [2.0], [3.0], [5.0]])
    y = np.array([2.0, 4.0, 6.0, 7.0])
    r = np.corrcoef(x[:, 0], y)[0, 1]
    assert textcls.pearson(x, y) == pytest.approx(r) and textcls.spearman(x, y) == pytest.approx(1.0)
    assert textcls.pearson(np.ones((4, 1)), y) is None


def test_head_checks_and_finetune_modes():
    class Config:
        num_labels = 3
        architectures = ["BertForSequenceClassification"]

    data = textcls.TextClsSet(["a"], None, np.array([0]), ["neg", "pos"], "d.jsonl", "train", {}, {})
    with pytest.raises(ModelError, match="teacher's classification head has 3 labels but the task d.jsonl has 2"):
        textcls.check_head(Config(), data)
    assert not textcls.needs_finetune("auto", Config()) and textcls.needs_finetune("true", Config())

    class Bare:
        architectures = ["BertModel"]

    assert textcls.needs_finetune("auto", Bare()) and not textcls.needs_finetune("false", Bare())
    with pytest.raises(ConfigError):
        textcls.needs_finetune("sometimes", Bare())
    assert math.isclose(textcls.finetune_defaults().lr, 2e-5) and textcls.finetune_defaults().epochs == 4


def test_finetune_classifier_on_a_regression_task_gives_a_one_output_head(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    words = "man woman dog cat car tree sky water".split()
    rows = [{"text": " ".join(words[(i * 3 + j) % 8] for j in range(4 + i % 3)), "label": 0.5 * (i % 5)}
            for i in range(24)]
    data = textcls.load_textcls(write_jsonl(tmp_path / "reg.jsonl", rows))
    assert data.regression
    train_cfg = textcls.finetune_defaults()
    train_cfg.epochs = 1
    result = textcls.finetune_classifier(tiny_bert, None, data, tmp_path / "ft", train_cfg, 16, data, device="cpu")
    assert result.metrics["steps"] == 3 and set(result.metrics["eval"]) == {"pearson", "spearman"}
    model = AutoModelForSequenceClassification.from_pretrained(result.path)
    assert model.classifier.out_features == model.config.num_labels == 1
    assert model.config.problem_type == "regression" and "id2label" not in textcls.label_kwargs(data)
