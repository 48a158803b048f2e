"""CHAIR and POPE (unlearn.md §5.1-5.4, §8.10-12; mmkit/evaluate/hallucination.py)."""

from __future__ import annotations

import json
import math

import pytest

from mmkit.errors import ConfigError, DataError
from mmkit.evaluate import get_benchmark
from mmkit.evaluate.hallucination import (CHAIR, CHAIR_PROMPT, POPE, ChairConfig, PopeConfig, build_pope,
                                          caption_quality, chair_scores, corpus_bleu, distinct_n, ground_truth,
                                          image_id_of, parse_yes_no, pope_metrics, pope_question, POPE_PARSERS)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not decoded by load")
    return str(folder)


def line(prediction, error=None):
    return {"prediction": prediction, "error": error}


# --------------------------------------------------------------------------- CHAIR maths

KNOWN = {
    "1": ({"person", "dog"}, "A man and his dogs sit on a bench next to a hot dog stand."),
    "2": ({"teddy bear", "bed"}, "A teddy bear lies on a bed beside a baby bird."),
    "3": ({"toilet"}, "The toilet seat is up."),
}


def test_chair_known_answer():
    warnings = []
    out = chair_scores({k: c for k, (_, c) in KNOWN.items()}, {k: gt for k, (gt, _) in KNOWN.items()},
                       warnings=warnings)
    assert (out["n_mentions"], out["n_hallucinated"], out["n_captions"], out["n_empty"]) == (8, 3, 3, 0)
    assert out["chair_i"] == pytest.approx(37.5)
    assert round(out["chair_s"], 2) == 66.67
    assert warnings == []
    rows = {r["image_id"]: r for r in out["per_caption"]}
    assert rows["1"]["mentions"] == [
        {"word": "man", "category": "person", "hallucinated": False},
        {"word": "dog", "category": "dog", "hallucinated": False},
        {"word": "bench", "category": "bench", "hallucinated": True},
        {"word": "hot dog", "category": "hot dog", "hallucinated": True}]
    assert [m["category"] for m in rows["2"]["mentions"]] == ["teddy bear", "bed", "bird"]
    assert rows["2"]["hallucinated"] and not rows["3"]["hallucinated"]
    assert out["per_category"]["bench"] == {"mentions": 1, "hallucinated": 1, "chair_i": 100.0}
    assert out["per_category"]["dog"] == {"mentions": 1, "hallucinated": 0, "chair_i": 0.0}


def test_chair_repeats_and_unique_mentions():
    gt = {"1": {"person"}}
    assert chair_scores({"1": "dogs dogs"}, gt)["n_hallucinated"] == 2
    unique = chair_scores({"1": "dogs dogs and a dog"}, gt, unique_mentions=True)
    assert (unique["n_mentions"], unique["n_hallucinated"], unique["chair_i"]) == (1, 1, 100.0)
    unique = chair_scores({"1": "a man, a cat, another man and a cat"}, gt, unique_mentions=True)
    assert [m["word"] for m in unique["per_caption"][0]["mentions"]] == ["man", "cat"]
    assert (unique["n_mentions"], unique["n_hallucinated"], unique["chair_i"]) == (2, 1, 50.0)
    assert chair_scores({"1": "train tracks"}, gt)["n_mentions"] == 0
    assert chair_scores({"1": "a passenger train"}, {"1": {"train"}})["n_hallucinated"] == 0


def test_chair_without_mentions_is_null_with_a_warning():
    warnings = []
    out = chair_scores({"1": "", "2": "blue sky"}, {"1": set(), "2": set()}, warnings=warnings)
    assert out["chair_i"] is None and out["chair_s"] == 0.0 and out["n_empty"] == 1
    assert len(warnings) == 1 and "chair_i" in warnings[0]
    empty = []
    assert chair_scores({}, {}, warnings=empty)["chair_s"] is None and len(empty) == 2


def test_chair_unknown_image_id_errors():
    with pytest.raises(DataError, match="no ground truth for image_id '9'"):
        chair_scores({"9": "a dog"}, {"1": {"dog"}})


def test_ground_truth_adds_objects_of_reference_captions():
    gt = ground_truth({"1": ["dog"], "2": []}, {"1": ["Two men and a puppy."], "3": ["A cell phone."]})
    assert gt == {"1": {"dog", "person"}, "2": set(), "3": {"cell phone"}}


