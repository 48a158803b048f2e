"""mmkit/evaluate/representation.py: activation files and tiny text encoders through ``run`` (evaluate.md §7)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmkit.config import load_config
from mmkit.core import similarity as S
from mmkit.errors import MmkitError
from mmkit.evaluate import Benchmark, get_benchmark, hooks
from mmkit.evaluate.representation import BENCHMARK, RepresentationConfig, run

KEYS = {"layer_a", "layer_b", "cca", "svcca", "pwcca", "cka"}


def config(**flags) -> RepresentationConfig:
    return load_config(RepresentationConfig, flags=flags)


def save_acts(path, tensors: dict[str, np.ndarray]) -> str:
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def layers() -> dict[str, np.ndarray]:
    g = np.random.default_rng(0)
    return {"layer10": g.standard_normal((300, 6)), "layer2": g.standard_normal((300, 8)),
            "layer1": g.standard_normal((300, 5))}


def write_texts(path, n: int = 40) -> str:
    """``n`` JSONL records of 3-11 fixture words (about 7 tokens each with [CLS] and [SEP])."""
    from tests.fixtures_models import WORDS

    g = np.random.default_rng(1)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            words = g.choice(WORDS[:200], size=3 + i % 9)
            fh.write(json.dumps({"id": i, "text": " ".join(words), "other": " ".join(words[::-1])}) + "\n")
    return str(path)


def test_registered_as_an_evaluate_benchmark_with_load_and_score_only():
    bench = get_benchmark("representation")
    assert bench is BENCHMARK and isinstance(bench, Benchmark) and hooks(bench) == ["load", "score"]
    assert bench.needs == "embed" and bench.version == "1"


def test_identical_files_give_one_for_every_pair_metric_and_write_artefacts(tmp_path, layers):
    a = save_acts(tmp_path / "a.safetensors", layers)
    b = save_acts(tmp_path / "b.safetensors", layers)
    res = run(config(acts_a=a, acts_b=b), str(tmp_path / "run"))
    names = ["layer1", "layer2", "layer10"]  # natural order of the keys
    assert res["layers_a"] == names and res["layers_b"] == names
    pairs = res["metrics"]["pairs"]
    assert [(p["layer_a"], p["layer_b"]) for p in pairs] == [(x, y) for x in names for y in names]
    assert all(set(p) == KEYS for p in pairs)
    for p in pairs:
        if p["layer_a"] == p["layer_b"]:
            assert all(p[m] == pytest.approx(1.0, abs=1e-5) for m in ("cca", "svcca", "pwcca", "cka"))
        else:  # independent Gaussians
            assert p["cca"] < 0.3 and p["cka"] < 0.1
    assert res["counts"]["samples"] == 300 and res["unit"] is None and res["data"]["acts_b"]["path"] == b
    sim = json.loads((tmp_path / "run" / "similarity.json").read_text())
    assert sim["layers_a"] == names and sim["n_samples"] == 300
    assert np.allclose(np.diag(sim["cka"]), 1.0) and len(sim["rho"]) == 9
    assert len(sim["rho"][0]["cca"]) == 5 and len(sim["rho"][1]["cca"]) == 5  # min(d1, d2) values
    assert sim["cca"][0][1] == pytest.approx(np.mean(sim["rho"][1]["cca"]))
    for m in ("cca", "svcca", "pwcca", "cka"):
        assert (tmp_path / "run" / f"similarity_{m}.png").read_bytes()[:4] == b"\x89PNG"


def test_known_answers_on_files_match_the_core_functions(tmp_path, layers):
    x = layers["layer2"]
    y = np.tanh(x @ np.random.default_rng(2).standard_normal((8, 7)))
    a = save_acts(tmp_path / "a.safetensors", {"h": x})
    b = save_acts(tmp_path / "b.safetensors", {"lin": x @ np.diag(np.arange(1.0, 9.0)), "tanh": y})
    res = run(config(acts_a=a, acts_b=b, metrics="cca,cka"), str(tmp_path / "run"))
    lin, tanh = res["metrics"]["pairs"]
    assert set(lin) == {"layer_a", "layer_b", "cca", "cka"}  # metrics left out are absent
    assert lin["cca"] == pytest.approx(1.0, abs=1e-5)                      # an invertible map
    x32, y32 = x.astype(np.float32), y.astype(np.float32)                 # what the file holds
    assert tanh["cca"] == pytest.approx(S.cca(x32, y32).mean, abs=1e-9)
    assert tanh["cka"] == pytest.approx(S.linear_cka(x32, y32), abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == ["similarity_cca.png", "similarity_cka.png"]


def test_layer_selection_diagonal_pairs_and_subsampling(tmp_path, layers):
    a = save_acts(tmp_path / "a.safetensors", layers)
    res = run(config(acts_a=a, acts_b=a, layers_a="layer10,layer1", layers_b="layer2,layer1", pairs="diagonal",
                     max_samples=120, seed=5), str(tmp_path / "run"))
    assert [(p["layer_a"], p["layer_b"]) for p in res["metrics"]["pairs"]] == [("layer10", "layer2"),
                                                                               ("layer1", "layer1")]
    rows = S.sample_rows(300, 120, 5, "rows")
    x, y = (layers[k][rows].astype(np.float32) for k in ("layer10", "layer2"))
    assert res["counts"]["samples"] == 120
    assert res["metrics"]["pairs"][0]["pwcca"] == pytest.approx(S.pwcca(x, y).mean, abs=1e-9)
    sim = json.loads((tmp_path / "run" / "similarity.json").read_text())
    assert sim["cka"][0][1] is None and sim["cka"][1][1] == pytest.approx(1.0)  # only the diagonal is computed


@pytest.mark.parametrize("flags, message", [
    (dict(layers="layer3"), "--layers: no layer 'layer3'"),
    (dict(layers_a="layer1", layers_b="layer1,layer2", pairs="diagonal"), "--pairs: diagonal pairs need as many"),
    (dict(max_samples=6), "layer2: CCA needs more samples than features: N=6, d=8; give at least 9 samples "
                          "(40 or more recommended); raise --max-samples above 6"),
])
def test_file_mistakes_are_one_line_errors_and_leave_no_folder(tmp_path, layers, flags, message):
    a = save_acts(tmp_path / "a.safetensors", layers)
    with pytest.raises(MmkitError) as err:
        run(config(acts_a=a, acts_b=a, **flags), str(tmp_path / "run"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, field", [
    (dict(acts_a="a", model_a="m"), "--acts-a"), (dict(acts_a="a"), "--acts-b"),
    (dict(model_a="m", data="d"), "--model-b"), (dict(acts_a="a", acts_b="b", metrics="cca,ckaa"), "--metrics"),
    (dict(acts_a="a", acts_b="b", layers="1", layers_a="1"), "--layers"),
    (dict(acts_a="a", acts_b="b", svcca_keep=1.5), "--svcca-keep"),
])
def test_config_is_validated(flags, field):
    with pytest.raises(MmkitError) as err:
        config(**flags)
    assert err.value.field == field


# --------------------------------------------------------------------------- tiny text encoders


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> str:
    return write_texts(tmp_path_factory.mktemp("texts") / "texts.jsonl")


@pytest.fixture(scope="module")
def bert_copy(tiny_bert, tmp_path_factory) -> str:
    """The same weights under another path: two separate loads, two forward passes."""
    return str(shutil.copytree(tiny_bert, tmp_path_factory.mktemp("copy") / "bert"))


def test_tiny_bert_against_its_copy_matches_layer_by_layer(tmp_path, tiny_bert, bert_copy, texts):
    cfg = config(model_a=tiny_bert, model_b=bert_copy, data=texts)
    acts = BENCHMARK.load(cfg)
    assert list(acts.a) == [0, 1, 2] and acts.unit == "token"
    for layer in (0, 1, 2):
        np.testing.assert_allclose(acts.a[layer], acts.b[layer], atol=1e-5)
    res = run(cfg, str(tmp_path / "run"))
    assert res["models"]["model_a"]["id"] == tiny_bert and res["models"]["model_b"]["layers"] == [0, 1, 2]
    n = res["counts"]["samples"]
    assert res["counts"]["records"] == 40 and n == sum(len(a) for a in acts.a.values()) // 3 > 33
    for p in res["metrics"]["pairs"]:
        if p["layer_a"] == p["layer_b"]:
            assert p["svcca"] == pytest.approx(1.0, abs=1e-4) and p["cka"] == pytest.approx(1.0, abs=1e-6)
            assert p["pwcca"] == pytest.approx(1.0, abs=1e-3)
            # LayerNorm (gain 1, bias 0 in the random model) leaves every centred hidden state in a
            # (d - 1)-dimensional subspace; the spec's mean over all k = d correlations counts that
            # null direction as rho 0, so plain CCA is rank / d here.
            x = acts.a[p["layer_a"]].astype(np.float64)
            rank = np.linalg.matrix_rank(x - x.mean(0), tol=1e-4 * np.linalg.norm(x - x.mean(0), 2))
            assert rank == 31 and p["cca"] == pytest.approx(rank / 32, abs=1e-3)


def test_same_model_twice_runs_once_and_cls_unit_gives_one_row_per_record(tmp_path, tiny_bert, texts, monkeypatch):
    calls = []
    original = S.hidden_states

    def counting(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(S, "hidden_states", counting)
    res = run(config(model_a=tiny_bert, model_b=tiny_bert, data=texts, unit="cls", layers_a="2",
                     layers_b="0,1", text_pair_field="other"), str(tmp_path / "run"))
    assert calls == [[0, 1, 2]]  # one pass for the union of both sides' layers
    assert res["counts"]["samples"] == 40 and res["unit"] == "cls"
    to_emb, to_one = res["metrics"]["pairs"]
    assert (to_emb["layer_a"], to_emb["layer_b"], to_one["layer_b"]) == (2, 0, 1)
    # the CLS row of the embeddings (layer 0) is the same for every text: undefined, null, warned
    assert all(to_emb[m] is None for m in ("cca", "svcca", "pwcca", "cka"))
    assert res["warnings"] == ["layer 0 of B is constant over the samples; its scores are null"]
    assert all(0 <= to_one[m] <= 1 for m in ("cca", "svcca", "pwcca", "cka"))


def test_models_with_different_tokenizers_cannot_compare_tokens(tmp_path, tiny_bert, tiny_causal_lm, texts):
    with pytest.raises(MmkitError) as err:
        run(config(model_a=tiny_bert, model_b=tiny_causal_lm, data=texts), str(tmp_path / "run"))
    assert str(err.value).startswith(f"{texts}:1: --unit: unit token needs one tokenizer for both models")
    assert not (tmp_path / "run").exists()
    res = run(config(model_a=tiny_bert, model_b=tiny_causal_lm, data=texts, unit="mean", metrics="cka"),
              str(tmp_path / "mean"))
    assert len(res["metrics"]["pairs"]) == 9 and res["counts"]["samples"] == 40


def test_model_mistakes(tmp_path, tiny_bert, texts):
    with pytest.raises(MmkitError, match="--layers: no layer '3'.*has layers 0..2"):
        run(config(model_a=tiny_bert, model_b=tiny_bert, data=texts, layers="0,3"), str(tmp_path / "a"))
    with pytest.raises(MmkitError) as err:  # checked before any forward pass
        run(config(model_a=tiny_bert, model_b=tiny_bert, data=texts, unit="cls", max_samples=20), str(tmp_path / "b"))
    assert str(err.value) == (f"{texts}: --data: CCA needs more samples than features: N=20, d=32; give at least "
                              "33 samples (160 or more recommended); raise --max-samples above 20")
    with pytest.raises(MmkitError, match="txt: missing field"):
        run(config(model_a=tiny_bert, model_b=tiny_bert, data=texts, text_field="txt"), str(tmp_path / "c"))
    assert not any(tmp_path.iterdir())
