"""mmkit/build/snare.py: SNARE probe construction (build.md §4 tests 1-7)."""

from __future__ import annotations

import hashlib
import json

import pytest

from mmkit.build import snare
from mmkit.config import load_config
from mmkit.core.seeding import stable_rng
from mmkit.errors import DataError

BBOX = {"bbox_x": 1, "bbox_y": 2, "bbox_w": 10, "bbox_h": 20}
#: a dictionary tagger for a fixed vocabulary (registered once, inherited by worker processes)
STUB_TAGS = {"a": "DT", "the": "DT", "man": "NN", "dog": "NN", "red": "JJ", "big": "JJ", "ball": "NN",
             "throws": "VBZ", "to": "IN", "park": "NN", "in": "IN", "runs": "VBZ", "sitting": "VBG", "is": "VBZ"}
snare.TAGGERS.register("stub", lambda: (lambda text: [(w, STUB_TAGS[w.lower()]) for w in text.split()]))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path, name="o", **flags):
    cfg = load_config(snare.SnareConfig, flags=flags)
    manifest = snare.run(cfg, str(tmp_path / name))
    lines = (tmp_path / name / "probes.jsonl").read_text(encoding="utf-8").splitlines()
    return manifest, [json.loads(x) for x in lines]


def rel(caption, relation, o1, o2, false=None):
    row = {"image_path": "img/1.jpg", **BBOX, "true_caption": caption, "relation_name": relation,
           "obj1_name": o1, "obj2_name": o2}
    if false is not None:
        row["false_caption"] = false
    return row