# --------------------------------------------------------------------------- caption quality


def test_corpus_bleu_by_hand():
    # pair 1: "the cat sat on the mat" vs "the cat is on the mat": 1-grams 5/6, 2-grams 3/5
    # pair 2: "a dog runs" vs refs "a dog runs fast" (4) and "the dog runs" (3): 1-grams 3/3, 2-grams 2/2,
    # closest reference length 3 (ties go to the shorter); pooled: 8/9, 5/7, ref length 6 + 3 = hyp length 9.
    hyps = ["The cat sat on the mat.", "A dog runs"]
    refs = [["the cat is on the mat"], ["a dog runs fast", "the dog runs"]]
    assert corpus_bleu(hyps, refs, 1) == pytest.approx(100 * 8 / 9)
    assert corpus_bleu(hyps, refs, 2) == pytest.approx(100 * math.sqrt(8 / 9 * 5 / 7))
    # 4-grams: pair 1 has 3 hyp 4-grams, none matched; pair 2 none: BLEU-4 is 0 (no smoothing)
    assert corpus_bleu(hyps, refs, 4) == 0.0
    # a short hypothesis: brevity penalty exp(1 - 6/3)
    assert corpus_bleu(["the cat sat"], [["the cat sat on the mat"]], 1) == pytest.approx(100 * math.exp(1 - 2))


def test_caption_quality_and_distinct():
    captions = {"1": "a dog a dog", "2": "cat"}
    out = caption_quality(captions, {"1": ["a dog"]})
    assert out["mean_words"] == 2.5 and out["mean_chars"] == 7.0
    assert out["distinct1"] == pytest.approx(100 * (2 / 4 + 1 / 1) / 2)
    assert out["distinct2"] == pytest.approx(100 * 2 / 3)  # "cat" has no bigram
    assert out["bleu1"] == pytest.approx(100 * 2 / 4)  # 2 of 4 clipped; BP 1 (hyp longer)
    warnings = []
    assert caption_quality(captions, {}, warnings)["bleu4"] is None and "BLEU is null" in warnings[0]
    assert distinct_n(["one"], 2, warnings) is None and "distinct2" in warnings[-1]


# --------------------------------------------------------------------------- CHAIR data


def coco_dir(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    images = [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
              {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}]
    (ann / "instances_val2014.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 18, "name": "dog"}, {"id": 67, "name": "dining table"}],
        "annotations": [{"image_id": 42, "category_id": 18}, {"image_id": 42, "category_id": 18},
                        {"image_id": 7, "category_id": 67}]}))
    (ann / "captions_val2014.json").write_text(json.dumps({
        "images": images,
        "annotations": [{"image_id": 42, "caption": "A man walks his dog."},
                        {"image_id": 42, "caption": "A dog on a leash."},
                        {"image_id": 7, "caption": "A table with pizza."}]}))
    (ann / "person_keypoints_val2014.json").write_text("not read")
    return ann


def chair_setup(tmp_path):
    ann = coco_dir(tmp_path)
    imgs = touch_images(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg",
                                               "notes.txt"])
    return ann, imgs


def test_image_id_of():
    assert image_id_of("val2014/COCO_val2014_000000123456.jpg") == "123456"
    assert image_id_of("000000000000.png") == "0"
    assert image_id_of("cat.jpg") == "cat"


