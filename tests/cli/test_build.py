"""`mmkit build-dataset` ambiguous-mmt / snare / mmr / realbench from the command line (mmkit/cli/build.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mmkit.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["build-dataset", *args])


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_help_lists_every_recipe_with_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("condense", "ambiguous-mmt", "snare", "mmr", "realbench"):
        assert f"mmkit build-dataset {name} --" in text
    for name in ("ambiguous-mmt", "snare", "mmr", "realbench"):
        sub = invoke(name, "--help")
        assert sub.exit_code == 0 and "Examples:" in sub.output and "--dry-run" in sub.output


def test_cli_import_does_not_import_torch():
    code = "import sys, mmkit.cli.build; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def pool(tmp_path):
    (tmp_path / "senses.tsv").write_text("bank\tn\ta\nbank\tn\tb\ndog\tn\tc\n", encoding="utf-8")
    rows = [{"cid": f"c{i}", "image": f"{i}.jpg", "en": ["a bank", "a dog"][i % 2], "zh": "一个", "source": "cc"}
            for i in range(6)]
    return jsonl(tmp_path / "pool.jsonl", rows), str(tmp_path / "senses.tsv")


def test_ambiguous_mmt_end_to_end_with_field_map_and_json(pool, tmp_path):
    path, tsv = pool
    out = tmp_path / "3am"
    result = invoke("ambiguous-mmt", "--captions", path, "--sense-inventory", f"tsv:{tsv}", "--field", "id=cid",
                    "--top-k", "4", "--val-size", "1", "--test-size", "1", "--split-unit", "caption",
                    "--out", str(out), "--json", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "ambiguous-mmt" and manifest["config"]["fields"] == {"id": "cid"}
    assert sorted(o["path"] for o in manifest["outputs"])[:3] == ["dropped.jsonl", "images-test.txt",
                                                                  "images-train.txt"]
    assert sum(len((out / f"{s}.en").read_text().splitlines()) for s in ("train", "val", "test")) == 4
    again = invoke("ambiguous-mmt", "--captions", path, "--sense-inventory", f"tsv:{tsv}", "--out", str(out))
    assert again.exit_code == 2 and "already exists (pass --overwrite" in again.output
    assert invoke("ambiguous-mmt", "--captions", path, "--sense-inventory", f"tsv:{tsv}", "--field", "id=cid",
                  "--out", str(out), "--overwrite", "-q").exit_code == 0


def test_dry_run_writes_nothing(pool, tmp_path):
    path, tsv = pool
    result = invoke("ambiguous-mmt", "--captions", path, "--sense-inventory", f"tsv:{tsv}", "--field", "id=cid",
                    "--dry-run", "--json", "--out", str(tmp_path / "dry"), "--work-dir", str(tmp_path / "w"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dry_run"] is True
    assert not (tmp_path / "dry").exists() and not (tmp_path / "w").exists()


def test_missing_field_is_one_error_line_exit_2(pool, tmp_path):
    path, tsv = pool
    result = invoke("ambiguous-mmt", "--captions", path, "--sense-inventory", f"tsv:{tsv}", "--out",
                    str(tmp_path / "o"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {path}:1: id: missing field; fields here: cid, image, "
                                                  "en, zh, source (did you mean 'cid'?)"]
    assert not (tmp_path / "o").exists()
    unknown = invoke("ambiguous-mmt", "--captions", path, "--sense-inventory", f"tsv:{tsv}", "--set", "top_kk=3",
                     "--out", str(tmp_path / "o"))
    assert unknown.exit_code == 2 and "did you mean 'top_k'" in unknown.output


def test_snare_end_to_end(tmp_path):
    rel = {"image_path": "1.jpg", "bbox_x": 0, "bbox_y": 0, "bbox_w": 5, "bbox_h": 5,
           "true_caption": "the horse is eating the grass", "relation_name": "eating", "obj1_name": "horse",
           "obj2_name": "grass"}
    path = jsonl(tmp_path / "rel.jsonl", [rel])
    result = invoke("snare", "--relations", path, "--out", str(tmp_path / "s"), "-q")
    assert result.exit_code == 0, result.output
    probe = json.loads((tmp_path / "s" / "probes.jsonl").read_text())
    assert probe["captions"][2] == "the horse and the grass"
    del rel["bbox_w"]
    jsonl(tmp_path / "rel.jsonl", [rel])
    bad = invoke("snare", "--relations", path, "--out", str(tmp_path / "s2"))
    assert bad.exit_code == 2 and bad.output.startswith(f"error: {path}:1: bbox_w: missing field")
    assert not (tmp_path / "s2").exists()


def test_mmr_end_to_end(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    path = jsonl(tmp_path / "r.jsonl", [{"id": "1", "image": "a.jpg", "question": "Is it red?", "answer": "Yes.",
                                         "distractor": "blue"}])
    result = invoke("mmr", "--records", path, "--out", str(tmp_path / "m"), "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "neg.json").read_text())[0]["conversations"][0]["value"] == \
        "<image>\nIs it red? Isn't it blue?"
    missing = invoke("mmr", "--records", path, "--mode", "llm", "--out", str(tmp_path / "m2"))
    assert missing.exit_code == 2 and "--mode llm needs --llm-base-url and --llm-model" in missing.output


def test_realbench_missing_image_exit_2(tmp_path):
    pytest.importorskip("jieba")
    from PIL import Image

    for k, name in enumerate(("1.png", "2.png")):
        Image.new("RGB", (40, 40), (k * 200, 0, 0)).save(tmp_path / name)
    row = {"id": "a", "task": "retrieval", "images": ["1.png", "2.png"], "question": "哪张图片是红色的？",
           "options": None, "answer_type": "image_index", "answer": "1"}
    path = jsonl(tmp_path / "samples.jsonl", [row, {**row, "id": "b", "images": ["1.png", "2.png", "3.png"]}])
    result = invoke("realbench", "--samples", path, "--out", str(tmp_path / "rb"))
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {path}:2: images[2]: image file not found: {tmp_path / '3.png'}"
    assert not (tmp_path / "rb").exists()
    ok = invoke("realbench", "--samples", path, "--on-invalid", "skip", "--out", str(tmp_path / "rb"), "-q")
    assert ok.exit_code == 0, ok.output
    assert len((tmp_path / "rb" / "samples.jsonl").read_text().splitlines()) == 1
