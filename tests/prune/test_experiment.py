"""The pruning experiment's bookkeeping and its quick run (mmkit/prune/experiment.py; prune.md section 11)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from mmkit.cli import app
from mmkit.errors import MmkitError
from mmkit.prune.experiment import ExperimentConfig, compare_to_random, report, summarise

ROWS = [
    {"method": "full", "keep": "1.0", "seed": "0", "test_acc": "98.0"},
    {"method": "full", "keep": "1.0", "seed": "1", "test_acc": "96.0"},
    {"method": "random", "keep": "0.5", "seed": "0", "test_acc": "90.0"},
    {"method": "random", "keep": "0.5", "seed": "1", "test_acc": "92.0"},
    {"method": "dyn-unc", "keep": "0.5", "seed": "0", "test_acc": "93.0"},
    {"method": "dyn-unc", "keep": "0.5", "seed": "1", "test_acc": "95.0"},
    {"method": "dyn-unc", "keep": "0.3", "seed": "0", "test_acc": "80.0"},
    {"method": "dyn-unc", "keep": "0.3", "seed": "1", "test_acc": "82.0"},
    {"method": "random", "keep": "0.3", "seed": "0", "test_acc": "88.0"},
    {"method": "random", "keep": "0.3", "seed": "1", "test_acc": "88.0"},
]


def test_summary_mean_and_sample_std():
    by = {(r["method"], r["keep"]): r for r in summarise(ROWS)}
    assert by[("random", 0.5)]["mean"] == 91.0
    assert by[("random", 0.5)]["std"] == pytest.approx(math.sqrt(2.0))  # ddof = 1: ((1 + 1) / 1) ** 0.5
    assert by[("full", 1.0)]["n"] == 2 and summarise(ROWS)[0]["method"] == "full"
    one = summarise(ROWS[:1])
    assert math.isnan(one[0]["std"])


def test_flags_only_where_dyn_unc_is_more_than_one_std_below_random():
    flags = compare_to_random(summarise(ROWS))
    assert len(flags) == 1 and flags[0].startswith("keep 0.3") and "expected on small data" in flags[0]


def test_report_table():
    text = report(ExperimentConfig(preset="digits", seeds=[0, 1]), summarise(ROWS), [], "mlp")
    assert "| method | keep 0.5 | keep 0.3 |" in text
    assert "| dyn-unc | 94.00 +- 1.41 | 81.00 +- 1.41 |" in text
    assert "Full data (keep 1.0): 97.00 +- 1.41." in text


def test_bad_grid_values_are_user_errors():
    with pytest.raises(MmkitError, match="--preset"):
        ExperimentConfig(preset="imagenet").resolved()
    with pytest.raises(MmkitError, match="--methods"):
        ExperimentConfig(methods=["dyn-unk"]).resolved()
    with pytest.raises(MmkitError, match="keep"):
        ExperimentConfig(keeps=[1.5]).resolved()


@pytest.mark.slow
def test_quick_digits_experiment(tmp_path):
    out = tmp_path / "exp"
    result = CliRunner().invoke(app, ["prune-data", "experiment", "--preset", "digits", "--quick", "--out", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["method"], r["keep"], r["seed"]) for r in rows) == sorted(
        [("full", "1.0", s) for s in "01"] + [(m, "0.5", s) for m in ("random", "dyn-unc") for s in "01"])
    assert all(int(r["n_train"]) == (1437 if r["method"] == "full" else 719) for r in rows)
    full = [float(r["test_acc"]) for r in rows if r["method"] == "full"]
    assert min(full) >= 90.0, full
    for name in ("summary.csv", "accuracy_vs_keep.png", "report.md", "results.json"):
        assert (out / name).exists(), name
    results = json.loads(result.stdout)
    assert set(results["metrics"]) == {"full@1.0", "random@0.5", "dyn-unc@0.5"}