def test_chair_load_coco_annotations_and_score(tmp_path):
    ann, imgs = chair_setup(tmp_path)
    cfg = ChairConfig(annotations=str(ann), image_root=imgs)
    data = CHAIR.load(cfg)
    assert [r["image_id"] for r in data.records] == ["7", "42"]  # sorted file names
    assert data.ground_truth["42"] == {"dog", "person"} and data.ground_truth["7"] == {"dining table", "pizza"}
    assert data.references["42"] == ["A man walks his dog.", "A dog on a leash."]
    requests = CHAIR.prompt(data, cfg)
    assert requests[1].uid == "42" and requests[1].text == CHAIR_PROMPT
    assert requests[1].images == (str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"),)
    assert dict(requests[1].extras) == {"image_id": "42", "image": requests[1].images[0]}
    answers = {"42": line("A man walks his dog\nnext to a cat."), "7": line("", error="timeout")}
    out = CHAIR.score(data, answers, cfg)
    m = out["metrics"]
    assert (m["n_captions"], m["n_mentions"], m["n_hallucinated"]) == (1, 3, 1)
    assert m["chair_i"] == pytest.approx(100 / 3) and m["chair_s"] == 100.0
    assert m["bleu1"] is not None and m["mean_words"] == 9
    assert out["per_sample"] == [{"image_id": "42", "caption": "A man walks his dog next to a cat.",
                                  "mentions": [{"word": "man", "category": "person", "hallucinated": False},
                                               {"word": "dog", "category": "dog", "hallucinated": False},
                                               {"word": "cat", "category": "cat", "hallucinated": True}],
                                  "hallucinated": True}]
    assert any("1 of 2 requests failed" in w for w in out["warnings"])
    assert out["per_category"]["cat"]["hallucinated"] == 1


def test_chair_single_coco_file_and_user_gt_agree(tmp_path):
    ann, imgs = chair_setup(tmp_path)
    single = CHAIR.load(ChairConfig(annotations=str(ann / "instances_val2014.json"), image_root=imgs))
    assert single.ground_truth["42"] == {"dog"} and single.references == {}
    gt = write_jsonl(tmp_path / "gt.jsonl", [
        {"image_id": "42", "objects": ["dog"], "captions": ["A man walks his dog.", "A dog on a leash."]},
        {"image_id": 7, "objects": ["dining table"], "captions": ["A table with pizza."]}])
    coco = CHAIR.load(ChairConfig(annotations=str(ann), image_root=imgs))
    user = CHAIR.load(ChairConfig(gt=gt, image_root=imgs))
    assert user.ground_truth == coco.ground_truth and user.references == coco.references
    answers = {"42": line("Two dogs and a cat."), "7": line("A pizza on a table.")}
    assert CHAIR.score(user, answers, ChairConfig(gt=gt))["metrics"] == CHAIR.score(
        coco, answers, ChairConfig(annotations=str(ann)))["metrics"]


def test_chair_images_from_gt_data_exclude_n_and_save_gt(tmp_path):
    ann, imgs = chair_setup(tmp_path)
    gt = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": "a", "objects": ["dog", "cat"]},
                                              {"image_id": "b", "objects": []}])
    data = CHAIR.load(ChairConfig(gt=gt, predictions="p.jsonl"))
    assert data.records == [{"image_id": "a", "image": None}, {"image_id": "b", "image": None}]
    with pytest.raises(ConfigError, match="--images"):
        CHAIR.prompt(data, ChairConfig(gt=gt))
    listed = write_jsonl(tmp_path / "images.jsonl", [{"image": "COCO_val2014_000000000042.jpg"},
                                                     {"image": "COCO_val2014_000000000007.jpg", "image_id": "7"}])
    exclude = write_jsonl(tmp_path / "samples.jsonl", [{"image": "COCO_val2014_000000000042.jpg", "kind": "neg"}])
    saved = tmp_path / "derived.jsonl"
    cfg = ChairConfig(annotations=str(ann), data=listed, image_root=imgs, exclude=exclude, save_gt=str(saved))
    assert [r["image_id"] for r in CHAIR.load(cfg).records] == ["7"]
    assert [json.loads(x) for x in saved.read_text().splitlines()] == [
        {"image_id": "7", "objects": ["pizza", "dining table"], "captions": ["A table with pizza."]}]
    assert len(CHAIR.load(ChairConfig(annotations=str(ann), image_root=imgs, n=1)).records) == 1


def test_chair_uid_of():
    assert CHAIR.uid_of({"image_id": 42, "prediction": "x"}, None) == "42"
    assert CHAIR.uid_of({"prediction": "x"}, None) is None


