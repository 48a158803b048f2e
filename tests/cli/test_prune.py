"""End-to-end tests of `mmkit prune-data` (mmkit/cli/prune.py, mmkit/prune/pipeline.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

from mmkit.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["prune-data", *args])


def naive_dyn_unc(p: np.ndarray, window: int) -> np.ndarray:
    """prune.md section 3.1 as a plain float64 loop over windows."""
    p = p.astype(np.float64)
    k = p.shape[0]
    return np.mean([p[s:s + window].std(axis=0, ddof=1) for s in range(k - window + 1)], axis=0)


@pytest.mark.slow
def test_digits_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = invoke("digits", "--method", "dyn-unc", "--epochs", "12", "--window", "5", "--keep", "0.75",
                    "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "results.json", "log.txt", "dynamics", "scores.npy", "scores.csv", "kept_indices.txt",
            "kept_indices.npy", "selection.json", "scores_hist.png", "pruned", "proxy"} <= names
    n = 1437
    # the scores are the dynamic uncertainty of the recorded true-class probabilities
    p = np.stack([load_file(str(out / "dynamics" / f"epoch_{k:05d}.safetensors"))["p_true"] for k in range(12)])
    assert p.shape == (12, n)
    expected = naive_dyn_unc(p.astype(np.float32), 5)
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == list(range(n))
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.load(out / "scores.npy"), expected, rtol=1e-5, atol=1e-7)
    # kept = exactly the highest-scoring round(0.75 N) examples, ascending, one per line
    kept = [int(x) for x in (out / "kept_indices.txt").read_text().split()]
    n_keep = int(np.floor(0.75 * n + 0.5))
    assert len(kept) == n_keep == 1078 and kept == sorted(set(kept))
    pruned = np.setdiff1d(np.arange(n), kept)
    assert expected[kept].min() >= expected[pruned].max()
    assert all(r["kept"] == ("1" if int(r["index"]) in set(kept) else "0") for r in rows)
    results = json.loads(result.stdout)
    assert results["command"] == "prune-data" and results["method"] == "dyn-unc"
    assert results["metrics"]["n_keep"] == n_keep and results["metrics"]["N"] == n
    assert results["metrics"]["proxy"]["test_acc"] > 80
    selection = json.loads((out / "selection.json").read_text())
    assert sum(selection["per_class_kept"].values()) == n_keep
    assert selection["dynamics"]["fingerprint"].startswith("sha256:")
    npz = np.load(out / "pruned" / "data.npz")
    assert npz["index"].tolist() == kept and len(npz["x"]) == n_keep
    # a rerun resumes: nothing is trained again and the selection is the same
    again = invoke("digits", "--method", "dyn-unc", "--epochs", "12", "--window", "5", "--keep", "0.75",
                   "--out", str(out))
    assert again.exit_code == 0, again.output
    assert (out / "kept_indices.txt").read_text().split() == [str(k) for k in kept]


def _native_dynamics(tmp_path: Path, p: np.ndarray) -> Path:
    np.save(tmp_path / "p.npy", p)
    return tmp_path / "p.npy"


def test_score_a_hand_made_dynamics_file_without_training(tmp_path):
    p = np.array([[0.1, 0.5, 0.9], [0.3, 0.5, 0.1], [0.3, 0.5, 0.9], [0.7, 0.5, 0.1]], dtype=np.float32)
    out = tmp_path / "score"
    result = invoke("score", "--dynamics", str(_native_dynamics(tmp_path, p)), "--window", "2", "--n-keep", "2",
                    "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    # prune.md section 10.1: U = 0.1414214, 0, 0.5656854; the two highest are kept
    np.testing.assert_allclose(np.load(out / "scores.npy"), [0.1414214, 0.0, 0.5656854], atol=1e-6)
    assert (out / "kept_indices.txt").read_text() == "0\n2\n"
    assert json.loads(result.stdout)["metrics"]["n_keep"] == 2
    # select then apply the saved scores again, class-balanced with labels from a file
    (tmp_path / "labels.txt").write_text("0\n0\n1\n")
    sel = tmp_path / "select"
    result = invoke("select", "--scores", str(out / "scores.csv"), "--labels", str(tmp_path / "labels.txt"),
                    "--n-keep", "2", "--balance", "class", "--out", str(sel))
    assert result.exit_code == 0, result.output
    assert (sel / "kept_indices.txt").read_text() == "0\n2\n"


def test_score_without_budget_writes_scores_only(tmp_path):
    p = np.random.default_rng(0).uniform(size=(6, 20)).astype(np.float32)
    out = tmp_path / "s"
    result = invoke("score", "--dynamics", str(_native_dynamics(tmp_path, p)), "--window", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "scores.csv").exists() and not (out / "kept_indices.txt").exists()
    np.testing.assert_allclose(np.load(out / "scores.npy"), naive_dyn_unc(p, 3), rtol=1e-5)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def _bad_case(tmp_path: Path, case: str) -> list[str]:
    if case == "label outside the class list":
        _png(tmp_path / "a.png")
        (tmp_path / "list.csv").write_text("path,label\na.png,cat\na.png,cow\n")
        return ["record", str(tmp_path / "list.csv"), "--classes", "cat,dog", "--model", "mlp", "--epochs", "2"]
    if case == "missing image file":
        _png(tmp_path / "a.png")
        (tmp_path / "list.jsonl").write_text('{"path": "a.png", "label": 0}\n{"path": "b.png", "label": 1}\n')
        return ["record", str(tmp_path / "list.jsonl"), "--model", "mlp", "--epochs", "2"]
    if case == "dynamics of the wrong shape":
        np.save(tmp_path / "p.npy", np.full((2, 3, 4), 0.5, dtype=np.float32))
        return ["score", "--dynamics", str(tmp_path / "p.npy"), "--window", "2"]
    if case == "dynamics with NaNs":
        p = np.full((4, 5), 0.5, dtype=np.float32)
        p[2, 3] = np.nan
        np.save(tmp_path / "p.npy", p)
        return ["score", "--dynamics", str(tmp_path / "p.npy"), "--window", "2"]
    if case == "window larger than K":
        np.save(tmp_path / "p.npy", np.full((4, 5), 0.5, dtype=np.float32))
        return ["score", "--dynamics", str(tmp_path / "p.npy"), "--window", "10"]
    if case == "window larger than epochs (run)":
        return ["digits", "--epochs", "3", "--window", "5"]
    if case == "keep and prune together":
        return ["digits", "--keep", "0.5", "--prune", "0.5"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, expected", [
    ("label outside the class list", "list.csv:row 2: label: label 'cow' is not in the class list"),
    ("missing image file", "list.jsonl:2: path: image file not found"),
    ("dynamics of the wrong shape", "p.npy"),
    ("dynamics with NaNs", "p.npy"),
    ("window larger than K", "--window"),
    ("window larger than epochs (run)", "--window"),
    ("keep and prune together", "--"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case, expected):
    out = tmp_path / "out"
    result = invoke(*_bad_case(tmp_path, case), "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_help_lists_the_stages():
    result = runner.invoke(app, ["prune-data", "--help"])
    assert result.exit_code == 0
    for name in ("run", "record", "score", "select", "apply", "experiment"):
        assert name in result.output
