"""Proxy models and the recording training run (mmkit/prune/proxy.py; prune.md sections 4.1, 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mmkit.prune.data import ImageSet, View
from mmkit.prune.dynamics import completed_epochs
from mmkit.prune.proxy import MODELS, ProxyConfig, build_model, logits_of, record_dynamics


def toy_set(n: int = 48, classes: int = 3, side: int = 8) -> ImageSet:
    """Separable toy images: class c lights up row block c."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    x = rng.uniform(0, 0.2, size=(n, 1, side, side)).astype(np.float32)
    for i, c in enumerate(labels):
        x[i, 0, c * 2:(c * 2) + 2] += 0.8
    data = ImageSet("builtin", "toy", labels.astype(np.int64), [str(c) for c in range(classes)],
                    [f"toy:{i}" for i in range(n)], View(size=None, mean=(0.0,), std=(1.0,), augment="none"),
                    arrays=x)
    data.test = data
    return data


@pytest.mark.parametrize("name, expected", [("resnet-50", 25.6e6), ("convnext-tiny", 28.6e6), ("swin-tiny", 28.3e6)])
def test_builtin_architectures_have_the_published_sizes(name, expected):
    data = ImageSet("builtin", "x", np.zeros(1, dtype=np.int64), [str(c) for c in range(1000)], ["0"],
                    View(size=224), arrays=np.zeros((1, 3, 224, 224), dtype=np.float32))
    with torch.device("meta"):
        model = build_model(name, data)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.02, count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_proxy_model_gives_class_logits(name):
    side = 32 if name in ("mlp", "small-cnn") else 224
    data = toy_set(n=2, side=side)
    data.arrays = np.repeat(data.arrays, 3, axis=1) if side == 224 else data.arrays
    torch.manual_seed(0)
    model = build_model(name, data)
    model.eval()
    with torch.no_grad():
        logits = logits_of(model, torch.from_numpy(data.arrays))
    assert logits.shape == (2, 3)


def test_small_cnn_layout():
    model = build_model("small-cnn", toy_set(side=28))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 32 * 7 * 7), (64,), (3, 64), (3,)]


@pytest.mark.parametrize("mode", ["eval-pass", "inline", "train-forward"])
def test_each_record_mode_records_every_example_once_per_epoch(tmp_path, mode):
    data = toy_set()
    cfg = ProxyConfig(record_mode=mode, dtype="float32", batch_size=10, lr=0.1)
    info = record_dynamics(data, cfg, "mlp", 3, tmp_path, seed=0)
    assert info["steps"] == 3 * 5
    assert completed_epochs(tmp_path / "dynamics") == [0, 1, 2]
    for k in range(3):
        epoch = load_file(str(tmp_path / "dynamics" / f"epoch_{k:05d}.safetensors"))
        assert epoch["seen"].all() and np.isfinite(epoch["p_true"]).all()
    if mode == "eval-pass":
        # the last epoch's p_true is the final proxy's softmax at the true class on the clean view
        from safetensors.torch import load_file as load_torch

        model = build_model("mlp", data)
        model.load_state_dict(load_torch(str(tmp_path / "proxy" / "model" / "model.safetensors")))
        model.eval()
        with torch.no_grad():
            p = torch.softmax(logits_of(model, torch.from_numpy(data.arrays)), -1)
        expected = p[torch.arange(len(data)), torch.from_numpy(data.labels)].numpy()
        np.testing.assert_allclose(load_file(str(tmp_path / "dynamics" / "epoch_00002.safetensors"))["p_true"],
                                   expected, rtol=1e-5, atol=1e-6)


def test_a_killed_recording_resumes_to_the_same_dynamics(tmp_path, monkeypatch):
    from mmkit.prune import proxy

    data = toy_set()
    cfg = ProxyConfig(dtype="float32", batch_size=10, lr=0.1)
    record_dynamics(data, cfg, "mlp", 4, tmp_path / "straight", seed=3)

    calls = {"n": 0}
    original = proxy.RecordCallback.on_epoch_end

    def killed(self, state):
        if state.epoch == 2 and calls["n"] == 0:  # after epoch 2's checkpoint, before it is recorded
            calls["n"] += 1
            raise KeyboardInterrupt
        original(self, state)

    monkeypatch.setattr(proxy.RecordCallback, "on_epoch_end", killed)
    with pytest.raises(KeyboardInterrupt):
        record_dynamics(data, cfg, "mlp", 4, tmp_path / "killed", seed=3)
    assert completed_epochs(tmp_path / "killed" / "dynamics") == [0, 1]
    info = record_dynamics(data, cfg, "mlp", 4, tmp_path / "killed", seed=3)
    assert info["resumed"]
    for k in range(4):
        a = load_file(str(tmp_path / "straight" / "dynamics" / f"epoch_{k:05d}.safetensors"))
        b = load_file(str(tmp_path / "killed" / "dynamics" / f"epoch_{k:05d}.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"epoch {k} {name}")