def test_chair_bad_inputs_name_file_line_and_field(tmp_path):
    ann, imgs = chair_setup(tmp_path)
    bad = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": "1", "objects": ["dog"]},
                                               {"image_id": "2", "objects": ["puppy"]}])
    with pytest.raises(DataError, match=r"gt\.jsonl:2: objects\[0\]: 'puppy' is not a canonical .*'dog'"):
        CHAIR.load(ChairConfig(gt=bad))
    bad = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": "1", "objects": ["dgo"]}])
    with pytest.raises(DataError, match=r"gt\.jsonl:1: objects\[0\]: 'dgo'.*did you mean 'dog'"):
        CHAIR.load(ChairConfig(gt=bad))
    bad = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": "1", "objects": []}, {"image_id": 1, "objects": []}])
    with pytest.raises(DataError, match=r"gt\.jsonl:2: image_id: .*repeats line 1"):
        CHAIR.load(ChairConfig(gt=bad))
    bad = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": "1"}])
    with pytest.raises(DataError, match=r"gt\.jsonl:1: objects: missing field"):
        CHAIR.load(ChairConfig(gt=bad))
    other = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": "42", "objects": ["dog"]}])
    with pytest.raises(DataError, match=r"COCO_val2014_000000000007\.jpg: image_id: no ground truth for image_id '7'"):
        CHAIR.load(ChairConfig(gt=other, image_root=imgs))
    (ann / "instances_val2014.json").write_text(json.dumps(
        {"images": [], "categories": [], "annotations": [{"image_id": 1}]}))
    with pytest.raises(DataError, match=r"instances_val2014\.json:annotations\[0\]: category_id"):
        CHAIR.load(ChairConfig(annotations=str(ann)))
    with pytest.raises(ConfigError, match="exactly one ground truth"):
        CHAIR.load(ChairConfig(gt=other, annotations=str(ann)))


# --------------------------------------------------------------------------- POPE maths


@pytest.mark.parametrize("text, reference, strict", [
    ("Yes, there is.", "yes", "yes"),
    ("No.", "no", "no"),
    ("There is no cat.", "no", "no"),
    ("Yes", "yes", "yes"),
    ("", "yes", "yes"),
    ("There isn't a cat", "yes", "no"),
    ("There isn’t a cat", "yes", "no"),
    ("NO", "yes", "no"),
    ("Yes. But not a big one", "yes", "yes"),
    ("no, not at all", "no", "no"),
    ("None visible", "yes", "no"),
])
def test_pope_parsers(text, reference, strict):
    assert parse_yes_no(text, "reference") == reference
    assert parse_yes_no(text, "strict") == strict


def test_pope_default_yes_flag():
    assert POPE_PARSERS["reference"]("") == ("yes", True)
    assert POPE_PARSERS["reference"]("Yes, there is.") == ("yes", False)
    assert POPE_PARSERS["strict"]("I think so") == ("yes", True)
    with pytest.raises(ConfigError, match="did you mean 'strict'"):
        parse_yes_no("yes", "strikt")


def test_pope_metrics_by_hand():
    answers = [parse_yes_no(a) for a in ["Yes, there is.", "No.", "There is no cat.", "Yes"]]
    out = pope_metrics(["yes", "yes", "no", "no"], answers)  # TP = FN = TN = FP = 1
    assert out == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0, "n": 4}
    # TP 2, FP 1, FN 1, TN 0: P = R = 2/3; yes-ratio 3/4
    out = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "yes", "no", "yes"])
    assert out["precision"] == pytest.approx(200 / 3) and out["recall"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx(200 / 3) and out["accuracy"] == 50.0 and out["yes_ratio"] == 75.0
    # P = 1/2, R = 1/3: F1 = 2·(1/2)(1/3)/(5/6) = 0.4
    out = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "no", "no", "yes"])
    assert out["f1"] == pytest.approx(40.0)


def test_pope_all_no_gives_null_precision_with_a_warning():
    warnings = []
    out = pope_metrics(["yes", "no"], ["no", "no"], warnings)
    assert out["precision"] is None and out["f1"] is None and out["recall"] == 0.0 and out["yes_ratio"] == 0.0
    assert len(warnings) == 1 and "precision" in warnings[0]
    warnings = []
    out = pope_metrics(["no", "yes"], ["yes", "no"], warnings)  # P = R = 0: F1 undefined
    assert out["f1"] is None and "f1" in warnings[0]


def test_pope_question_article():
    assert pope_question("umbrella") == "Is there an umbrella in the image?"
    assert pope_question("dog") == "Is there a dog in the image?"


