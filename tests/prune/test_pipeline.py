"""The prune-data stages on real files (mmkit/prune/pipeline.py; prune.md sections 7, 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkit.errors import DataError
from mmkit.prune.pipeline import PruneConfig, run_all, run_apply, run_score


@pytest.fixture()
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        for k in range(6):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size=(12, 12, 3)), 0, 255).astype(np.uint8)
            (tmp_path / "images" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"{k}.png")
    return tmp_path / "images"


def _cfg(dataset: str, **kw) -> PruneConfig:
    cfg = PruneConfig(dataset=dataset, epochs=3, **kw)
    cfg.data.image_size = 8
    cfg.proxy.model, cfg.proxy.batch_size, cfg.proxy.dtype = "small-cnn", 4, "float32"
    cfg.score.window = 2
    return cfg


def test_imagefolder_run_then_apply_elsewhere(folder, tmp_path):
    cfg = _cfg(str(folder), method="forgetting")
    cfg.select.keep, cfg.materialize = 0.5, "copy"
    results = run_all(cfg, str(tmp_path / "run"))
    run = tmp_path / "run"
    assert results["metrics"]["n_keep"] == 6
    lines = (run / "pruned" / "file_list.txt").read_text().splitlines()
    kept = [int(x) for x in (run / "kept_indices.txt").read_text().split()]
    ids = [f"{c}/{k}.png" for c in ("cat", "dog") for k in range(6)]
    assert lines == [f"/{ids[i]} {i // 6}" for i in kept]
    assert sorted(p.relative_to(run / "pruned" / "train").as_posix()
                  for p in (run / "pruned" / "train").rglob("*.png")) == sorted(ids[i] for i in kept)
    # apply the same selection again: same files; the selection.json beside it is checked
    cfg2 = PruneConfig(dataset=str(folder), indices=str(run / "kept_indices.txt"))
    cfg2.data.image_size = 8
    applied = run_apply(cfg2, str(tmp_path / "apply"))
    assert applied["metrics"]["n_keep"] == 6
    assert (tmp_path / "apply" / "pruned" / "file_list.txt").read_text().splitlines() == lines


def test_apply_refuses_a_selection_made_for_another_dataset(folder, tmp_path):
    run = tmp_path / "sel"
    run.mkdir()
    (run / "kept_indices.txt").write_text("0\n1\n")
    (run / "selection.json").write_text(json.dumps({"dynamics": {"fingerprint": "sha256:" + "0" * 64}}))
    cfg = PruneConfig(dataset=str(folder), indices=str(run / "kept_indices.txt"))
    with pytest.raises(DataError, match="does not match the dataset"):
        run_apply(cfg, str(tmp_path / "apply"))
    assert not (tmp_path / "apply").exists()
    cfg.force = True
    assert run_apply(cfg, str(tmp_path / "apply"))["metrics"]["n_keep"] == 2


def test_ccs_with_an_aum_cutoff_drops_the_hardest(tmp_path):
    rng = np.random.default_rng(1)
    k, n = 5, 40
    margin = rng.normal(size=(k, n)).astype(np.float32)
    p_true = rng.uniform(size=(k, n)).astype(np.float32)
    np.savez(tmp_path / "d.npz", margin=margin, p_true=p_true)
    cfg = PruneConfig(method="dyn-unc", dynamics=[str(tmp_path / "d.npz")])
    cfg.score.window = 2
    cfg.select.keep, cfg.select.strategy, cfg.select.ccs_cutoff_score = 0.25, "ccs", "aum"
    results = run_score(cfg, str(tmp_path / "out"))
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    n_cut = selection["ccs"]["n_cut"]
    assert results["metrics"]["n_keep"] == 10 and n_cut == 8  # prune rate 0.75 -> beta 0.2; floor(0.2 * 40)
    hardest = np.argsort(-(-margin.mean(0)), kind="stable")[:n_cut]  # importance = -AUM, highest cut
    kept = set(int(x) for x in (tmp_path / "out" / "kept_indices.txt").read_text().split())
    assert not kept & set(hardest.tolist())
