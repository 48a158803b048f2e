"""End-to-end tests of `mmkit evaluate representation` (mmkit/cli/evaluate.py, mmkit/evaluate/representation.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mmkit.cli import build_app
from tests.evaluate.test_representation import KEYS, write_texts

runner = CliRunner()
METRICS = ("cca", "svcca", "pwcca", "cka")


def invoke(*args: str):
    return runner.invoke(build_app(), ["evaluate", "representation", *args])


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    g = torch.Generator().manual_seed(0)
    layers = {f"h{i}": torch.randn(200, 12, generator=g) for i in range(3)}
    paths = {}
    for name, tensors in {
        "a": layers, "b": {k: v.clone() for k, v in layers.items()},
        "flat": {"h0": torch.randn(200, generator=g)},
        "nan": {"h0": torch.full((200, 4), float("nan"))},
        "ints": {"h0": torch.ones(200, 4, dtype=torch.int64)},
        "ragged": {"h0": torch.randn(200, 4, generator=g), "h1": torch.randn(199, 4, generator=g)},
        "short": {"h0": torch.randn(150, 4, generator=g)},
        "wide": {"h0": torch.randn(200, 300, generator=g)},
    }.items():
        paths[name] = str(root / f"{name}.safetensors")
        save_file(tensors, paths[name])
    (root / "junk.safetensors").write_bytes(b"not a safetensors file")
    paths["junk"] = str(root / "junk.safetensors")
    paths["texts"] = write_texts(root / "texts.jsonl")
    return paths


def test_identical_activation_files_give_one_and_write_every_artefact(tmp_path, files):
    out = tmp_path / "run"
    res = ok(invoke("--acts-a", files["a"], "--acts-b", files["b"], "--out", str(out), "--json"))
    assert res["command"] == "evaluate representation" and res["method"] == "representation"
    pairs = res["metrics"]["pairs"]
    assert len(pairs) == 9 and all(set(p) == KEYS for p in pairs)
    for p in pairs:
        if p["layer_a"] == p["layer_b"]:
            assert all(p[m] == pytest.approx(1.0, abs=1e-5) for m in METRICS)
        else:
            assert all(p[m] < 0.5 for m in METRICS)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "results.json", "log.txt", "similarity.json",
                                               *(f"similarity_{m}.png" for m in METRICS)}
    sim = json.loads((out / "similarity.json").read_text())
    assert set(METRICS) <= set(sim) and len(sim["cca"]) == 3 and sim["layers_b"] == ["h0", "h1", "h2"]
    assert (out / "similarity_cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_subset_and_the_table_on_stderr(tmp_path, files):
    result = invoke("--acts-a", files["a"], "--acts-b", files["a"], "--metrics", "cka", "--layers", "h2",
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "layer_a" in result.stderr and "1.00" in result.stderr and "200 samples, 1 layer pairs" in result.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["metrics"]["pairs"] == [{"layer_a": "h2", "layer_b": "h2", "cka": pytest.approx(1.0)}]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == ["similarity_cka.png"]


def test_tiny_bert_against_itself_through_two_model_flags(tmp_path, tiny_bert, files):
    other = shutil.copytree(tiny_bert, tmp_path / "bert-copy")
    res = ok(invoke("--model-a", tiny_bert, "--model-b", str(other), "--data", files["texts"], "--layers", "0,2",
                    "--out", str(tmp_path / "run"), "--json"))
    pairs = res["metrics"]["pairs"]
    assert [(p["layer_a"], p["layer_b"]) for p in pairs] == [(0, 0), (0, 2), (2, 0), (2, 2)]
    for p in (pairs[0], pairs[3]):  # layer i against layer i
        assert p["svcca"] == pytest.approx(1.0, abs=1e-4) and p["cka"] == pytest.approx(1.0, abs=1e-6)
        assert p["pwcca"] == pytest.approx(1.0, abs=1e-3)
        assert p["cca"] == pytest.approx(31 / 32, abs=1e-3)  # LayerNorm's null direction (test_representation.py)
    assert res["models"]["model_b"]["id"] == str(other) and res["unit"] == "token"
    assert len(list((tmp_path / "run").glob("similarity_*.png"))) == 4


@pytest.mark.parametrize("args, expected", [
    (["--acts-a", "{a}", "--acts-b", "{tmp}/missing.safetensors"], "{tmp}/missing.safetensors: --acts-b: no such file"),
    (["--acts-a", "{junk}", "--acts-b", "{a}"], "{junk}: --acts-a: not a readable safetensors file"),
    (["--acts-a", "{flat}", "--acts-b", "{a}"], "{flat}: h0: expected a 2-D float tensor [N, D], got float32 of "
                                               "shape [200]"),
    (["--acts-a", "{a}", "--acts-b", "{nan}"], "{nan}: h0: holds NaN or infinite values"),
    (["--acts-a", "{ints}", "--acts-b", "{a}"], "{ints}: h0: expected a 2-D float tensor [N, D], got int64"),
    (["--acts-a", "{ragged}", "--acts-b", "{a}"], "{ragged}: h1: has 199 rows, the other tensors 200"),
    (["--acts-a", "{a}", "--acts-b", "{short}"], "{short}: --acts-b: has 150 rows, {a} has 200"),
    (["--acts-a", "{a}", "--acts-b", "{wide}"], "{wide}: h0: CCA needs more samples than features: N=200, d=300; "
                                               "give at least 301 samples (1500 or more recommended)"),
    (["--acts-a", "{a}", "--acts-b", "{a}", "--layers", "h9"], "--layers: no layer 'h9'"),
    (["--acts-a", "{a}", "--acts-b", "{a}", "--metrics", "cca,kca"], "--metrics: unknown similarity metric 'kca'"),
    (["--acts-a", "{a}", "--acts-b", "{a}", "--unit", "word"], "unit: expected one of token, cls, mean"),
    (["--acts-a", "{a}", "--model-a", "{a}"], "--acts-a: --acts-a/--acts-b replace --model-a/--model-b/--data"),
    (["--model-a", "{bert}", "--model-b", "{bert}", "--data", "{texts}", "--unit", "cls", "--max-samples", "20"],
     "{texts}: --data: CCA needs more samples than features: N=20, d=32; give at least 33 samples"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_run_folder(tmp_path, files, tiny_bert, args, expected):
    fill = {**files, "tmp": str(tmp_path), "bert": tiny_bert}
    out = tmp_path / "out"
    result = invoke(*[a.format(**fill) for a in args], "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected.format(**fill)}")
    assert "Traceback" not in result.output
    assert not out.exists()