IMAGES = [("1", "1.jpg", ["dog", "person", "frisbee"]), ("2", "2.jpg", ["dog", "person", "car", "umbrella"]),
          ("3", "3.jpg", ["cat", "couch", "tv"]), ("4", "4.jpg", ["person", "car"]),
          ("5", "5.jpg", ["dog", "car", "bench"])]


def test_pope_builder():
    built = build_pope(IMAGES, seed=3, n_images=3)
    assert built == build_pope(IMAGES, seed=3, n_images=3)
    for split in ("random", "popular", "adversarial"):
        qs = [q for q in built if q["split"] == split]
        assert len(qs) == 18 and [q["question_id"] for q in qs] == list(range(1, 19))
        assert [q["label"] for q in qs] == ["yes", "no"] * 9
        images = {i: objs for i, _, objs in IMAGES}
        for k in range(0, 18, 6):
            group = qs[k:k + 6]
            assert len({q["image_id"] for q in group}) == 1  # 6 questions per image
            objs = images[group[0]["image_id"]]
            asked = [q["text"] for q in group]
            assert asked[0::2] == [pope_question(o) for o in objs[:3]]  # positives: the first three
            assert not {pope_question(o) for o in objs} & set(asked[1::2])  # negatives absent
            assert len(set(asked)) == 6
    assert "4" not in {q["image_id"] for q in built}  # fewer than 3 objects


def test_pope_builder_popular_and_adversarial_choices():
    images = IMAGES[:3] + IMAGES[4:]  # every image has >= 3 objects; all four selected
    built = build_pope(images, ["popular", "adversarial"], n_images=10)
    negatives = {(s, i): [q["text"] for q in built
                                                if q["split"] == s and q["image_id"] == i and q["label"] == "no"]
                 for s in ("popular", "adversarial") for i in ("1", "3")}
    # frequencies: dog 3, person 2, car 2, then the 1s by name: bench, cat, couch, frisbee, tv, umbrella
    assert negatives["popular", "3"] == [pope_question(o) for o in ("dog", "car", "person")]
    assert negatives["popular", "1"] == [pope_question(o) for o in ("car", "bench", "cat")]
    # co-occurrence with dog: person 2, car 2, bench 1, frisbee 1, umbrella 1 -> car; with person: dog 2,
    # car 1, frisbee 1, umbrella 1 -> umbrella; frisbee co-occurs only with dog and person: random fallback
    adversarial = negatives["adversarial", "1"]
    assert adversarial[:2] == [pope_question("car"), pope_question("umbrella")]
    assert adversarial[2] in [pope_question(o) for o in ("bench", "cat", "couch", "tv")]
    # cat co-occurs with couch/tv only (both in the image): fall back to random
    assert all(t not in [pope_question(o) for o in ("cat", "couch", "tv")] for t in negatives["adversarial", "3"])
    with pytest.raises(DataError, match="3 or more"):
        build_pope([("1", "1.jpg", ["dog"])])


# --------------------------------------------------------------------------- POPE data


