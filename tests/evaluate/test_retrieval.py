"""Tests of mmkit/evaluate/retrieval.py (the CLI runs are in tests/cli/test_evaluate_retrieval.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from mmkit.core.ranking import Relevance, retrieval_metrics
from mmkit.errors import MmkitError
from mmkit.evaluate import BENCHMARKS, Benchmark, check_capability, get_benchmark, hooks
from mmkit.evaluate.retrieval import (RetrievalConfig, aggregate, load_embeddings, model_slug, run)

COLORS = ["red", "blue", "green", "yellow", "white", "black", "pink", "purple", "brown", "gray"]


def write_image_set(root: Path, n_images: int, captions_per_image=(2,)) -> Path:
    """Generated images (a solid colour with a black square or a white circle) and a JSONL of
    ``{image, captions}`` with relative paths; image i gets ``captions_per_image[i % len]`` captions."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        color, shape = COLORS[i % len(COLORS)], ("circle", "square")[i // len(COLORS) % 2]
        image = Image.new("RGB", (40, 40), color)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse((8, 8, 30, 30), fill="white")
        else:
            draw.rectangle((8, 8, 30, 30), fill="black")
        image.save(root / "img" / f"{i}.png")
        pool = [f"a {color} picture with a {shape}", f"a {shape} on {color}", f"{color} {shape} image",
                f"the {shape} is {color}", f"a photo of a {color} {shape}"]
        lines.append({"image": f"img/{i}.png", "captions": pool[:captions_per_image[i % len(captions_per_image)]]})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_embeddings(path: Path, **tensors) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_retrieval_is_registered_with_load_and_score_only():
    assert "retrieval" in BENCHMARKS
    bench = get_benchmark("retrieval")
    assert isinstance(bench, Benchmark)
    assert hooks(bench) == ["load", "score"] and bench.needs == "embed"
    with pytest.raises(MmkitError, match="unknown benchmark 'retreival'.*did you mean 'retrieval'"):
        get_benchmark("retreival")


def test_capability_mismatch_names_model_and_offers():
    from transformers import CLIPConfig, LlavaConfig, ViltConfig

    bench = get_benchmark("retrieval")
    check_capability(bench, "clip", CLIPConfig())
    with pytest.raises(MmkitError, match=r"retrieval needs an embed model; v \(ViltForImageAndTextRetrieval\) "
                                         r"offers: itm"):
        check_capability(bench, "v", ViltConfig(architectures=["ViltForImageAndTextRetrieval"]))
    with pytest.raises(MmkitError, match="offers: generate"):
        check_capability(bench, "l", LlavaConfig(architectures=["LlavaForConditionalGeneration"]))


def test_embeddings_file_scores_like_the_matrix(tmp_path):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 8, generator=g), torch.randn(36, 8, generator=g)
    t2i = torch.arange(36) // 3
    pre = load_embeddings(str(write_embeddings(tmp_path / "e.safetensors", image_embeds=img, text_embeds=txt,
                                               text_to_image=t2i)))
    sims = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    rel = Relevance.build(t2i, 12)
    assert retrieval_metrics(pre.scores, pre.relevance) == pytest.approx(retrieval_metrics(sims, rel))
    assert pre.kind == "embeddings" and pre.data["n"] == 12 and pre.data["n_captions"] == 36
    pre = load_embeddings(str(write_embeddings(tmp_path / "s.safetensors", sims=sims, text_to_image=t2i)))
    assert pre.kind == "sims" and retrieval_metrics(pre.scores, pre.relevance) == retrieval_metrics(sims, rel)


def test_embeddings_file_with_group_relevance(tmp_path):
    # 4 images in 2 groups; each caption is relevant to both images of its group
    sims = torch.tensor([[.9, .1, .2, .3],
                         [.8, .7, .6, .5],
                         [.1, .2, .3, .4],
                         [.4, .9, .2, .1]])
    path = write_embeddings(tmp_path / "g.safetensors", sims=sims, text_to_image=torch.tensor([0, 1, 2, 3]),
                            image_group=torch.tensor([0, 0, 1, 1]), text_group=torch.tensor([0, 0, 1, 1]))
    pre = load_embeddings(str(path))
    m = retrieval_metrics(pre.scores, pre.relevance, ks=(1, 2))
    # i2t: image 0 -> caption 0 first (group 0): hit; image 1 -> caption 0: hit;
    #      image 2 -> caption 3 (group 1): hit; image 3 -> caption 1 (.9, group 0) then caption 0 (.4) then 2: rank 2
    assert m["i2t_r1"] == 75.0 and m["i2t_r2"] == 75.0
    # t2i: caption 0 -> image 0 hit; caption 1 -> image 3 (.9, group 1) then image 1: rank 1;
    #      caption 2 -> image 1 (.6) then image 2 (.3): rank 1; caption 3 -> image 1 (.5), image 2 (.4): rank 1
    assert m["t2i_r1"] == 25.0 and m["t2i_r2"] == 100.0


