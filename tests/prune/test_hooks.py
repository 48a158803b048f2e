"""Tests for mmkit/prune/hooks.py: DynamicsCallback inside a real transformers Trainer."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from mmkit.prune.dynamics import DynamicsRecorder, open_dynamics
from mmkit.prune.hooks import DynamicsCallback

N, C, D = 24, 3, 6


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(D, C)

    def forward(self, pixel_values, labels=None):
        logits = self.linear(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Items(torch.utils.data.Dataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"index": i, "pixel_values": self.x[i], "labels": self.y[i]}


class Snapshot(TrainerCallback):
    """Computes p_true by hand at each epoch end (runs after DynamicsCallback)."""

    def __init__(self, x, y) -> None:
        self.x, self.y, self.p_true, self.modes = x, y, [], []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)
        with torch.no_grad():
            probs = model.linear(self.x).softmax(1)
        self.p_true.append(probs[torch.arange(N), self.y].numpy())


def train(tmp_path, x, y, epochs):
    """A fresh TinyClassifier trained by a Trainer with a DynamicsCallback on tmp_path/dyn."""
    torch.manual_seed(0)
    model = TinyClassifier()
    recorder = DynamicsRecorder(tmp_path / "dyn", N, C, labels=y.numpy(), dtype="float32")
    snapshot = Snapshot(x, y)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), num_train_epochs=epochs,
                             per_device_train_batch_size=8, learning_rate=0.5, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Items(x, y),
                      callbacks=[DynamicsCallback(recorder, Items(x, y), batch_size=5), snapshot])
    trainer.train()
    return model, snapshot


def test_callback_records_each_epoch_of_a_trainer(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    model, snapshot = train(tmp_path, x, y, epochs=2)

    src = open_dynamics(tmp_path / "dyn")
    assert src.epochs == [0, 1]
    p = src.read("p_true", 0, N)
    np.testing.assert_allclose(p, np.stack(snapshot.p_true), atol=1e-6)
    assert np.abs(p[1] - p[0]).max() > 1e-3  # the model trained between the two passes
    assert snapshot.modes == [True, True]  # record_pass restored train mode
    np.testing.assert_array_equal(src.read("correct", 0, N)[1],
                                  (model.linear(x).argmax(1) == y).numpy().astype(np.float32))
    assert not list((tmp_path / "trainer").glob("checkpoint-*"))

    # a rerun on the same directory skips the recorded epochs and records only the new one
    _, rerun = train(tmp_path, x, y, epochs=3)
    src = open_dynamics(tmp_path / "dyn")
    assert src.epochs == [0, 1, 2]
    np.testing.assert_array_equal(src.read("p_true", 0, N)[:2], p)
    np.testing.assert_allclose(src.read("p_true", 0, N)[2], rerun.p_true[2], atol=1e-6)