def test_relationship_composition_exchange_and_symmetric(tmp_path):
    path = write_jsonl(tmp_path / "rel.jsonl", [rel("the horse is eating the grass", "eating", "horse", "grass"),
                                                 rel("the cup is next to the plate", "next to", "cup", "plate"),
                                                 rel("the man has the hat", "has", "man", "hat")])
    m, probes = run(tmp_path, relations=str(path))
    assert probes == [{"id": "relationship_composition/vg_relation-0", "task": "relationship_composition",
                       "subtask": "eating", "image": "../img/1.jpg", "bbox": [1, 2, 10, 20],
                       "captions": ["the horse is eating the grass", "the grass is eating the horse",
                                    "the horse and the grass"],
                       "option_labels": ["correct", "exchange", "and"], "answer": 0,
                       "source": {"dataset": "vg_relation", "index": 0}}]
    assert m["metrics"]["stages"] == [{"name": "probes", "in": 3, "kept": 1,
                                       "dropped": {"symmetric": 1, "no_copula": 1}}]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary == {"tasks": {"relationship_composition": {"probes": 1, "subtasks": {"eating": 1}}},
                       "skipped": {"relationship_composition": {"no_copula": 1, "symmetric": 1}}}
    dropped = [json.loads(x) for x in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert dropped == [{"id": "relationship_composition/vg_relation-1", "reason": "symmetric"},
                       {"id": "relationship_composition/vg_relation-2", "reason": "no_copula"}]


def test_attribute_tasks_from_aro_and_triples(tmp_path):
    attr = {"image_path": "img/2.jpg", **BBOX, "true_caption": "the paved road and the white house",
            "attributes": ["paved", "white"], "obj1_name": "road", "obj2_name": "house"}
    same = {**attr, "attributes": ["white", "white"], "true_caption": "the white road and the white house"}
    path = write_jsonl(tmp_path / "attr.jsonl", [attr, same])
    _, probes = run(tmp_path, attributes=str(path))
    by_id = {p["id"]: p for p in probes}
    own = by_id["attribute_ownership/vg_attribution-0"]
    assert own["captions"] == ["the paved road and the white house", "the white road and the paved house",
                               "the road and the house are paved and white respectively"]
    assert own["subtask"] == "paved_white"
    neg = by_id["negation_logic/vg_attribution-0"]
    assert neg["captions"] == ["the road is paved and the house is white",
                               "the road is not paved and the house is not white"]
    assert neg["option_labels"] == ["correct", "negative"]
    assert "attribute_ownership/vg_attribution-1" not in by_id  # same_attribute
    assert [p["task"] for p in probes] == sorted(p["task"] for p in probes)
    triples = write_jsonl(tmp_path / "t.jsonl", [{"image": "x.jpg", "subject": "road", "relation": "under",
                                                  "object": "house", "subject_attrs": ["paved"],
                                                  "object_attrs": ["white", "tall"]}])
    _, probes = run(tmp_path, "o2", triples=str(triples))
    by_id = {p["id"]: p for p in probes}
    assert by_id["attribute_ownership/triples-0"]["captions"][1] == "the white road and the paved house"
    assert by_id["relationship_composition/triples-0"]["captions"] == [
        "the road is under the house", "the house is under the road", "the road and the house"]
    assert by_id["relationship_composition/triples-0"]["bbox"] is None


def test_spatial_is_opt_in_and_substitutes_in_fixed_order(tmp_path):
    path = write_jsonl(tmp_path / "rel.jsonl", [rel("the cat is on the mat", "on", "cat", "mat"),
                                                 rel("the man is eating the food", "eating", "man", "food")])
    _, probes = run(tmp_path, relations=str(path), tasks=["spatial_relationship"])
    assert [p["captions"] for p in probes] == [["the cat is on the mat", "the cat is to the left of the mat",
                                                "the cat is to the right of the mat", "the cat is below the mat"]]
    assert probes[0]["option_labels"] == ["correct", "to the left of", "to the right of", "below"]


def test_normalize():
    assert snare.normalize("A Dog (brown).") == "a dog brown"
    assert snare.normalize("one two three", max_words=2) == "one two"


def test_structure_shuffles_golden_and_workers(tmp_path):
    caption = "A man throws the big red ball to the dog in the park"
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": f"i{i}.jpg", "caption": caption} for i in range(4)])
    _, p1 = run(tmp_path, "o1", captions=str(path), pos_tagger="stub")
    _, p4 = run(tmp_path, "o4", captions=str(path), pos_tagger="stub", num_workers=4)
    assert (tmp_path / "o1" / "probes.jsonl").read_bytes() == (tmp_path / "o4" / "probes.jsonl").read_bytes()
    first = p1[0]
    assert first["id"] == "semantic_structure/caps-0-0" and first["subtask"] == "caps"
    assert first["option_labels"] == ["correct", "shuffle_nva", "shuffle_non_nva", "shuffle_all"]
    # golden strings: the stub tags, seed 0, one permutation per class from stable_rng(0, id, label)
    toks = caption.split()
    tags = [STUB_TAGS[w.lower()] for w in toks]
    rng = stable_rng(0, first["id"], "shuffle_nva")
    nva = list(toks)
    for cls in (snare.NOUN, snare.VERB, snare.ADJ):
        pos = [i for i, t in enumerate(tags) if t in cls]
        vals = [nva[i] for i in pos]
        for i, j in zip(pos, rng.permutation(len(pos))):
            nva[i] = vals[j]
    assert first["captions"][0] == "a man throws the big red ball to the dog in the park"
    assert first["captions"][1] == " ".join(nva).lower()
    nouns_at = [i for i, t in enumerate(tags) if t == "NN"]
    assert sorted(first["captions"][1].split()[i] for i in nouns_at) == sorted(["man", "ball", "dog", "park"])
    assert [first["captions"][1].split()[i] for i, t in enumerate(tags) if t not in snare.NOUN | snare.ADJ] == \
        [w.lower() for w, t in zip(toks, tags) if t not in snare.NOUN | snare.ADJ]
    assert first["captions"][1] == "a park throws the big red ball to the dog in the man"
    assert first["captions"][2] == "the man throws to big red ball the a dog the in park"
    assert first["captions"][3] == "man dog throws the the a red big park to in ball the"


def test_order_variant_has_four_shuffles(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "i.jpg", "caption": "a man throws the big red ball"}])
    _, probes = run(tmp_path, captions=str(path), pos_tagger="stub", structure_variant="order")
    assert probes[0]["option_labels"] == ["correct", "shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj",
                                          "shuffle_within_trigrams", "shuffle_trigrams"]
    for text in probes[0]["captions"][1:]:
        assert sorted(text.split()) == sorted("a man throws the big red ball".split())