@pytest.mark.parametrize("tensors, field, message", [
    (dict(image_embeds=torch.zeros(3, 4), text_embeds=torch.zeros(3, 5), text_to_image=torch.arange(3)),
     "text_embeds", "has width 5, image_embeds width 4"),
    (dict(sims=torch.zeros(3, 3), text_to_image=torch.tensor([0, 1, 3])),
     "text_to_image", "entry 2 is 3, expected 0 <= value < 3"),
    (dict(sims=torch.zeros(3, 3), text_to_image=torch.tensor([0, 1])),
     "text_to_image", "has shape [2], expected [3]"),
    (dict(sims=torch.zeros(3, 3)), "text_to_image", "missing"),
    (dict(sims=torch.zeros(2, 2), image_embeds=torch.zeros(2, 2), text_embeds=torch.zeros(2, 2),
          text_to_image=torch.arange(2)), "sims", "holds both"),
    (dict(image_embeds=torch.zeros(2, 2), text_to_image=torch.arange(2)), "text_embeds", "missing"),
    (dict(sims=torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), text_to_image=torch.arange(2)), "sims", "NaN"),
    (dict(sims=torch.zeros(2, 2), text_to_image=torch.arange(2), image_group=torch.arange(2)),
     "text_group", "give both or neither"),
])
def test_bad_embeddings_files_are_one_line_errors(tmp_path, tensors, field, message):
    path = write_embeddings(tmp_path / "bad.safetensors", **tensors)
    with pytest.raises(MmkitError) as err:
        load_embeddings(str(path))
    text = str(err.value)
    assert text.startswith(f"{path}: {field}: ") and message in text and "\n" not in text


def test_config_validation():
    from mmkit.config import load_config

    ok = load_config(RetrievalConfig, flags={"embeddings": "x.safetensors", "recall_k": "20,5"})
    assert ok.ks == [1, 5, 10, 20] and ok.resolved_protocol == "full"
    assert load_config(RetrievalConfig, flags={"embeddings": "x", "dataset": "coco"}).resolved_protocol == "both"
    assert load_config(RetrievalConfig, flags={"embeddings": "x", "protocol": "5k"}).resolved_protocol == "full"
    assert load_config(RetrievalConfig, flags={"embeddings": "x", "rerank_k": "all"}).rerank_k == "all"
    for flags, field in [({"embeddings": "x", "data": "d"}, "--embeddings"),
                         ({}, "--data"),
                         ({"data": "d"}, "--model"),
                         ({"embeddings": "x", "rerank_k": "0"}, "--rerank-k"),
                         ({"embeddings": "x", "recall_k": "0"}, "--recall-k"),
                         ({"embeddings": "x", "rerank_model": "m"}, "--rerank-model")]:
        with pytest.raises(MmkitError, match=field):
            load_config(RetrievalConfig, flags=flags)


def test_aggregate_mean_sample_std_min_max():
    runs = [{"rsum": 300.0, "i2t_r1": 40.0, "coco_1k": {"rsum": 400.0, "folds": [{"rsum": 1.0}]}},
            {"rsum": 330.0, "i2t_r1": 50.0, "coco_1k": {"rsum": 430.0, "folds": []}},
            {"rsum": 360.0, "i2t_r1": None, "coco_1k": {"rsum": 460.0, "folds": []}}]
    stats = aggregate(runs)
    assert stats["rsum"] == {"n": 3, "mean": 330.0, "std": 30.0, "min": 300.0, "max": 360.0}
    assert stats["coco_1k.rsum"]["mean"] == 430.0 and stats["coco_1k.rsum"]["std"] == 30.0
    assert stats["i2t_r1"]["n"] == 2 and stats["i2t_r1"]["std"] == pytest.approx(7.0710678)  # null is skipped
    assert aggregate(runs[:1])["rsum"]["std"] is None  # n < 2
    assert not any(key.startswith("coco_1k.folds") for key in stats)


def test_model_slug():
    assert model_slug("openai/clip-vit-base-patch32") == "openai__clip-vit-base-patch32"
    assert model_slug("runs/s1/ckpt@v2") == "runs__s1__ckpt-v2"


def test_run_with_embeddings_writes_results(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = write_embeddings(tmp_path / "e.safetensors", image_embeds=torch.randn(20, 4, generator=g),
                            text_embeds=torch.randn(40, 4, generator=g), text_to_image=torch.arange(40) // 2)
    cfg = RetrievalConfig(embeddings=str(path), dataset="coco", fold_size=10, save_topk=2)
    results = run(cfg, str(tmp_path / "run"))
    m = results["metrics"]
    assert len(m["coco_1k"]["folds"]) == 2 and m["rsum"] == pytest.approx(
        sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[0])["uid"] == "i2t/0" and len(json.loads(lines[0])["topk"]) == 2
    again = run(replace(cfg, save_topk=0), str(tmp_path / "run"))  # same --out: resumes, same numbers
    assert again["metrics"] == m


def test_itm_pair_scorer_matches_the_models_forward(tmp_path, tiny_vilt, tiny_blip_itm):
    from mmkit.core.data import load_image
    from mmkit.core.imagetext import load_image_text
    from mmkit.core.itm import itm_scorer
    from mmkit.core.models import load_model
    from mmkit.evaluate.retrieval import ItmPairScorer

    ds = load_image_text(str(write_image_set(tmp_path, 4, (1, 3))))
    images, texts = torch.tensor([0, 0, 1, 3, 3]), torch.tensor([0, 2, 7, 1, 4])
    for path in (tiny_vilt, tiny_blip_itm):
        lm = load_model(path, "itm")
        score_fn = ItmPairScorer(itm_scorer(lm.model, lm.preprocessor, score="prob"), ds.images, ds.captions,
                                 image_batch=2, max_length=40)
        got = torch.cat([score_fn(images[:3], texts[:3]), score_fn(images[3:], texts[3:])])
        enc = lm.preprocessor(images=[load_image(ds.images[i]) for i in images],
                              text=[ds.captions[t] for t in texts], return_tensors="pt", padding=True)
        with torch.no_grad():
            if lm.model.config.model_type == "vilt":
                want = lm.model(**enc).logits[:, 0]
            else:
                want = lm.model(**enc, use_itm_head=True).itm_score.softmax(-1)[:, 1]
        assert torch.allclose(got, want, atol=1e-5)
        assert 0 not in score_fn.cache  # encodings of images already passed are dropped
