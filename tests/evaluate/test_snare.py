"""Tests of mmkit/evaluate/snare.py (evaluate.md §5, §9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmkit.core.backends import BackendConfig, word_token_ids
from mmkit.core.seeding import stable_seed
from mmkit.errors import DataError, MmkitError
from mmkit.evaluate import get_benchmark
from mmkit.evaluate.snare import (BENCHMARK, CHOICE_PROMPT, YESNO_PROMPT, SnareConfig, answer_ranks, choice_order,
                                  load, parse, parse_choice, parse_yes_no, prompt, score, score_direct, yesno_margin)

#: build.md §4 probes (correct caption first); images are generated in ``write_probes``.
PROBES = [
    {"id": "relationship_composition/0", "task": "relationship_composition", "subtask": "eating",
     "image": "img/0.png", "bbox": [4, 6, 30, 20],
     "captions": ["the horse is eating the grass", "the grass is eating the horse", "the horse and the grass"],
     "option_labels": ["correct", "exchange", "and"], "answer": 0, "source": {"dataset": "vg_relation", "index": 0}},
    {"id": "negation_logic/1", "task": "negation_logic", "subtask": "paved_white", "image": "img/1.png", "bbox": None,
     "captions": ["the road is paved and the house is white", "the road is not paved and the house is not white"],
     "option_labels": ["correct", "negative"], "answer": 0, "source": {"dataset": "vg_attribution", "index": 1}},
    {"id": "attribute_ownership/2", "task": "attribute_ownership", "subtask": "paved_white", "image": "img/1.png",
     "bbox": [0, 0, 20, 40],
     "captions": ["the paved road and the white house", "the white road and the paved house",
                  "the road and the house are paved and white respectively"],
     "option_labels": ["correct", "exchange", "separate"], "answer": 0,
     "source": {"dataset": "vg_attribution", "index": 2}},
]


def write_probes(root: Path, probes=PROBES) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(("red", "blue")):
        image = Image.new("RGB", (48, 40), color)
        ImageDraw.Draw(image).rectangle((10, 10, 30, 30), fill="white")
        image.save(root / "img" / f"{i}.png")
    path = root / "probes.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probes), encoding="utf-8")
    return path


def probe(pid: str, task: str, subtask: str, n: int) -> dict:
    labels = ["correct", "exchange", "and", "other"][:n]
    return {"id": pid, "task": task, "subtask": subtask, "image": "img/0.png", "bbox": None,
            "captions": [f"{pid} caption {j}" for j in range(n)], "option_labels": labels, "answer": 0,
            "source": {"dataset": "t", "index": 0}}


def scores_line(*scores: float) -> dict:
    return {"prediction": "", "scores": list(scores), "error": None}


def cfg_for(path: Path, **kwargs) -> SnareConfig:
    return SnareConfig(data=str(path), predictions="answers.jsonl", **kwargs)  # predictions: no model needed


# --------------------------------------------------------------------------- metrics from scores


def test_scores_give_accuracy_top2_and_winners(tmp_path):
    probes = [probe(f"p{i}", "relationship_composition", "on", 3) for i in range(4)]
    data = load(cfg_for(write_probes(tmp_path, probes)))
    answers = {"p0": scores_line(0.9, 0.1, 0.2),   # rank 1
               "p1": scores_line(0.5, 0.7, 0.1),   # rank 2, exchange wins
               "p2": scores_line(0.1, 0.3, 0.9),   # rank 3, and wins
               "p3": scores_line(0.6, 0.2, 0.4)}   # rank 1
    out = score(data, answers, cfg_for(tmp_path))
    block = out["per_category"]["relationship_composition"]
    assert block["accuracy"] == 50.0 and block["top2_accuracy"] == 75.0 and "top3_accuracy" not in block
    assert block["winners"] == {"correct": 50.0, "exchange": 25.0, "and": 25.0}
    assert (block["n"], block["n_ties"], block["n_unparsed"], block["n_failed"]) == (4, 0, 0, 0)
    assert out["metrics"]["accuracy"] == 50.0 and out["metrics"]["relationship_composition_accuracy"] == 50.0
    assert out["scoring"] == {"route": "choice", "tie_policy": "strict"}


def test_top_tie_is_wrong_under_strict_and_right_under_reference(tmp_path):
    probes = [probe("t0", "negation_logic", "a_b", 2), probe("t1", "spatial_relationship", "on", 4)]
    data = load(cfg_for(write_probes(tmp_path, probes)))
    answers = {"t0": scores_line(0.5, 0.5), "t1": scores_line(0.3, 0.3, 0.3, 0.1)}
    strict = score(data, answers, cfg_for(tmp_path))
    reference = score(data, answers, cfg_for(tmp_path, tie_policy="reference"))
    assert strict["metrics"]["accuracy"] == 0.0 and strict["metrics"]["n_ties"] == 2
    assert reference["metrics"]["accuracy"] == 100.0 and reference["metrics"]["n_ties"] == 2
    spatial = strict["per_category"]["spatial_relationship"]
    assert (spatial["top2_accuracy"], spatial["top3_accuracy"]) == (0.0, 100.0)  # strict rank 3 of 4
    assert spatial["winners"] == {"tie": 100.0}


def test_answer_ranks_vectorised():
    s = np.array([[0.9, 0.1, 0.9], [0.2, 0.5, 0.5], [0.4, 0.4, 0.1]])
    assert answer_ranks(s, np.array([0, 2, 1]), "strict").tolist() == [2, 2, 2]
    assert answer_ranks(s, np.array([0, 2, 1]), "reference").tolist() == [1, 2, 2]


def test_subtasks_under_min_group_size_are_pooled(tmp_path):
    probes = ([probe(f"a{i}", "relationship_composition", "on", 3) for i in range(3)]
              + [probe("b0", "relationship_composition", "under", 3), probe("c0", "relationship_composition", "in", 3)])
    data = load(cfg_for(write_probes(tmp_path, probes)))
    answers = {p["id"]: scores_line(1, 0, 0) for p in probes} | {"c0": scores_line(0, 1, 0)}
    block = score(data, answers, cfg_for(tmp_path, min_group_size=3))["per_category"]["relationship_composition"]
    assert list(block["subtasks"]) == ["on", "other"]
    assert block["subtasks"]["on"]["n"] == 3 and block["subtasks"]["other"]["accuracy"] == 50.0


def test_degenerate_probes_are_excluded_and_counted(tmp_path):
    bad = {**probe("d0", "negation_logic", "a_b", 2), "captions": ["same words", "same words"]}
    path = write_probes(tmp_path, [probe("ok", "negation_logic", "a_b", 2), bad])
    data = load(cfg_for(path))
    assert [p.id for p in data.records] == ["ok"]
    assert data.anomalies[0]["kind"] == "degenerate" and data.anomalies[0]["uid"] == "d0"
    assert data.anomalies[0]["line"] == 2
    out = score(data, {"ok": scores_line(1, 0)}, cfg_for(path))
    assert out["metrics"]["n_degenerate"] == 1 and out["metrics"]["n"] == 1


@pytest.mark.parametrize("change, field, message", [
    ({"option_labels": ["correct"]}, "option_labels", "as many labels as captions"),
    ({"captions": ["only one"], "option_labels": ["correct"]}, "option_labels", "at least 2"),
    ({"answer": 3}, "answer", "caption index 0..2"),
    ({"bbox": [0, 0, 0, 5]}, "bbox", "w, h > 0"),
    ({"image": "img/none.png"}, "image", "image file not found"),
    ({"captions": ["a", 3, "c"]}, "captions[1]", "expected a string"),
])
def test_bad_probes_name_line_and_field(tmp_path, change, field, message):
    path = write_probes(tmp_path, [PROBES[1], {**PROBES[0], **change}])
    with pytest.raises(DataError, match=message) as err:
        load(cfg_for(path))
    assert (err.value.line, err.value.field) == (2, field)


# --------------------------------------------------------------------------- yes/no route


@pytest.mark.parametrize("text, value", [("Yes.", 1), ("No, it is not", 0), ("not sure", -1),
                                         ("I don't know", -1), ("  YES", 1), ("", -1), ("Nope", -1)])
def test_yes_no_first_word(text, value):
    assert parse_yes_no(text) == value


def test_yes_set_of_a_vocabulary():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"yes": 0, "Yes": 1, "YES": 2, "yes,": 3, "no": 4, "[UNK]": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert word_token_ids(tokenizer, "yes") == [0, 1, 2]
    assert word_token_ids(tokenizer, "no") == [4]


def test_yesno_margin():
    assert yesno_margin({"yes": -0.5, "no": -2.0}) == pytest.approx(1.5)
    assert yesno_margin({"yes": None, "no": -1.0}) == -np.inf
    assert yesno_margin({"yes": None, "no": None}) is None and yesno_margin(None) is None


def test_yesno_requests_and_scores(tmp_path):
    path = write_probes(tmp_path)
    cfg = cfg_for(path, score="yesno")
    data = load(cfg)
    assert data.route == "yesno"
    requests = prompt(data, cfg)
    assert len(requests) == 8 and requests[0].uid == "relationship_composition/0#0"
    assert requests[1].text == f"{YESNO_PROMPT}\nthe grass is eating the horse"
    assert requests[0].images == ({"path": str(tmp_path / "img/0.png"), "bbox": [4, 6, 30, 20]},)
    assert requests[3].images == (str(tmp_path / "img/1.png"),)  # no bbox: the path
    assert requests[0].logprob_words == ("yes", "no") and requests[0].extras["label"] == "correct"
    assert parse("Yes, it does.", requests[0]) == "yes" and parse("maybe", requests[0]) is None
    texts = {"relationship_composition/0": ["Yes", "No", "no"],       # correct
             "negation_logic/1": ["yes", "yes"],                       # tie: wrong under strict
             "attribute_ownership/2": ["not sure", "yes", "no"]}       # unparsed -1 < 1: wrong
    answers = {f"{pid}#{j}": {"prediction": t, "error": None} for pid, ts in texts.items() for j, t in enumerate(ts)}
    out = score(data, answers, cfg)
    m = out["metrics"]
    assert m["accuracy"] == pytest.approx(100 / 3) and m["n_ties"] == 1 and m["n_unparsed"] == 1
    assert out["per_category"]["negation_logic"]["acceptance"] == {"correct": 100.0, "negative": 100.0}
    assert out["per_category"]["relationship_composition"]["winners"] == {"correct": 100.0}
    # first-token log-probs, when every caption has them, replace the words
    answers["negation_logic/1#0"]["logprobs"] = {"yes": -0.1, "no": -3.0}
    answers["negation_logic/1#1"]["logprobs"] = {"yes": -0.7, "no": -0.9}
    assert score(data, answers, cfg)["per_category"]["negation_logic"]["accuracy"] == 100.0
    # an errored caption answer makes its probe wrong
    answers["relationship_composition/0#2"]["error"] = "timeout"
    failed = score(data, answers, cfg)["per_category"]["relationship_composition"]
    assert failed["accuracy"] == 0.0 and failed["n_failed"] == 1 and failed["winners"] == {"failed": 100.0}


# --------------------------------------------------------------------------- choice route


def test_choice_permutation_is_drawn_from_stable_seed(tmp_path):
    path = write_probes(tmp_path)
    cfg = cfg_for(path, score="choice", seed=7)
    data = load(cfg)
    requests = prompt(data, cfg)
    for p, r in zip(data.records, requests):
        expected = np.random.Generator(np.random.PCG64(stable_seed(7, p.id))).permutation(len(p.captions)).tolist()
        assert r.extras["order"] == expected == choice_order(7, p.id, len(p.captions))
        assert r.text == CHOICE_PROMPT + "\n" + "\n".join(f"{j}. {p.captions[i]}" for j, i in enumerate(expected))
        assert r.uid == p.id


def test_choice_answers_map_back_through_the_permutation(tmp_path):
    path = write_probes(tmp_path)
    cfg = cfg_for(path, score="choice", seed=3)
    data = load(cfg)
    pos = {p.id: choice_order(3, p.id, len(p.captions)).index(0) for p in data.records}  # where caption 0 sits
    wrong = (pos["negation_logic/1"] + 1) % 2
    answers = {"relationship_composition/0": {"prediction": f"Option {pos['relationship_composition/0']}.",
                                              "error": None},
               "negation_logic/1": {"prediction": f"{wrong}", "error": None},
               "attribute_ownership/2": {"prediction": "none of them", "error": None}}
    out = score(data, answers, cfg)
    assert out["metrics"]["accuracy"] == pytest.approx(100 / 3) and out["metrics"]["n_unparsed"] == 1
    assert out["per_category"]["negation_logic"]["winners"] == {"negative": 100.0}
    assert out["per_category"]["negation_logic"]["positions"] == {str(wrong): 100.0}
    assert out["per_category"]["attribute_ownership"]["positions"] == {"unparsed": 100.0}
    assert "top2_accuracy" not in out["per_category"]["attribute_ownership"]
    assert parse_choice("I pick 7, no: 2", 3) == 2 and parse_choice("12", 3) is None


def test_scores_lines_must_match_the_captions(tmp_path):
    path = write_probes(tmp_path)
    data = load(cfg_for(path, score="cosine"))
    with pytest.raises(DataError, match="expected scores = 2 numbers"):
        score(data, {"negation_logic/1": scores_line(1.0)}, cfg_for(path, score="cosine"))
    with pytest.raises(DataError, match="the cosine route needs scores"):
        score(data, {"negation_logic/1": {"prediction": "0", "error": None}}, cfg_for(path, score="cosine"))


# --------------------------------------------------------------------------- tiny models


def model_cfg(path: Path, model: str, **kwargs) -> SnareConfig:
    return SnareConfig(data=str(path), backend=BackendConfig(model=[model], device="cpu"), **kwargs)


def test_default_route_by_model_kind(tmp_path, tiny_clip, tiny_blip_itm, tiny_llava):
    path = write_probes(tmp_path)
    assert load(model_cfg(path, tiny_clip)).route == "cosine"
    assert load(model_cfg(path, tiny_blip_itm)).route == "itm"
    assert load(model_cfg(path, tiny_llava)).route == "yesno"
    assert load(SnareConfig(data=str(path), backend=BackendConfig(base_url="http://127.0.0.1:1/v1"))).route == "yesno"
    with pytest.raises(MmkitError, match="needs a local model"):
        load(SnareConfig(data=str(path), score="itm", backend=BackendConfig(base_url="http://127.0.0.1:1/v1")))


def test_tiny_clip_cosine_on_three_probes(tmp_path, tiny_clip):
    import torch

    from mmkit.core.models import load_model
    from mmkit.evaluate.snare import cosine_scores

    path = write_probes(tmp_path)
    cfg = model_cfg(path, tiny_clip)
    data = load(cfg)
    out = score_direct(data, cfg)
    assert out["metrics"]["n"] == 3 and set(out["per_category"]) == {p["task"] for p in PROBES}
    assert out["models"]["model"]["class"] == "CLIPModel" and out["scoring"]["route"] == "cosine"
    # the first probe's scores equal CLIP on the bbox crop, computed by hand
    scores, _ = cosine_scores(data.records[:1], tiny_clip, cfg)
    lm = load_model(tiny_clip, "dual-encoder", device="cpu")
    crop = Image.open(tmp_path / "img/0.png").convert("RGB").crop((4, 6, 34, 26))
    with torch.inference_mode():
        img = lm.model.get_image_features(**lm.preprocessor(images=[crop], return_tensors="pt")).pooler_output
        txt = lm.model.get_text_features(**lm.preprocessor.tokenizer(list(PROBES[0]["captions"]), padding=True,
                                                                     return_tensors="pt")).pooler_output
    expected = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=-1)[0]
    assert np.allclose(scores[0], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_blip_itm", "tiny_vilt"])
def test_tiny_itm_models(tmp_path, request, fixture):
    path = write_probes(tmp_path)
    cfg = model_cfg(path, request.getfixturevalue(fixture), score="itm")
    out = score_direct(load(cfg), cfg)
    assert out["metrics"]["n"] == 3 and out["scoring"] == {"route": "itm", "tie_policy": "strict"}
    assert out["per_category"]["relationship_composition"]["n"] == 1


def test_generation_routes_are_not_direct(tmp_path, tiny_clip):
    path = write_probes(tmp_path)
    assert score_direct(load(model_cfg(path, tiny_clip, score="yesno")), model_cfg(path, tiny_clip)) is None
    cfg = cfg_for(path, score="cosine")
    assert score_direct(load(cfg), cfg) is None  # a predictions file carries the scores


def test_runner_with_tiny_clip_and_a_scores_file(tmp_path, tiny_clip):
    from mmkit.evaluate.run import evaluate

    assert get_benchmark("snare") is BENCHMARK
    path = write_probes(tmp_path)
    results = evaluate("snare", model_cfg(path, tiny_clip), out=str(tmp_path / "run"))
    assert results["method"] == "snare" and results["complete"] is True and results["metrics"]["n"] == 3
    assert results["models"]["model"]["class"] == "CLIPModel" and results["scoring"]["route"] == "cosine"
    preds = tmp_path / "scores.jsonl"
    preds.write_text("".join(json.dumps({"uid": p["id"], "scores": [1.0] + [0.0] * (len(p["captions"]) - 1)}) + "\n"
                             for p in PROBES), encoding="utf-8")
    from_file = evaluate("snare", SnareConfig(data=str(path), predictions=str(preds), score="cosine"),
                         out=str(tmp_path / "run-file"))
    assert from_file["metrics"]["accuracy"] == 100.0 and from_file["metrics"]["macro_accuracy"] == 100.0


def test_cosine_route_with_itm_models(tmp_path, tiny_blip_itm, tiny_vilt):
    """BLIP scores cosine with its own contrastive head; ViLT has none (a one-line capability error)."""
    path = write_probes(tmp_path)
    cfg = model_cfg(path, tiny_blip_itm, score="cosine")
    out = score_direct(load(cfg), cfg)
    assert out["metrics"]["n"] == 3 and out["models"]["model"]["class"] == "BlipForImageTextRetrieval"
    cfg = model_cfg(path, tiny_vilt, score="cosine")
    with pytest.raises(MmkitError, match="snare needs an embed model; .* offers: itm"):
        score_direct(load(cfg), cfg)