def test_one_noun_caption_is_degenerate(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "i.jpg", "caption": "a dog sitting"},
                                                  {"image": "i.jpg", "caption": "the man throws a ball"}])
    m, probes = run(tmp_path, captions=str(path), pos_tagger="stub")
    assert [p["id"] for p in probes] == ["semantic_structure/caps-1-0"]
    assert m["metrics"]["stages"][0]["dropped"] == {"degenerate": 1}
    _, kept = run(tmp_path, "o2", captions=str(path), pos_tagger="stub", keep_degenerate=True)
    assert len(kept) == 2 and kept[0]["captions"][1] == kept[0]["captions"][0]


def test_records_tagger_and_copula_negation(tmp_path):
    rows = [{"image": "i.jpg", "caption": "The dog is brown.", "tokens": ["The", "dog", "is", "brown", "."],
             "tags": ["DT", "NN", "VBZ", "JJ", "."]},
            {"image": "i.jpg", "caption": "a dog is not here", "tokens": ["a", "dog", "is", "not", "here"],
             "tags": ["DT", "NN", "VBZ", "RB", "RB"]},
            {"image": "i.jpg", "caption": "dogs run", "tokens": ["dogs", "run"], "tags": ["NNS", "VBP"]}]
    path = write_jsonl(tmp_path / "caps.jsonl", rows)
    m, probes = run(tmp_path, captions=str(path), pos_tagger="records", negation_from="captions",
                    tasks=["negation_logic"])
    assert [(p["id"], p["captions"]) for p in probes] == [
        ("negation_logic/caps-0-0", ["the dog is brown", "the dog is not brown"])]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["skipped"] == {
        "negation_logic": {"negated": 1, "no_copula": 1}}
    assert m["config"]["pos_tagger"] == "records" and m["standins"] == []


def test_rules_tagger_is_recorded_as_standin(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [{"image": "i.jpg", "caption": "two white dogs are running"}])
    m, probes = run(tmp_path, captions=str(path))
    assert m["config"]["pos_tagger"] in ("rules", "spacy:en_core_web_sm")
    if m["config"]["pos_tagger"] == "rules":
        assert m["standins"][0]["name"] == "rules" and any("rules tagger" in w for w in m["warnings"])
    assert [snare.rules_tag(w) for w in "two white dogs are running on the grass .".split()] == [
        "NN", "JJ", "NNS", "VBP", "VBG", "IN", "DT", "NN", "."]


def test_every_probe_is_well_formed(tmp_path):
    rels = write_jsonl(tmp_path / "rel.jsonl", [rel("the horse is eating the grass", "eating", "horse", "grass")])
    caps = write_jsonl(tmp_path / "caps.jsonl", [{"image": "i.jpg", "captions": ["a man throws the red ball",
                                                                                "the big dog runs in the park"]}])
    _, probes = run(tmp_path, relations=str(rels), captions=str(caps), pos_tagger="stub")
    assert len(probes) == 3
    for p in probes:
        assert len(p["captions"]) == len(p["option_labels"]) and p["answer"] == 0
        assert list(p) == ["id", "task", "subtask", "image", "bbox", "captions", "option_labels", "answer", "source"]


def test_materialize_crops(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "img" / "1.jpg")
    path = write_jsonl(tmp_path / "rel.jsonl", [rel("the horse is eating the grass", "eating", "horse", "grass")])
    m, probes = run(tmp_path, relations=str(path), materialize_crops=True, hash_images=True)
    assert probes[0]["image"] == "images/vg_relation-0.png" and probes[0]["bbox"] is None
    digest = hashlib.sha256(f"img/1.jpg\x1f{hashlib.sha256((tmp_path / 'img' / '1.jpg').read_bytes()).hexdigest()}"
                            "\x1e".encode()).hexdigest()
    assert m["data"][-1]["kind"] == "images" and m["data"][-1]["sha256"] == digest
    assert Image.open(tmp_path / "o" / "images" / "vg_relation-0.png").size == (10, 20)


def test_missing_bbox_w_is_a_one_line_error(tmp_path):
    row = rel("the horse is eating the grass", "eating", "horse", "grass")
    del row["bbox_w"]
    path = write_jsonl(tmp_path / "rel.jsonl", [rel("the a is on the b", "on", "a", "b"), row])
    with pytest.raises(DataError) as exc:
        run(tmp_path, relations=str(path))
    assert str(exc.value).startswith(f"{path}:2: bbox_w: missing field")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()