def pope_dir(tmp_path):
    folder = tmp_path / "pope"
    folder.mkdir()
    write_jsonl(folder / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}])
    (folder / "coco_pope_popular.json").write_text(json.dumps([
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "Yes"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a person in the image?", "label": "no"}]))
    return folder


def test_pope_load_prompt_and_score(tmp_path):
    folder = pope_dir(tmp_path)
    imgs = touch_images(tmp_path / "img", ["a.jpg", "b.jpg"])
    cfg = PopeConfig(data=str(folder), image_root=imgs, parser="strict")
    data = POPE.load(cfg)
    assert [q["uid"] for q in data.records] == ["popular:1", "popular:2", "random:1", "random:2"]
    req = POPE.prompt(data, cfg)[2]
    assert req.text == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert req.images == (str(tmp_path / "img" / "a.jpg"),)
    assert dict(req.extras) == {"question_id": "1", "split": "random", "parser": "strict"}
    assert POPE.parse("There isn't one.", req) == "no"
    answers = {"random:1": line("Yes"), "random:2": line("There isn't one."),
               "popular:1": line("", error="HTTP 500"), "popular:2": line("Sure")}
    out = POPE.score(data, answers, cfg)
    assert out["per_category"]["random"] == {"accuracy": 100.0, "precision": 100.0, "recall": 100.0,
                                             "f1": 100.0, "yes_ratio": 50.0, "n": 2}
    # popular: the failed yes-question counts as a wrong "no"; "Sure" -> yes (default) on a no-question
    assert out["per_category"]["popular"]["accuracy"] == 0.0
    assert out["per_category"]["popular"]["precision"] == 0.0 and out["per_category"]["popular"]["f1"] is None
    assert out["metrics"]["accuracy"] == 50.0 and out["metrics"]["f1"] == 100.0  # means over non-null splits
    assert out["metrics"]["n"] == 4 and out["metrics"]["n_default_yes"] == 1
    assert any("popular: f1" in w for w in out["warnings"]) and any("1 of 4" in w for w in out["warnings"])


def test_pope_splits_questions_flag_and_uid_of(tmp_path):
    folder = pope_dir(tmp_path)
    imgs = touch_images(tmp_path / "img", ["a.jpg", "b.jpg"])
    data = POPE.load(PopeConfig(questions=[str(folder / "coco_pope_random.json")], image_root=imgs))
    assert [q["uid"] for q in data.records] == ["random:1", "random:2"]
    assert POPE.uid_of({"question_id": 2}, data) == "random:2"
    kept = POPE.load(PopeConfig(data=str(folder), image_root=imgs, splits=["popular"]))
    assert {q["split"] for q in kept.records} == {"popular"}
    assert POPE.uid_of({"question_id": 2, "split": "popular"}, kept) == "popular:2"
    both = POPE.load(PopeConfig(data=str(folder), image_root=imgs))
    with pytest.raises(DataError, match="ambiguous"):
        POPE.uid_of({"question_id": 2}, both)
    with pytest.raises(ConfigError, match="split 'adversarial' is not in the questions"):
        POPE.load(PopeConfig(data=str(folder), image_root=imgs, splits=["adversarial"]))


def test_pope_build_from_gt(tmp_path):
    imgs = touch_images(tmp_path / "img", [f"COCO_val2014_00000000000{i}.jpg" for i, _, _ in IMAGES])
    gt = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": i, "objects": objs} for i, _, objs in IMAGES])
    cfg = PopeConfig(build_from=gt, image_root=imgs, splits=["random"], n_images=2, seed=1)
    data = POPE.load(cfg)
    assert len(data.records) == 12 and data.records[0]["uid"] == "random:1"
    assert data.records[0]["image"].startswith(imgs)
    assert data.records == POPE.load(cfg).records
    with pytest.raises(ConfigError, match="cannot build split 'rare'"):
        POPE.load(PopeConfig(build_from=gt, image_root=imgs, splits=["rare"]))


def test_pope_bad_inputs(tmp_path):
    imgs = touch_images(tmp_path / "img", ["a.jpg"])
    bad = write_jsonl(tmp_path / "q_random.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}])
    with pytest.raises(DataError, match=r"q_random\.jsonl:1: label: expected yes or no, got 'maybe'"):
        POPE.load(PopeConfig(data=bad, image_root=imgs))
    dup = write_jsonl(tmp_path / "q_random.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}])
    with pytest.raises(DataError, match=r"q_random\.jsonl:2: question_id: question random:1 repeats .*:1"):
        POPE.load(PopeConfig(data=dup, image_root=imgs))
    missing = write_jsonl(tmp_path / "q_random.jsonl", [
        {"question_id": 1, "image": "zz.jpg", "text": "Is there a dog?", "label": "yes"}])
    with pytest.raises(DataError, match=r"q_random\.jsonl:1: image: image file not found"):
        POPE.load(PopeConfig(data=missing, image_root=imgs))
    assert POPE.load(PopeConfig(data=missing, image_root=imgs, predictions="p.jsonl")).n == 1
    with pytest.raises(ConfigError, match="--parser"):
        POPE.load(PopeConfig(data=missing, parser="lenient"))
    with pytest.raises(ConfigError, match="question"):
        POPE.load(PopeConfig(data=missing, template="no placeholder"))


def test_registry_entries():
    assert get_benchmark("chair") is CHAIR and get_benchmark("pope") is POPE
    assert (CHAIR.needs, CHAIR.max_new_tokens, POPE.max_new_tokens) == ("generate", 200, 16)
    assert CHAIR.flags["--coco-annotations"] == "annotations" and POPE.flags["--split"] == "splits"
