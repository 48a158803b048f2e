"""The example scripts the quickstart runs (examples/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_retrieval_embeddings_file_has_the_evaluate_format(tmp_path):
    out = tmp_path / "emb.safetensors"
    subprocess.run([sys.executable, str(EXAMPLES / "retrieval_embeddings.py"), str(out), "--images", "8",
                    "--captions-per-image", "3", "--dim", "16"], check=True, capture_output=True)
    t = load_file(str(out))
    assert t["image_embeds"].shape == (8, 16) and t["text_embeds"].shape == (24, 16)
    assert t["text_to_image"].dtype == np.int64 and t["text_to_image"].tolist() == [i // 3 for i in range(24)]
    np.testing.assert_allclose(np.linalg.norm(t["image_embeds"], axis=1), 1.0, rtol=1e-6)
    # the same seed gives the same file
    again = tmp_path / "again.safetensors"
    subprocess.run([sys.executable, str(EXAMPLES / "retrieval_embeddings.py"), str(again), "--images", "8",
                    "--captions-per-image", "3", "--dim", "16"], check=True, capture_output=True)
    assert all(np.array_equal(t[k], load_file(str(again))[k]) for k in t)


def test_distill_experiment_students_start_from_the_teachers_mapped_layers(make_tiny_bert, tmp_path):
    import importlib.util

    import torch
    from transformers import AutoModelForSequenceClassification

    from mmkit.distill.bert_kd import uniform_layer_map

    spec = importlib.util.spec_from_file_location("distill_experiment", EXAMPLES / "distill_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    teacher_dir = make_tiny_bert(num_layers=6, classifier=True)
    layers = uniform_layer_map(2, 6)
    assert layers == [3, 6]  # the layers the script keeps are bert-kd's own teacher_layers map
    out = Path(module.cut_student(teacher_dir, layers, tmp_path / "s2-init"))
    student = AutoModelForSequenceClassification.from_pretrained(out)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for kept, m in zip(student.bert.encoder.layer, layers):
        for (name, got), want in zip(kept.state_dict().items(), teacher.bert.encoder.layer[m - 1].state_dict().values()):
            assert torch.equal(got, want), name
    for part in ("embeddings", "pooler"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(student.bert, part).state_dict().values(),
                                                      getattr(teacher.bert, part).state_dict().values()))
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
