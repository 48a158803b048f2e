"""End-to-end tests of `mmkit evaluate retrieval` (mmkit/cli/evaluate.py, mmkit/evaluate/retrieval.py).

Tiny random models (tests/conftest.py) on generated images: these check plumbing and the
metrics against an independent computation on the same embeddings, never model quality.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mmkit.cli import build_app
from tests.evaluate.test_retrieval import write_image_set

runner = CliRunner()
RECALL_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
RANK_KEYS = {"i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"}


def invoke(*args: str):
    return runner.invoke(build_app(), ["evaluate", "retrieval", *args])


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """20 generated images with 1, 2 or 3 captions each (39 captions)."""
    return write_image_set(tmp_path_factory.mktemp("pairs"), 20, (1, 2, 3))


def naive_metrics(sims: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Recall@K from a full argsort of the dense matrix (tie-free random scores)."""
    relevant = torch.arange(sims.shape[0])[:, None] == text_to_image[None, :]
    out = {}
    for name, s, rel in (("i2t", sims, relevant), ("t2i", sims.T, relevant.T)):
        position = torch.argsort(torch.argsort(s, dim=1, descending=True), dim=1)
        best = position.masked_fill(~rel, s.shape[1]).min(1).values
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (best < k).double().mean().item()
    return out


def test_tiny_clip_end_to_end_both_coco_protocols(tmp_path, pairs, tiny_clip):
    from mmkit.core.embed import encode_images, encode_texts
    from mmkit.core.imagetext import load_image_text

    out = tmp_path / "run"
    args = ["--model", tiny_clip, "--data", str(pairs), "--dataset", "coco", "--captions-per-image", "all",
            "--set", "fold_size=10", "--save-topk", "3", "--out", str(out), "--json"]
    results = ok(invoke(*args))
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "results.json", "log.txt", "predictions.jsonl"}
    assert results["command"] == "evaluate retrieval" and results["method"] == "retrieval"
    assert results["counts"]["images"] == 20 and results["counts"]["captions"] == 39
    m = results["metrics"]
    assert RECALL_KEYS | RANK_KEYS <= set(m) and set(m["coco_1k"]) >= RECALL_KEYS | RANK_KEYS | {"folds"}
    assert len(m["coco_1k"]["folds"]) == 2
    for block in (m, m["coco_1k"], *m["coco_1k"]["folds"]):
        assert block["rsum"] == pytest.approx(sum(block[k] for k in RECALL_KEYS - {"rsum"}))
    # independent check: the same embeddings, ranked by a full argsort
    ds = load_image_text(str(pairs))
    sims = torch.from_numpy(encode_images(ds.images, tiny_clip)) @ torch.from_numpy(encode_texts(ds.captions, tiny_clip)).T
    want = naive_metrics(sims, torch.from_numpy(ds.text_to_image))
    assert {k: m[k] for k in want} == pytest.approx(want)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 20 + 39 and lines[20]["uid"] == "t2i/0" and len(lines[0]["topk"]) == 3
    assert results["models"]["model"]["class"] == "CLIPModel" and len(results["data"]["sha256"]) == 64
    again = ok(invoke(*args))  # rerun on the same --out: resumes from the embedding cache
    assert again["metrics"] == m and again["models"]["model"]["cache_hit"] == {"images": True, "texts": True}


@pytest.mark.parametrize("itm_fixture", ["tiny_vilt", "tiny_blip_itm"])
def test_rerank_with_an_itm_model(tmp_path, request, itm_fixture, tiny_clip):
    from mmkit.core.data import load_image
    from mmkit.core.imagetext import load_image_text
    from mmkit.core.models import load_model
    from mmkit.core.ranking import Relevance, retrieval_metrics

    itm_path = request.getfixturevalue(itm_fixture)
    pairs = write_image_set(tmp_path / "data", 10, (1, 2))
    common = ["--model", tiny_clip, "--data", str(pairs), "--rerank-model", itm_path, "--no-cache", "--json"]
    short = ok(invoke(*common, "--rerank-k", "3", "--out", str(tmp_path / "k3")))
    assert short["rerank"] == {"shortlist": [tiny_clip], "reranker": itm_path, "k": 3}
    assert short["models"]["rerank"]["id"] == itm_path
    every = ok(invoke(*common, "--rerank-k", "all", "--out", str(tmp_path / "all")))
    # rerank-k all = ranking the full ITM matrix, here from the model's own forward on every pair
    ds = load_image_text(str(pairs))
    lm = load_model(itm_path, "itm")
    image_idx, text_idx = torch.meshgrid(torch.arange(ds.n_images), torch.arange(ds.n_texts), indexing="ij")
    images = [load_image(p) for p in ds.images]
    enc = lm.preprocessor(images=[images[i] for i in image_idx.flatten()],
                          text=[ds.captions[t] for t in text_idx.flatten()], return_tensors="pt", padding=True)
    with torch.no_grad():  # one forward over every pair
        full = (lm.model(**enc).logits[:, 0] if itm_fixture == "tiny_vilt"
                else lm.model(**enc, use_itm_head=True).itm_score[:, 1]).view(image_idx.shape)  # the match logit
    want = retrieval_metrics(full, Relevance.build(ds.text_to_image, ds.n_images))
    assert every["metrics"] == pytest.approx(want)


