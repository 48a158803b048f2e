"""End-to-end tests of `mmkit build-dataset condense` (mmkit/cli/build.py, mmkit/build/condense.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mmkit.cli import app
from tests.build.test_condense import _image_pairs, _random_corpus, write_clip_retrieval, write_corpus

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["build-dataset", "condense", *args])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_offline_run_with_embeddings_prints_the_manifest(tmp_path):
    pairs, emb = _random_corpus(tmp_path)
    out = tmp_path / "out"
    result = invoke("--pairs", str(pairs), "--embeddings", str(emb), "--clusters", "3", "--shard-rows", "8",
                    "--target", "4", "--clip-band", "0.1", "0.9", "--format", "llava", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["clip_band"] == [0.1, 0.9] and manifest["config"]["format"] == "llava"
    assert len(json.loads((out / "pretrain.json").read_text())) == 4
    assert {o["path"] for o in manifest["outputs"]} == {"pretrain.json", "dropped.jsonl", "centroids.safetensors",
                                                        "funnel.json", "funnel.csv", "funnel.png"}
    assert "centroid-band" in result.stderr  # the stage table
    again = invoke("--pairs", str(pairs), "--embeddings", str(emb), "--out", str(out))
    assert "already exists" in _one_error_line(again)


def test_tiny_clip_from_a_config_file(tmp_path, tiny_clip):
    pairs = _image_pairs(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"clip: {tiny_clip}\ndevice: cpu\nclusters: 2\ntarget: 3\ncentroid_band: [0, 1]\n",
                   encoding="utf-8")
    result = invoke("--pairs", str(pairs), "--config", str(cfg), "--set", "clip_band=[0, 1]", "--out",
                    str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["models"]["clip"]["id"] == tiny_clip
    assert manifest["metrics"]["stages"][0]["dropped"] == {"unreadable_image": 1}


def test_target_larger_than_survivors_warns_and_keeps_all(tmp_path):
    pairs, emb = _random_corpus(tmp_path)
    result = invoke("--pairs", str(pairs), "--embeddings", str(emb), "--clusters", "2", "--target", "1000",
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "target_not_reached" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sample = next(s for s in manifest["metrics"]["stages"] if s["name"] == "sample")
    assert sample["kept"] == sample["in"] and any("target_not_reached" in w for w in manifest["warnings"])


def test_dry_run_writes_nothing(tmp_path):
    pairs, emb = _random_corpus(tmp_path)
    result = invoke("--pairs", str(pairs), "--embeddings", str(emb), "--dry-run", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "dry run" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_parquet_without_caption(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b"], "image": ["a.png", "b.png"], "text": ["x", "y"]}),
                   tmp_path / "pairs.parquet")
    result = invoke("--pairs", str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "out"))
    line = _one_error_line(result)
    assert line.startswith(f"error: {tmp_path / 'pairs.parquet'}:row 1: caption: missing field")
    assert not (tmp_path / "out").exists()


def test_duplicate_key(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"key": k, "image": "i.png", "caption": "c"}) + "\n" for k in "abca"),
                     encoding="utf-8")
    line = _one_error_line(invoke("--pairs", str(pairs), "--out", str(tmp_path / "out")))
    assert line == f"error: {pairs}:4: key: duplicate key 'a' (first at 1)"
    assert not (tmp_path / "out").exists()


def test_clip_retrieval_shard_with_mismatched_rows(tmp_path):
    x = np.eye(4, 8, dtype=np.float32)
    pairs, _ = write_corpus(tmp_path, x, np.zeros(4))
    cr = write_clip_retrieval(tmp_path / "cr", [["k0", "k1", "k2"]], short_text=2)
    line = _one_error_line(invoke("--pairs", str(pairs), "--embeddings", str(cr), "--out", str(tmp_path / "out")))
    assert line == (f"error: {cr / 'img_emb' / 'img_emb_0000.npy'}: rows: row counts differ: 3 image rows, "
                    "2 text rows, 3 metadata rows")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, field", [(("--clip-band", "0.5", "0.5"), "clip_band"),
                                         (("--stages", "dedupe"), "stages"),
                                         (("--set", "dedup_treshold=0.9"), "--set dedup_treshold")])
def test_bad_options(tmp_path, args, field):
    pairs, emb = _random_corpus(tmp_path)
    line = _one_error_line(invoke("--pairs", str(pairs), "--embeddings", str(emb), *args,
                                  "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: {field}: ")
