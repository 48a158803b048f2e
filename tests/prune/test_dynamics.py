"""Tests for mmkit/prune/dynamics.py: recorder, native format and importers (prune.md 4, 10.8, 10.9)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from mmkit.errors import MmkitError
from mmkit.prune.dynamics import (
    CHANNELS,
    DynamicsRecorder,
    completed_epochs,
    dataset_fingerprint,
    epoch_file,
    open_dynamics,
    read_labels,
)

N, C, D = 37, 4, 5
ALL = ("p_true", "correct", "margin", "el2n", "entropy")


# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    model = torch.nn.Linear(D, C)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, D, generator=g) * 2)
        model.bias.copy_(torch.randn(C, generator=g))
    return x, y, model


def shuffled_loader(x, y, batch_size=8, seed=1, targets=None):
    ds = torch.utils.data.TensorDataset(torch.arange(len(x)), x, y if targets is None else targets)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def hand_channels(logits: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 numpy versions of every channel (prune.md 2, 3.3, 3.5, 3.6)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    onehot = np.eye(z.shape[1])[y]
    return {
        "p_true": p[rows, y],
        "correct": (z.argmax(1) == y).astype(np.float64),
        "margin": z[rows, y] - others.max(1),
        "el2n": np.linalg.norm(p - onehot, axis=1),
        "entropy": -(p * np.log(np.maximum(p, 1e-10))).sum(1),
    }


def record_epochs(out, x, y, model, epochs, **kwargs):
    """Record ``epochs`` eval-passes with model weights set from each epoch number."""
    with DynamicsRecorder(out, N, C, labels=y.numpy(), **kwargs) as rec:
        for epoch in epochs:
            set_weights(model, epoch)
            rec.begin_epoch(epoch)
            rec.record_pass(model, shuffled_loader(x, y, seed=epoch))
            rec.end_epoch()


def set_weights(model, epoch):
    g = torch.Generator().manual_seed(100 + epoch)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def read_all(src):
    return {ch: src.read(ch, 0, src.num_samples) for ch in src.channels}


# --------------------------------------------------------------------------- channels


def channel(name, logits, y):
    z = torch.tensor(logits, dtype=torch.float32)
    return CHANNELS[name].fn(z, z.softmax(1), torch.tensor(y))


def test_channel_values_by_hand():
    # prune.md 10.4 and 10.5
    assert channel("margin", [[2, 1, 0.5], [0, 3, 1]], [0, 0]).tolist() == [1.0, -3.0]
    assert channel("margin", [[1, 1, 1], [0, 0, 2]], [2, 2]).tolist() == [0.0, 2.0]
    assert channel("el2n", [[0, 0, 0, 0]], [1]).item() == pytest.approx(math.sqrt(0.75), abs=1e-6)
    assert channel("entropy", [[0, 0, 0, 0]], [1]).item() == pytest.approx(math.log(4), abs=1e-6)
    assert channel("entropy", [[30, 0, 0, 0]], [0]).item() < 1e-3
    assert channel("p_true", [[0, 0, 0, 0]], [3]).item() == pytest.approx(0.25)
    assert channel("correct", [[0, 5, 1], [0, 5, 1]], [1, 2]).tolist() == [1, 0]


def test_recorder_matches_hand_formulas_at_shuffled_indices(tmp_path, toy):
    x, y, model = toy
    model.train()
    with DynamicsRecorder(tmp_path / "dyn", N, C, labels=y.numpy(), dtype="float32",
                          meta={"seed": 3, "epochs_planned": 1}, classes=list("abcd")) as rec:
        rec.begin_epoch(0)
        rec.record_pass(model, shuffled_loader(x, y))
        rec.end_epoch()
    assert model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        expected = hand_channels(model(x).numpy(), y.numpy())
    src = open_dynamics(tmp_path / "dyn")
    assert src.channels == ALL and src.epochs == [0] and src.num_samples == N
    for name in ALL:
        got = src.read(name, 0, N)
        assert got.shape == (1, N) and got.dtype == np.float32
        np.testing.assert_allclose(got[0], expected[name], atol=1e-5, err_msg=name)
    assert (expected["margin"] > 0).any() and (expected["margin"] < 0).any()
    np.testing.assert_array_equal(src.labels, y.numpy())
    meta = json.loads((tmp_path / "dyn" / "meta.json").read_text())
    assert meta["format"] == "mmkit-dynamics" and meta["version"] == 1
    assert meta["channels"] == {"p_true": "float32", "correct": "uint8", "margin": "float32",
                                "el2n": "float32", "entropy": "float32"}
    assert meta["index_space"] == "dense" and meta["seed"] == 3 and meta["epochs_planned"] == 1
    assert meta["nonfinite"]["total"] == 0 and "mmkit_version" in meta
    assert json.loads((tmp_path / "dyn" / "classes.json").read_text()) == list("abcd")
    with safe_open(str(epoch_file(tmp_path / "dyn", 0)), "numpy") as fh:
        assert fh.metadata()["epoch"] == "0" and fh.metadata()["complete"] == "1"
        assert fh.get_tensor("correct").dtype == np.uint8 and fh.get_tensor("seen").tolist() == [1] * N


def test_half_logits_and_float16_round_trip(tmp_path, toy):
    x, y, model = toy
    with torch.no_grad():
        logits = model(x)
    with DynamicsRecorder(tmp_path, N, C, channels=("p_true",), dtype="float16") as rec:
        rec.begin_epoch(0)
        rec.update(torch.arange(N), logits.half(), y)
        rec.end_epoch()
    got = open_dynamics(tmp_path).read("p_true", 0, N)[0]
    expected = hand_channels(logits.half().float().numpy(), y.numpy())["p_true"]
    assert np.abs(got - expected).max() <= 2 ** -11


def test_unseen_duplicates_and_nonfinite_rows(tmp_path):
    logits = torch.zeros(6, C)
    logits[1, 2] = float("nan")
    logits[4, 0] = float("inf")
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    with DynamicsRecorder(tmp_path, 10, C, channels=("p_true", "correct")) as rec:
        rec.begin_epoch(0)
        rec.update(torch.tensor([0, 1, 2, 3, 4, 5]), logits, targets)
        # index 3 twice in one batch and 5 again: the last write wins
        dup = torch.tensor([[9.0, 0, 0, 0], [0, 0, 0, 9.0], [0, 9.0, 0, 0]])
        rec.update(torch.tensor([3, 3, 5]), dup, torch.tensor([3, 3, 1]))
        rec.end_epoch()
    src = open_dynamics(tmp_path)
    p, acc = src.read("p_true", 0, 10)[0], src.read("correct", 0, 10)[0]
    assert np.isnan(p[[1, 4, 6, 7, 8, 9]]).all() and np.isnan(acc[[1, 4, 6, 7, 8, 9]]).all()
    np.testing.assert_allclose(p[[0, 2]], 0.25)
    assert p[3] > 0.99 and p[5] > 0.99 and acc[3] == 1 and acc[5] == 1 and acc[0] == 1
    assert src.meta["nonfinite"] == {"total": 2, "per_epoch": {"0": 2}}
    assert json.loads((tmp_path / "meta.json").read_text())["nonfinite"]["total"] == 2


# --------------------------------------------------------------------------- errors


def test_misaligned_labels_raise_at_end_epoch(tmp_path, toy):
    x, y, model = toy
    shifted = torch.roll(y, 1)  # the loader's targets belong to other indices
    assert (shifted != y).any()
    rec = DynamicsRecorder(tmp_path, N, C, labels=y.numpy())
    rec.begin_epoch(0)
    rec.record_pass(model, shuffled_loader(x, y, targets=shifted))  # no error per step
    with pytest.raises(MmkitError, match="not aligned") as info:
        rec.end_epoch()
    assert info.value.field == "labels"
    rec.close()
    assert completed_epochs(tmp_path) == [] and not epoch_file(tmp_path, 0).exists()


def test_invalid_indices_and_targets_raise_at_end_epoch(tmp_path):
    rec = DynamicsRecorder(tmp_path, 5, C)
    rec.begin_epoch(0)
    rec.update(torch.tensor([0, 7]), torch.zeros(2, C), torch.tensor([0, 1]))
    with pytest.raises(MmkitError, match=r"indices outside \[0, 5\)"):
        rec.end_epoch()
    rec.begin_epoch(0)
    rec.update(torch.tensor([0, 1]), torch.zeros(2, C), torch.tensor([0, C]))
    with pytest.raises(MmkitError, match="targets outside"):
        rec.end_epoch()
    with pytest.raises(MmkitError, match=r"logits \[batch, 4\]"):
        rec.begin_epoch(0)
        rec.update(torch.tensor([0]), torch.zeros(1, C + 1), torch.tensor([0]))
    rec.close()


def test_usage_errors(tmp_path):
    with pytest.raises(MmkitError, match="mixup"):
        DynamicsRecorder(tmp_path, N, C, record_mode="train-forward", mixup=True)
    DynamicsRecorder(tmp_path / "ok", N, C, record_mode="eval-pass", mixup=True).close()
    with pytest.raises(MmkitError, match="did you mean 'margin'"):
        DynamicsRecorder(tmp_path, N, C, channels=("p_true", "margn"))
    with pytest.raises(MmkitError) as info:
        DynamicsRecorder(tmp_path, N, C, dtype="bfloat16")
    assert info.value.field == "--dtype"
    rec = DynamicsRecorder(tmp_path / "r", N, C)
    with pytest.raises(MmkitError, match="outside begin_epoch"):
        rec.update(torch.tensor([0]), torch.zeros(1, C), torch.tensor([0]))
    rec.begin_epoch(0)
    with pytest.raises(MmkitError, match="needs targets"):
        rec.update(torch.tensor([0]), torch.zeros(1, C))
    rec.close()


def test_partial_epoch_discarded_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with DynamicsRecorder(tmp_path, 3, C) as rec:
            for epoch in range(2):
                rec.begin_epoch(epoch)
                rec.update(torch.arange(3), torch.zeros(3, C), torch.zeros(3, dtype=torch.long))
                if epoch == 1:
                    raise RuntimeError("killed mid-epoch")
                rec.end_epoch()
    assert completed_epochs(tmp_path) == [0] and not epoch_file(tmp_path, 1).exists()
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- sharding and resume


def test_two_ranks_merge_to_the_dense_result(tmp_path, toy):
    x, y, model = toy
    with torch.no_grad():
        logits = [model(x), model(x * 0.5)]
    dense = tmp_path / "dense"
    with DynamicsRecorder(dense, N, C, labels=y.numpy()) as rec:
        for k in range(2):
            rec.begin_epoch(k)
            rec.update(torch.arange(N), logits[k], y)
            rec.end_epoch()
    sharded = tmp_path / "sharded"
    # disjoint halves, plus index 0 repeated on rank 1 (sampler padding)
    parts = [torch.arange(0, N, 2), torch.cat([torch.arange(1, N, 2), torch.tensor([0])])]
    for rank, part in enumerate(parts):
        with DynamicsRecorder(sharded, N, C, labels=y.numpy(), rank=rank, world_size=2) as rec:
            for k in range(2):
                rec.begin_epoch(k)
                for chunk in part.split(5):
                    rec.update(chunk, logits[k][chunk], y[chunk])
                rec.end_epoch()
    assert epoch_file(sharded, 1, rank=1).exists() and not epoch_file(sharded, 1).exists()
    merged = open_dynamics(sharded)
    assert merged.meta["index_space"] == "sharded" and merged.epochs == [0, 1]
    expected = read_all(open_dynamics(dense))
    for name, value in read_all(merged).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
        chunks = np.concatenate([merged.read(name, s, s + 6) for s in range(0, N, 6)], axis=1)
        np.testing.assert_array_equal(chunks, expected[name])
    # an epoch is complete only when every rank's shard is
    epoch_file(sharded, 1, rank=1).unlink()
    assert completed_epochs(sharded) == [0]


def test_resume_between_epochs_gives_the_same_files(tmp_path, toy):
    x, y, model = toy
    record_epochs(tmp_path / "full", x, y, model, range(3))
    resumed = tmp_path / "resumed"
    record_epochs(resumed, x, y, model, range(2))  # "killed" after epoch 1 of 3
    # debris of a crash during the epoch-2 write: a temp file and an incomplete epoch file
    (resumed / "epoch_00002.safetensors.tmp").write_bytes(b"partial")
    save_file({"p_true": np.zeros(N, np.float16)}, str(resumed / "epoch_00003.safetensors"), {"epoch": "3"})
    assert completed_epochs(resumed) == [0, 1]
    with DynamicsRecorder(resumed, N, C, labels=y.numpy()) as rec:
        assert rec.next_epoch == 2
        with pytest.raises(MmkitError, match="already recorded; continue with epoch 2"):
            rec.begin_epoch(1)
    record_epochs(resumed, x, y, model, [2])
    (resumed / "epoch_00003.safetensors").unlink()
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    assert names == ["epoch_00000.safetensors", "epoch_00001.safetensors", "epoch_00002.safetensors",
                     "labels.npy", "meta.json"]
    for name in ("labels.npy", "meta.json"):
        assert (tmp_path / "full" / name).read_bytes() == (resumed / name).read_bytes(), name
    # safetensors writes its metadata map in hash order, so compare epoch files by content
    for name in names[:3]:
        with safe_open(str(tmp_path / "full" / name), "numpy") as a, safe_open(str(resumed / name), "numpy") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key), err_msg=f"{name}:{key}")


def test_resume_refuses_other_settings(tmp_path):
    DynamicsRecorder(tmp_path, N, C, labels=np.zeros(N, np.int64)).close()
    with pytest.raises(MmkitError) as info:
        DynamicsRecorder(tmp_path, N, C, channels=("p_true",))
    assert info.value.field == "channels" and "meta.json" in info.value.file
    with pytest.raises(MmkitError, match="differs from the labels"):
        DynamicsRecorder(tmp_path, N, C, labels=np.ones(N, np.int64))


def test_host_buffer_path_matches_device_buffer(tmp_path, toy):
    """device_buffer_limit only changes where buffers live (a pinned host buffer on CUDA)."""
    if not torch.cuda.is_available():
        pytest.skip("the host-buffer path is used only for CUDA logits")
    x, y, model = toy
    model = model.cuda()
    for limit, out in ((1 << 30, tmp_path / "dev"), (0, tmp_path / "host")):
        with DynamicsRecorder(out, N, C, labels=y.numpy(), device_buffer_limit=limit) as rec:
            rec.begin_epoch(0)
            rec.record_pass(model, shuffled_loader(x, y))
            rec.end_epoch()
    assert epoch_file(tmp_path / "dev", 0).read_bytes() == epoch_file(tmp_path / "host", 0).read_bytes()


# --------------------------------------------------------------------------- native reader


def test_native_chunked_reads_and_gaps(tmp_path, toy):
    x, y, model = toy
    record_epochs(tmp_path, x, y, model, range(4))
    src = open_dynamics(tmp_path)
    full = read_all(src)
    assert full["p_true"].shape == (4, N)
    for chunk in (1, 4, 7, N + 5):
        for name in ALL:
            parts = [src.read(name, s, s + chunk) for s in range(0, N, chunk)]
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), full[name])
    epoch_file(tmp_path, 2).unlink()
    with pytest.raises(MmkitError, match=r"missing \[2\]"):
        open_dynamics(tmp_path)
    gapped = open_dynamics(tmp_path, allow_gaps=True)
    assert gapped.epochs == [0, 1, 3]
    np.testing.assert_array_equal(gapped.read("p_true", 0, N), full["p_true"][[0, 1, 3]])
    with pytest.raises(MmkitError, match="was not recorded"):
        src.read("probs", 0, N)
    with pytest.raises(MmkitError, match="labels for N"):
        open_dynamics(tmp_path, labels=np.zeros(N + 1, np.int64), allow_gaps=True)


# --------------------------------------------------------------------------- importers


@pytest.fixture()
def probs():
    rng = np.random.default_rng(0)
    return rng.uniform(0.01, 0.99, size=(5, 11)).astype(np.float32)


def write_forms(root: Path, p: np.ndarray) -> dict[str, Path]:
    """The same p_true [K, N] in every importer format."""
    k, n = p.shape
    forms = {"npy": root / "p.npy", "npz": root / "p.npz", "safetensors": root / "p.safetensors",
             "wide": root / "wide.csv", "long": root / "long.csv", "baai": root / "baai"}
    np.save(forms["npy"], p)
    np.savez(forms["npz"], p_true=p)
    save_file({"p_true": p}, str(forms["safetensors"]))
    order = np.random.default_rng(1).permutation(n)  # rows in any order
    lines = ["index," + ",".join(f"e{e}" for e in range(k))]
    lines += [f"{i}," + ",".join(f"{v:.9g}" for v in p[:, i]) for i in order]
    forms["wide"].write_text("\n".join(lines) + "\n")
    lines = ["index,epoch,p_true"] + [f"{i},{e},{p[e, i]:.9g}" for e in range(k) for i in order]
    forms["long"].write_text("\n".join(lines) + "\n")
    forms["baai"].mkdir()
    for e in range(k):
        np.savetxt(forms["baai"] / f"prob_{e}.txt", p[e].astype(np.float64))
    return forms


def test_all_import_forms_read_identically(tmp_path, probs):
    forms = write_forms(tmp_path, probs)
    for name, path in forms.items():
        src = open_dynamics(path)
        assert src.epochs == list(range(5)) and src.num_samples == 11, name
        np.testing.assert_array_equal(src.read("p_true", 0, 11), probs, err_msg=name)
        np.testing.assert_array_equal(src.read("p_true", 3, 8), probs[:, 3:8], err_msg=name)


def test_baai_zeros_become_nan(tmp_path, probs):
    probs[2, 4] = 0
    forms = write_forms(tmp_path, probs)
    got = open_dynamics(forms["baai"]).read("p_true", 0, 11)
    assert np.isnan(got[2, 4]) and np.isnan(got).sum() == 1
    # the reference layout, files in a pred_prob_history child
    forms["baai"].rename(tmp_path / "pred_prob_history")
    (tmp_path / "baai").mkdir()
    (tmp_path / "pred_prob_history").rename(tmp_path / "baai" / "pred_prob_history")
    np.testing.assert_array_equal(open_dynamics(tmp_path / "baai", format="baai-txt").read("p_true", 0, 11), got)


def test_import_validation(tmp_path, probs):
    bad = probs.copy()
    bad[3, 6] = 1.5
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(MmkitError, match="epoch 3, index 6.*logits") as info:
        open_dynamics(tmp_path / "bad.npy")
    assert info.value.field == "p_true" and info.value.file.endswith("bad.npy")
    bad[3, 6] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(MmkitError, match="epoch 3, index 6.*allow-nan"):
        open_dynamics(tmp_path / "nan.npy")
    assert np.isnan(open_dynamics(tmp_path / "nan.npy", allow_nan=True).read("p_true", 0, 11)[3, 6])
    np.save(tmp_path / "flat.npy", probs[0])
    with pytest.raises(MmkitError, match="2-D"):
        open_dynamics(tmp_path / "flat.npy")
    np.savez(tmp_path / "mixed.npz", p_true=probs, correct=np.ones((5, 10)))
    with pytest.raises(MmkitError, match="differ in shape"):
        open_dynamics(tmp_path / "mixed.npz")
    np.savez(tmp_path / "unnamed.npz", probs)
    with pytest.raises(MmkitError, match="unknown channel"):
        open_dynamics(tmp_path / "unnamed.npz")
    np.save(tmp_path / "ok.npy", probs)
    with pytest.raises(MmkitError, match="12 labels for N = 11"):
        open_dynamics(tmp_path / "ok.npy", labels=np.zeros(12, np.int64))
    (tmp_path / "dup.csv").write_text("index,e0\n0,0.5\n0,0.5\n")
    with pytest.raises(MmkitError, match="once") as info:
        open_dynamics(tmp_path / "dup.csv")
    assert info.value.line == 3
    (tmp_path / "hdr.csv").write_text("id,e0\n0,0.5\n")
    with pytest.raises(MmkitError, match="header"):
        open_dynamics(tmp_path / "hdr.csv")
    with pytest.raises(MmkitError, match="--format"):
        open_dynamics(tmp_path / "hdr.csv", format="parquet")


def test_transpose_is_explicit(tmp_path, probs):
    np.save(tmp_path / "nk.npy", probs.T)
    src = open_dynamics(tmp_path / "nk.npy", transpose=True)
    np.testing.assert_array_equal(src.read("p_true", 0, 11), probs)
    assert open_dynamics(tmp_path / "nk.npy").num_samples == 5  # never guessed
    with pytest.raises(MmkitError, match="labels for N"):
        open_dynamics(tmp_path / "nk.npy", labels=np.zeros(11, np.int64))
    (tmp_path / "f").mkdir()
    forms = write_forms(tmp_path / "f", probs)
    with pytest.raises(MmkitError, match="--transpose"):
        open_dynamics(forms["wide"], transpose=True)


def test_long_csv_channels_and_gaps(tmp_path):
    text = "index,epoch,p_true,correct\n0,0,0.5,1\n1,0,0.25,0\n0,2,0.75,1\n1,2,0.125,0\n"
    (tmp_path / "long.csv").write_text(text)
    with pytest.raises(MmkitError, match=r"missing \[1\]"):
        open_dynamics(tmp_path / "long.csv")
    src = open_dynamics(tmp_path / "long.csv", allow_gaps=True)
    assert src.epochs == [0, 2] and src.channels == ("p_true", "correct")
    np.testing.assert_array_equal(src.read("p_true", 0, 2), [[0.5, 0.25], [0.75, 0.125]])
    np.testing.assert_array_equal(src.read("correct", 0, 2), [[1, 0], [1, 0]])
    # an (index, epoch) pair that is absent is unseen, which needs --allow-nan
    (tmp_path / "holes.csv").write_text("index,epoch,p_true\n0,0,0.5\n1,0,0.5\n1,1,0.5\n")
    with pytest.raises(MmkitError, match="epoch 1, index 0"):
        open_dynamics(tmp_path / "holes.csv")
    assert np.isnan(open_dynamics(tmp_path / "holes.csv", allow_nan=True).read("p_true", 0, 2)[1, 0])


# --------------------------------------------------------------------------- fingerprint, labels


def test_dataset_fingerprint_by_hand():
    labels = np.array([2, 0, 1], dtype=np.int32)
    ids = ["a/x.png", "b/y.png", "c/z.png"]
    expected = hashlib.sha256(
        (3).to_bytes(8, "little")
        + b"\x02\x00\x00\x00\x00\x00\x00\x00" + b"\x00" * 8 + b"\x01\x00\x00\x00\x00\x00\x00\x00"
        + b"a/x.png\nb/y.png\nc/z.png"
    ).hexdigest()
    assert dataset_fingerprint(labels, ids) == "sha256:" + expected
    assert dataset_fingerprint(labels, ids[::-1]) != dataset_fingerprint(labels, ids)


def test_read_labels(tmp_path):
    np.save(tmp_path / "l.npy", np.array([3, 1, 2]))
    assert read_labels(tmp_path / "l.npy").tolist() == [3, 1, 2]
    (tmp_path / "l.txt").write_text("3\n1\n2\n\n")
    labels = read_labels(tmp_path / "l.txt")
    assert labels.tolist() == [3, 1, 2] and labels.dtype == np.int64
    (tmp_path / "bad.txt").write_text("3\ncat\n2\n")
    with pytest.raises(MmkitError) as info:
        read_labels(tmp_path / "bad.txt")
    assert str(info.value).startswith(f"{tmp_path / 'bad.txt'}:2: label:")
    np.save(tmp_path / "f.npy", np.array([0.5, 1.0]))
    with pytest.raises(MmkitError, match="integer"):
        read_labels(tmp_path / "f.npy")