def test_embeddings_and_predictions_alias_with_group_relevance(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "scores.safetensors"
    t2i = torch.arange(24) // 2
    save_file({"sims": torch.randn(12, 24, generator=g), "text_to_image": t2i,
               "image_group": torch.arange(12) % 3, "text_group": (torch.arange(12) % 3)[t2i]}, str(path))
    a = ok(invoke("--embeddings", str(path), "--out", str(tmp_path / "a"), "--json"))
    b = ok(invoke("--predictions", str(path), "--out", str(tmp_path / "b"), "--json"))
    assert a["metrics"] == b["metrics"] and RECALL_KEYS | RANK_KEYS == set(a["metrics"])
    assert a["data"]["path"] == str(path) and a["models"] == {}
    # 3 groups of 4 images: every caption has 4 relevant images in 12, so t2i R@10 is 100
    assert a["metrics"]["t2i_r10"] == 100.0


def test_ensemble_equals_the_mean_of_each_models_own_matrix(tmp_path, pairs, tiny_clip):
    from safetensors.torch import load_file

    from mmkit.core.embed import encode_images, encode_texts
    from mmkit.core.imagetext import load_image_text
    from mmkit.core.ranking import Relevance, retrieval_metrics

    other = tmp_path / "clip-b"
    shutil.copytree(tiny_clip, other)
    weights = load_file(str(other / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in weights.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    got = ok(invoke("--model", tiny_clip, "--ensemble", str(other), "--data", str(pairs),
                    "--out", str(tmp_path / "ens"), "--json"))
    ds = load_image_text(str(pairs))
    sims = [torch.from_numpy(encode_images(ds.images, m)) @ torch.from_numpy(encode_texts(ds.captions, m)).T
            for m in (tiny_clip, str(other))]  # torch's matmul, as the ranking uses: near-ties stay put
    assert not torch.allclose(sims[0], sims[1])
    want = retrieval_metrics((sims[0] + sims[1]) / 2, Relevance.build(ds.text_to_image, ds.n_images))
    assert got["metrics"] == want
    assert set(got["models"]) == {"model", "ensemble_1"}


def test_several_models_give_subfolders_and_an_aggregate(tmp_path, pairs, tiny_clip):
    models = []
    for name in ("seed-a", "seed-b", "seed-c"):
        shutil.copytree(tiny_clip, tmp_path / name)
        models += ["--model", str(tmp_path / name)]
    out = tmp_path / "multi"
    results = ok(invoke(*models, "--data", str(pairs), "--out", str(out), "--json"))
    subs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(subs) == 3 and all((out / s / "results.json").is_file() for s in subs)
    per_model = [json.loads((out / s / "results.json").read_text())["metrics"] for s in subs]
    agg = results["aggregate"]
    assert RECALL_KEYS | RANK_KEYS <= set(agg)
    rsums = [m["rsum"] for m in per_model]
    assert agg["rsum"]["n"] == 3 and agg["rsum"]["mean"] == pytest.approx(sum(rsums) / 3)
    assert agg["rsum"]["std"] == pytest.approx(0.0) and agg["rsum"]["min"] == min(rsums)  # same weights
    assert results["metrics"]["rsum"] == pytest.approx(agg["rsum"]["mean"])
    assert [r["model"] for r in results["runs"]] == [str(tmp_path / n) for n in ("seed-a", "seed-b", "seed-c")]


@pytest.fixture
def bad_inputs(tmp_path, pairs):
    missing = tmp_path / "missing.jsonl"
    lines = pairs.read_text().splitlines()
    lines[2] = json.dumps({"image": "img/nope.png", "captions": ["a red dog"]})
    missing.write_text("\n".join(lines) + "\n")
    (tmp_path / "img").symlink_to(pairs.parent / "img")
    out_of_range = tmp_path / "range.safetensors"
    save_file({"sims": torch.zeros(4, 4), "text_to_image": torch.tensor([0, 1, 2, 4])}, str(out_of_range))
    widths = tmp_path / "widths.safetensors"
    save_file({"image_embeds": torch.randn(4, 8), "text_embeds": torch.randn(4, 6),
               "text_to_image": torch.arange(4)}, str(widths))
    small = tmp_path / "small.safetensors"
    save_file({"sims": torch.randn(4, 8), "text_to_image": torch.arange(8) // 2}, str(small))
    return {"missing": missing, "range": out_of_range, "widths": widths, "small": small}


@pytest.mark.parametrize("case, args, expected", [
    ("missing", ["--data", "{missing}", "--model", "{clip}"], "{missing}:3: image: image file not found"),
    ("range", ["--embeddings", "{range}"], "{range}: text_to_image: entry 3 is 4, expected 0 <= value < 4"),
    ("widths", ["--embeddings", "{widths}"], "{widths}: text_embeds: has width 6, image_embeds width 8"),
    ("small", ["--embeddings", "{small}"], "--recall-k: K = 5 is larger than the gallery (4 items)"),
    ("config", ["--embeddings", "{small}", "--data", "{missing}"], "--embeddings: --embeddings and --data"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_run_folder(tmp_path, bad_inputs, tiny_clip, case, args, expected):
    fill = {k: str(v) for k, v in bad_inputs.items()} | {"clip": tiny_clip}
    out = tmp_path / "out"
    result = invoke(*[a.format(**fill) for a in args], "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {lines[0][7:]}"] and lines[0].startswith(f"error: {expected.format(**fill)}")
    assert "Traceback" not in result.output
    assert not out.exists()
