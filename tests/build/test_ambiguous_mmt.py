"""mmkit/build/ambiguous_mmt.py: the 3AM recipe (build.md §3 tests 1-8)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from mmkit.build import ambiguous_mmt as am
from mmkit.config import load_config
from mmkit.errors import DataError, MmkitError

@pytest.fixture
def tsv(tmp_path):
    rows = [f"bank\tn\tb{i}" for i in range(10)] + ["river\tn\tr0"] + [f"dog\tn\td{i}" for i in range(7)]
    rows += [f"play\tv\tp{i}" for i in range(5)] + ["man\tn\tm0", "man\tn\tm1"]
    path = tmp_path / "senses.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def scorer(tsv, **kw):
    return am.AmbiguityScorer(am.load_inventory(f"tsv:{tsv}"), **kw)


def test_caption_score_max_and_mean(tsv):
    s, words = scorer(tsv, word_score="senses", aggregate="max").score("a dog by the river bank")
    assert s == pytest.approx(math.log2(10))
    assert [(w["token"], w["n_senses"]) for w in words] == [("dog", 7), ("river", 1), ("bank", 10)]
    s, _ = scorer(tsv, word_score="senses", aggregate="mean").score("a dog by the river bank")
    assert s == pytest.approx((math.log2(7) + 0 + math.log2(10)) / 3)
    # no counts: entropy equals log2 n
    assert scorer(tsv, word_score="entropy").score("a dog by the river bank")[0] == pytest.approx(math.log2(10))
    assert scorer(tsv).score("the of and")[0] == 0.0


def test_entropy_with_smoothing():
    assert am.entropy_bits([3, 1], 0.0) == pytest.approx(0.8112781, abs=1e-6)
    assert am.entropy_bits([3, 1], 1.0) == pytest.approx(0.9182958, abs=1e-6)


def test_tsv_weights_feed_entropy(tmp_path):
    path = tmp_path / "w.tsv"
    path.write_text("bank\tn\tshore\t3\nbank\tn\tmoney\t1\n", encoding="utf-8")
    inv = am.load_inventory(f"tsv:{path}")
    assert am.AmbiguityScorer(inv, smoothing=0.0).score("bank")[0] == pytest.approx(0.8112781, abs=1e-6)
    assert am.AmbiguityScorer(inv, smoothing=1.0).score("bank")[0] == pytest.approx(0.9182958, abs=1e-6)


def test_morphy(tsv):
    inv = am.load_inventory(f"tsv:{tsv}")
    assert inv.lemma("banks", "n") == "bank"
    assert inv.lemma("playing", "v") == "play"
    assert inv.lemma("men", "n") == "man"
    assert inv.lemma("playing", "n") is None
    assert am.morphy_candidates("boxes", "n", {}) == ["boxes", "boxe", "box"]
    assert am.morphy_candidates("running", "v", {"v": {"running": ["run"]}})[:2] == ["running", "run"]


def test_tokens_and_stopwords():
    assert am.tokens("The Dog's  ball, a B-side; Ｆｕｌｌ-width") == ["dog's", "ball", "b-side", "full-width"]


def test_wordnet_dict_fixture_parses(tmp_path):
    d = tmp_path / "dict"
    d.mkdir()
    licence = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University\n"
    (d / "index.noun").write_text(licence + "bank n 10 3 @ ~ + 10 3 09213565 08420278\n"
                                  "river n 1 2 @ ~ 1 0 09411430\n", encoding="utf-8")
    for name in ("verb", "adj", "adv"):
        (d / f"index.{name}").write_text(licence, encoding="utf-8")
    (d / "noun.exc").write_text("banksia bank\n", encoding="utf-8")
    (d / "cntlist.rev").write_text("bank%1:17:01:: 1 3\nbank%1:14:00:: 2 1\n", encoding="utf-8")
    inv = am.load_inventory(f"wordnet-dict:{d}")
    assert inv.senses[("bank", "n")][:3] == [3.0, 1.0, 0.0]
    assert inv.senses[("river", "n")] == [0.0]
    assert inv.lemma("banksia", "n") == "bank"
    p = [4 / 14, 2 / 14] + [1 / 14] * 8  # counted: (3+1, 1+1, eight 0+1) over 14
    assert am.AmbiguityScorer(inv).score("banks")[0] == pytest.approx(-sum(x * math.log2(x) for x in p))


def test_selection_with_ties_is_deterministic():
    ids = ["a", "b", "c", "d", "e"]
    scores = [1.0, 2.0, 1.0, 1.0, 0.5]
    order = am.rank_order(ids, scores, 0)
    assert order[0] == 1 and order[-1] == 4
    tied = sorted([0, 2, 3], key=lambda i: am.stable_seed(0, ids[i]))
    assert order[1:4] == tied
    assert am.select(ids, scores, 0, top_k=2)[0] == order[:2]
    assert am.select(ids, scores, 0, top_fraction=0.5)[0] == order[:2]  # floor(0.5 * 5)
    assert sorted(am.select(ids, scores, 0, threshold=1.0)[0]) == [0, 1, 2, 3]
    assert am.select(ids, scores, 0, top_k=2) == am.select(list(ids), list(scores), 0, top_k=2)
    assert am.rank_order(ids, scores, 1)[1:4] == sorted([0, 2, 3], key=lambda i: am.stable_seed(1, ids[i]))


def test_assign_splits_fills_test_then_val():
    units = ["u1", "u2", "u3", "u4"]
    sizes = [2, 1, 2, 3]
    splits = am.assign_splits(units, sizes, 0, val_size=2, test_size=2)
    assert sum(s for s, sp in zip(sizes, splits) if sp == "test") <= 2
    assert sum(s for s, sp in zip(sizes, splits) if sp == "val") <= 2
    # hand simulation in stable_seed order
    filled, cap, want = {"test": 0, "val": 0}, {"test": 2, "val": 2}, {}
    for i in sorted(range(4), key=lambda i: am.stable_seed(0, units[i])):
        want[i] = next((s for s in ("test", "val") if filled[s] + sizes[i] <= cap[s]), "train")
        if want[i] != "train":
            filled[want[i]] += sizes[i]
    assert splits == [want[i] for i in range(4)]


def pool(tmp_path, n_images=8, per_image=2, extra=()):
    rows = []
    for i in range(n_images):
        for j in range(per_image):
            words = ["bank", "dog", "river", "play"][(i + j) % 4]
            rows.append({"id": f"c{i}-{j}", "image": f"img{i}.jpg", "en": f"a {words} number {i} {j}",
                         "zh": f"一个{i}{j}", "source": "coco"})
    rows += list(extra)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(path, tsv, **kw):
    return load_config(am.AmbiguousMMTConfig, flags={"captions": str(path), "sense_inventory": f"tsv:{tsv}",
                                                     "val_size": 4, "test_size": 4, **kw})


def read_lines(path):
    data = path.read_bytes()
    assert b"\r" not in data and (data == b"" or data.endswith(b"\n"))
    return data.decode("utf-8").splitlines()


def test_layout_image_grouped_and_deterministic(tmp_path, tsv):
    extra = [{"id": "nl", "image": "imgX.jpg", "en": "a dog\nwith\ta ball", "zh": "狗\r\n球", "source": "coco"},
             {"id": "dup", "image": "img0.jpg", "en": "a bank number 0 0", "zh": "重复", "source": "coco"},
             {"id": "nozh", "image": "img9.jpg", "en": "a dog", "zh": "a dog", "source": "coco"},
             {"id": "empty", "image": "img9.jpg", "en": "  ", "zh": "空", "source": "coco"}]
    path = pool(tmp_path, extra=extra)
    m1 = am.run(cfg_for(path, tsv), str(tmp_path / "o1"))
    m2 = am.run(cfg_for(path, tsv), str(tmp_path / "o2"))
    out = tmp_path / "o1"
    for f in ("train.en", "val.zh", "images-test.txt", "scores-train.jsonl", "dropped.jsonl"):
        assert (out / f).read_bytes() == (tmp_path / "o2" / f).read_bytes()
    assert m1["outputs"] == m2["outputs"]
    stages = {s["name"]: s for s in m1["metrics"]["stages"]}
    assert stages["hygiene"] == {"name": "hygiene", "in": 20, "kept": 17,
                                 "dropped": {"duplicate": 1, "no_cjk": 1, "empty_text": 1}}
    assert any("CR, LF or TAB" in w for w in m1["warnings"])
    assert m1["standins"][0]["name"].startswith("standin-wsd/tsv:senses.tsv/entropy/max")
    image_split = {}
    total = 0
    for split in am.SPLITS:
        en, zh, imgs = (read_lines(out / n) for n in am.release_files(split))
        assert len(en) == len(zh) == len(imgs)
        total += len(en)
        for img in imgs:
            assert image_split.setdefault(img, split) == split  # an image never spans two splits
        scores = [json.loads(x) for x in read_lines(out / f"scores-{split}.jsonl")]
        assert [s["image"] for s in scores] == imgs
        assert all(s["scorer"] == m1["standins"][0]["name"] for s in scores)
    assert total == 17
    assert "a dog with a ball" in read_lines(out / "train.en") + read_lines(out / "val.en") + read_lines(out / "test.en")
    assert "coco_img0.jpg" in image_split
    dropped = [json.loads(x) for x in read_lines(out / "dropped.jsonl")]
    assert {d["id"]: d["reason"] for d in dropped} == {"dup": "duplicate", "nozh": "no_cjk", "empty": "empty_text"}


def test_top_k_drops_and_caption_splits(tmp_path, tsv):
    path = pool(tmp_path)
    m = am.run(cfg_for(path, tsv, top_k=5, split_unit="caption", val_size=1, test_size=1), str(tmp_path / "o"))
    select = next(s for s in m["metrics"]["stages"] if s["name"] == "select")
    assert select == {"name": "select", "in": 16, "kept": 5, "dropped": {"not_selected": 11}}
    assert [len(read_lines(tmp_path / "o" / f"{s}.en")) for s in am.SPLITS] == [3, 1, 1]
    # the kept captions are the 5 top-ranked ones (bank captions score log2 10)
    kept = {json.loads(x)["id"] for s in am.SPLITS for x in read_lines(tmp_path / "o" / f"scores-{s}.jsonl")}
    assert all(json.loads(x)["score"] >= math.log2(7) - 1e-6
               for s in am.SPLITS for x in read_lines(tmp_path / "o" / f"scores-{s}.jsonl"))
    assert len(kept) == 5


def test_image_name_clash_is_an_error(tmp_path, tsv):
    rows = [{"id": "a", "image": "x/1.jpg", "en": "dog", "zh": "狗"},
            {"id": "b", "image": "y/1.jpg", "en": "bank", "zh": "银行"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(MmkitError, match=r"p.jsonl:2: image: image name '1.jpg' clashes: ids 'a' and 'b'"):
        am.run(cfg_for(path, tsv), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_missing_field_is_an_error(tmp_path, tsv):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "image": "1.jpg", "en": "dog"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:1: zh: missing field"):
        am.run(cfg_for(path, tsv), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_config_needs_one_mode_and_one_selection(tmp_path):
    with pytest.raises(MmkitError, match="exactly one of --import-release"):
        load_config(am.AmbiguousMMTConfig, flags={})
    with pytest.raises(MmkitError, match="choose one of --threshold"):
        load_config(am.AmbiguousMMTConfig, flags={"captions": "x", "sense_inventory": "tsv:x",
                                                  "threshold": 1.0, "top_k": 3})
    cfg = load_config(am.AmbiguousMMTConfig, flags={"captions": "x", "sense_inventory": "tsv:x"})
    assert cfg.top_k == 26000


def release(tmp_path, n=(3, 2, 2)):
    d = tmp_path / "data"
    d.mkdir()
    for split, k in zip(am.SPLITS, n):
        (d / f"{split}.en").write_text("".join(f"caption {i}\n" for i in range(k)), encoding="utf-8")
        (d / f"{split}.zh").write_text("".join(f"标题 {i}\n" for i in range(k)), encoding="utf-8")
        (d / f"images-{split}.txt").write_text("".join(f"{split}_{i}.jpg\n" for i in range(k)), encoding="utf-8")
    return d


def import_cfg(d, **kw):
    return load_config(am.AmbiguousMMTConfig, flags={"import_release": str(d), "expect_counts": False, **kw})


def test_import_release_copies_and_warns_on_hash(tmp_path):
    d = release(tmp_path)
    m = am.run(import_cfg(d), str(tmp_path / "o"))
    assert (tmp_path / "o" / "val.zh").read_bytes() == (d / "val.zh").read_bytes()
    assert m["metrics"]["stages"] == [{"name": "import", "in": 7, "kept": 7, "dropped": {}}]
    assert sum("differs from the release" in w for w in m["warnings"]) == 9
    assert len(m["data"]) == 9


def test_import_pre_revision_test_hash_warns(tmp_path, monkeypatch):
    d = release(tmp_path)
    digest = hashlib.sha256((d / "test.zh").read_bytes()).hexdigest()
    monkeypatch.setitem(am.PRE_REVISION_SHA256, "test.zh", digest)
    warnings = []
    am.check_release(d, False, warnings.append)
    assert any(w.startswith("test.zh: this is the test file from before the 2024-12-09") for w in warnings)


def test_import_short_file_names_file_and_line(tmp_path):
    d = release(tmp_path)
    (d / "val.zh").write_text("标题 0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"val.zh:2: line: missing line"):
        am.run(import_cfg(d), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_import_counts_crlf_and_images(tmp_path):
    d = release(tmp_path)
    with pytest.raises(DataError, match="expected 23931 lines"):
        am.run(import_cfg(d, expect_counts=True), str(tmp_path / "o"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for split, k in zip(am.SPLITS, (3, 2, 2)):
        for i in range(k):
            (imgs / f"{split}_{i}.jpg").write_bytes(b"x")
    (imgs / "val_1.jpg").unlink()
    with pytest.raises(DataError, match=r"images-val.txt:2: image: image not found"):
        am.run(import_cfg(d, image_dir=str(imgs)), str(tmp_path / "o"))
    (d / "train.en").write_bytes(b"a\r\nb\nc\n")
    with pytest.raises(DataError, match=r"train.en:1: text: expected LF"):
        am.run(import_cfg(d), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
