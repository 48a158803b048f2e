"""MMR (evaluate.md §3, tests in §9): parsing, pairing by id, metrics, GPT-4o check, data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkit.errors import ConfigError, DataError
from mmkit.evaluate.metrics.choice import Answer, pair_outcome, parse_mmr, robustness_metrics
from mmkit.evaluate.mmr import BENCHMARK, INSTRUCTION, MMRConfig, load, prompt, qhash, score, uid_of

# --------------------------------------------------------------------------- parsing (§3 table)

PARSE_TABLE = [
    ("B.", "B", "B"),
    ("The answer is C.", "C", "C"),
    ("Answer: B", "B", "B"),
    ("B, not A", "A", "B"),
    ("B or A", "A", "B"),
    ("A\nBecause the sign is red.", "E", "A"),
    ("(D)", "E", "E"),
    ("a", "E", "E"),
    ("e.g. D", "E", "E"),
    ("", "E", "E"),
    ("A)", "E", "E"),
]


@pytest.mark.parametrize("raw,official,first", PARSE_TABLE)
def test_parse_table(raw: str, official: str, first: str) -> None:
    assert parse_mmr(raw, "official") == official
    assert parse_mmr(raw, "first") == first


def test_parse_hook_follows_the_request_rule(tmp_path: Path) -> None:
    folder = write_mmr(tmp_path, SMALL)
    for rule, expected in (("official", "A"), ("first", "B")):
        request = prompt(load(MMRConfig(data=str(folder))), MMRConfig(parse_rule=rule))[0]
        assert BENCHMARK.parse("B or A", request) == expected


# --------------------------------------------------------------------------- fixtures


def record(pid: str, qtype: str, truth: str = "A", image: str = "img.png", question: str | None = None) -> dict:
    return {"id": pid, "image": image, "question": question or f"{pid} {qtype}? A. x B. y C. z D. w",
            "ground_truth": truth, "question_type": qtype}


def write_mmr(folder: Path, records: list[dict], name: str = "MMR-benchmark.json", image_dir: str = ".") -> Path:
    """The records and, under ``folder/image_dir``, a placeholder file for every image they name."""
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    for image in {r["image"] for r in records if "image" in r}:
        (folder / image_dir / image).write_bytes(b"x")
    (folder / name).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return folder


def answers_for(data, right: dict[tuple[str, str], bool]) -> dict[str, dict]:
    """Prediction lines keyed by uid: right or wrong per (id, question_type), varied raw texts."""
    lines = {}
    for pair in data.records:
        for q in pair.questions:
            wrong = "B" if q.ground_truth != "B" else "C"
            text = f"The answer is {q.ground_truth}." if right[(q.id, q.question_type)] else f"{wrong}."
            lines[q.uid] = {"uid": q.uid, "prediction": text, "error": None,
                            "question_type": q.question_type, "qhash": q.qhash}
    return lines


# Four pairs, two categories (§9): X = (POS ok, NEG ok), (POS ok, NEG wrong);
# Y = (NEG listed first: NEG ok, POS wrong), (POS wrong, NEG wrong).
SMALL = [record("attribute/X/01", "POS", "A"), record("attribute/X/01", "NEG", "B"),
         record("attribute/X/02", "POS", "C"), record("attribute/X/02", "NEG", "D"),
         record("attribute/Y/01", "NEG", "A"), record("attribute/Y/01", "POS", "B"),
         record("attribute/Y/02", "POS", "C"), record("attribute/Y/02", "NEG", "D")]
SMALL_RIGHT = {("attribute/X/01", "POS"): True, ("attribute/X/01", "NEG"): True,
               ("attribute/X/02", "POS"): True, ("attribute/X/02", "NEG"): False,
               ("attribute/Y/01", "NEG"): True, ("attribute/Y/01", "POS"): False,
               ("attribute/Y/02", "POS"): False, ("attribute/Y/02", "NEG"): False}


def test_four_pairs_hand_computed(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL))))
    out = score(data, answers_for(data, SMALL_RIGHT), MMRConfig())
    m = out["metrics"]
    assert m["ra"] == pytest.approx(25.0) and m["misleading_rate"] == pytest.approx(50.0)
    assert m["pos_acc"] == pytest.approx(50.0) and m["neg_acc"] == pytest.approx(50.0)
    assert m["n_unparsed"] == 0 and m["n_pairs"] == 4
    x, y = out["per_category"]["attribute/X"], out["per_category"]["attribute/Y"]
    assert (x["ra"], x["misleading_rate"]) == pytest.approx((50.0, 50.0))
    assert y["ra"] == pytest.approx(0.0) and y["misleading_rate"] is None
    assert (y["pos_acc"], y["neg_acc"]) == pytest.approx((0.0, 50.0))
    assert out["per_category"]["attribute"]["ra"] == pytest.approx(25.0)  # level: micro over its pairs
    assert any("attribute/Y: misleading_rate" in w for w in out["warnings"])
    assert any("subset" in w for w in out["warnings"])
    keys = {"ra", "misleading_rate", "pos_acc", "neg_acc", "n_unparsed"}
    assert keys <= set(m) and all(keys <= set(block) for block in out["per_category"].values())


def test_uids_prompts_and_image_lookup(tmp_path: Path) -> None:
    folder = write_mmr(tmp_path, SMALL, image_dir="images")
    data = load(MMRConfig(data=str(folder)))
    requests = prompt(data, MMRConfig())
    assert [r.uid for r in requests[:2]] == ["attribute/X/01#0", "attribute/X/01#1"]
    assert requests[4].extras["question_type"] == "NEG"  # Y/01 lists NEG first: k follows file order
    first = SMALL[0]["question"]
    assert requests[0].text == first + "\n" + "Answer with the option's letter from the given choices directly."
    assert INSTRUCTION == "Answer with the option's letter from the given choices directly."
    assert requests[0].images == (str(folder / "images" / "img.png"),)
    assert requests[0].extras["qhash"] == qhash(first) and len(qhash(first)) == 12
    assert BENCHMARK.max_new_tokens == 32 and BENCHMARK.flags == {"--parse-rule": "parse_rule"}


def test_shuffling_inside_pairs_changes_nothing(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path / "a", SMALL))))
    swapped = [SMALL[i ^ 1] for i in range(len(SMALL))]
    data2 = load(MMRConfig(data=str(write_mmr(tmp_path / "b", swapped))))
    assert data2.records[0].questions[0].question_type == "NEG"
    out = score(data, answers_for(data, SMALL_RIGHT), MMRConfig())
    out2 = score(data2, answers_for(data2, SMALL_RIGHT), MMRConfig())
    assert out["metrics"] == out2["metrics"] and out["per_category"] == out2["per_category"]


def test_pos_pos_anomaly_counts_as_misled_either_way(tmp_path: Path) -> None:
    recs = [record("attribute/number/04", "POS", "A"), record("attribute/number/04", "POS", "B")]
    data = load(MMRConfig(data=str(write_mmr(tmp_path, recs))))
    [anomaly] = data.anomalies
    assert anomaly["kind"] == "question_types" and anomaly["id"] == "attribute/number/04"
    uids = [q.uid for q in data.records[0].questions]
    for right in ((True, False), (False, True)):
        answers = {u: {"prediction": truth if ok else "D", "error": None}
                   for u, truth, ok in zip(uids, "AB", right)}
        out = score(data, answers, MMRConfig())
        assert out["metrics"]["ra"] == 0.0 and out["metrics"]["misleading_rate"] == pytest.approx(100.0)
        assert out["anomalies"] == data.anomalies
    with pytest.raises(DataError, match="give their uid"):
        uid_of({"id": "attribute/number/04", "question_type": "POS"}, data)


def test_pair_outcome_rules() -> None:
    assert pair_outcome([Answer(True, "NEG"), Answer(False, "POS")]) == (False, False)
    assert pair_outcome([Answer(False, "NEG"), Answer(True, "POS")]) == (False, True)
    assert pair_outcome([Answer(True, "NEG"), Answer(False, "NEG")]) == (False, False)
    assert robustness_metrics([])["ra"] is None


def test_missing_errored_and_unparsed_answers(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL[:4]))))
    uids = [q.uid for q in data.questions()]
    answers = {uids[0]: {"prediction": "A", "error": "HTTP 400"},   # right text but errored: wrong
               uids[1]: {"prediction": "(B)", "error": None},       # unparsed
               uids[2]: {"prediction": "C", "error": None}}         # uids[3] missing
    m = score(data, answers, MMRConfig())["metrics"]
    assert (m["ra"], m["misleading_rate"], m["pos_acc"], m["neg_acc"]) == pytest.approx((0.0, 100.0, 50.0, 0.0))
    assert m["n_unparsed"] == 1


def test_parse_rule_changes_the_score(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL[:2]))))
    uids = [q.uid for q in data.questions()]
    answers = {uids[0]: {"prediction": "A\nsure", "error": None}, uids[1]: {"prediction": "B", "error": None}}
    assert score(data, answers, MMRConfig(parse_rule="official"))["metrics"]["ra"] == 0.0
    assert score(data, answers, MMRConfig(parse_rule="first"))["metrics"]["ra"] == 100.0


# --------------------------------------------------------------------------- GPT-4o check (§3)

# category -> (pairs, both right, misled, published RA, published MR) from the leaderboard.
GPT4O = {
    "character/character": (40, 29, 3, 72.50, 9.38),
    "attribute/existence": (22, 15, 3, 68.18, 16.67),
    "attribute/color&texture": (24, 16, 5, 66.67, 23.81),
    "attribute/number": (24, 11, 4, 45.83, 26.67),
    "attribute/shape": (24, 21, 1, 87.5, 4.55),
    "attribute/posture": (24, 17, 4, 70.83, 19.05),
    "attribute/position": (22, 11, 7, 50.00, 38.89),
    "context/abstract": (22, 15, 6, 68.18, 28.57),
    "context/concrete": (21, 16, 3, 76.19, 15.79),
    "context/expert": (31, 22, 7, 70.97, 24.14),
    "context/activity": (24, 20, 3, 83.33, 13.04),
    "context/relation": (22, 14, 4, 63.64, 22.22),
}


def test_gpt4o_published_figures(tmp_path: Path) -> None:
    recs, right = [], {}
    for cat, (n, both, misled, _, _) in GPT4O.items():
        for k in range(n):
            pid = f"{cat}/{k:02d}"
            # outcomes: both right, misled (POS ok, NEG wrong), then alternately NEG-only-right / both wrong
            pos_ok, neg_ok = ((True, True) if k < both else (True, False) if k < both + misled
                              else (False, k % 2 == 0))
            pair = [record(pid, "POS", "ABCD"[k % 4]), record(pid, "NEG", "ABCD"[(k + 1) % 4])]
            recs += pair[::-1] if k % 3 == 0 else pair  # the order inside a pair varies
            right[(pid, "POS")], right[(pid, "NEG")] = pos_ok, neg_ok
    data = load(MMRConfig(data=str(write_mmr(tmp_path, recs))))
    out = score(data, answers_for(data, right), MMRConfig())
    assert round(out["metrics"]["ra"], 2) == 69.00
    assert round(out["metrics"]["misleading_rate"], 2) == 19.46
    for cat, (n, _, _, ra, mr) in GPT4O.items():
        block = out["per_category"][cat]
        assert block["n_pairs"] == n
        assert abs(block["ra"] - ra) <= 0.01 and abs(block["misleading_rate"] - mr) <= 0.01, cat
    assert [out["per_category"][lvl]["n_pairs"] for lvl in ("character", "attribute", "context")] == [40, 140, 120]
    assert out["warnings"] == [] and out["anomalies"] == []


# --------------------------------------------------------------------------- data routes


def test_folder_json_file_and_jsonl_give_the_same_result(tmp_path: Path) -> None:
    folder = write_mmr(tmp_path, SMALL)
    jsonl = tmp_path / "mmr.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in SMALL), encoding="utf-8")
    results = []
    for source in (folder, folder / "MMR-benchmark.json", jsonl):
        data = load(MMRConfig(data=str(source)))
        results.append(score(data, answers_for(data, SMALL_RIGHT), MMRConfig()))
    assert results[0]["metrics"] == results[1]["metrics"] == results[2]["metrics"]
    assert load(MMRConfig(data=str(folder))).sha256 == load(MMRConfig(data=str(folder / "MMR-benchmark.json"))).sha256


def test_predictions_keyed_by_id_and_question_type(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL))))
    by_uid = answers_for(data, SMALL_RIGHT)
    by_id = {}
    for line in by_uid.values():
        q = next(q for q in data.questions() if q.uid == line["uid"])
        keyed = {k: v for k, v in line.items() if k != "uid"} | {"id": q.id}
        by_id[uid_of(keyed, data)] = keyed
    assert set(by_id) == set(by_uid)
    assert score(data, by_id, MMRConfig())["metrics"] == score(data, by_uid, MMRConfig())["metrics"]
    assert uid_of({"prediction": "A"}, data) is None
    assert uid_of({"id": "attribute/Z/09", "question_type": "POS"}, data) not in {q.uid for q in data.questions()}


def test_limit_keeps_the_first_pairs(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL)), limit=3))
    assert [p.id for p in data.records] == ["attribute/X/01", "attribute/X/02", "attribute/Y/01"]
    assert len(prompt(data, MMRConfig())) == 6


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r + [record("attribute/X/01", "NEG")], "id"),                    # three records for one id
    (lambda r: r[:-1], "id"),                                                   # one record for an id
    (lambda r: [dict(r[0], ground_truth="E")] + r[1:], "ground_truth"),         # bad letter
    (lambda r: [dict(r[0], ground_truth="a")] + r[1:], "ground_truth"),
    (lambda r: [dict(r[0], question_type="pos")] + r[1:], "question_type"),
    (lambda r: [dict(r[0], id="attribute/X")] + r[1:], "id"),                   # two segments
    (lambda r: [{k: v for k, v in r[0].items() if k != "image"}] + r[1:], "image"),
])
def test_data_errors_name_file_line_and_field(tmp_path: Path, mutate, field: str) -> None:
    folder = write_mmr(tmp_path, mutate(list(SMALL)))
    with pytest.raises(DataError) as err:
        load(MMRConfig(data=str(folder)))
    assert err.value.field == field and err.value.file.endswith("MMR-benchmark.json") and err.value.line


def test_three_records_error_message(tmp_path: Path) -> None:
    folder = write_mmr(tmp_path, SMALL + [record("attribute/X/01", "NEG")])
    with pytest.raises(DataError, match="third record for id 'attribute/X/01'"):
        load(MMRConfig(data=str(folder)))


def test_missing_data_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(MMRConfig())
    with pytest.raises(DataError, match="MMR-benchmark.json"):
        load(MMRConfig(data=str(tmp_path)))


@pytest.mark.parametrize("field_name,value", [("qhash", "000000000000"), ("question_type", "NEG")])
def test_prediction_line_disagreeing_with_data(tmp_path: Path, field_name: str, value: str) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL))))
    answers = answers_for(data, SMALL_RIGHT)
    answers["attribute/X/01#0"][field_name] = value
    with pytest.raises(DataError) as err:
        score(data, answers, MMRConfig())
    assert err.value.field == field_name and "attribute/X/01#0" in str(err.value)


# --------------------------------------------------------------------------- predictions files (§2.3)


def read_predictions(path: Path, data) -> dict[str, dict]:
    from mmkit.core.backends import BackendConfig, GenerationSettings, PredictionsBackend

    requests = prompt(data, MMRConfig())
    backend = PredictionsBackend(BackendConfig(), "predictions", path=str(path), known_uids=[r.uid for r in requests],
                                 data=data, uid_of=BENCHMARK.uid_of)
    return {line["uid"]: line for line in backend.answer(requests, GenerationSettings())}


def test_predictions_file_by_uid_or_by_id_scores_the_same(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL))))
    lines = answers_for(data, SMALL_RIGHT).values()
    by_uid, by_id = tmp_path / "uid.jsonl", tmp_path / "id.jsonl"
    by_uid.write_text("".join(json.dumps({"uid": x["uid"], "prediction": x["prediction"]}) + "\n" for x in lines))
    by_id.write_text("".join(json.dumps({"id": x["uid"].split("#")[0], "question_type": x["question_type"],
                                         "prediction": x["prediction"]}) + "\n" for x in reversed(list(lines))))
    first = score(data, read_predictions(by_uid, data), MMRConfig())
    second = score(data, read_predictions(by_id, data), MMRConfig())
    assert first["metrics"]["ra"] == pytest.approx(25.0) and first["metrics"] == second["metrics"]


def test_duplicate_uid_in_a_predictions_file(tmp_path: Path) -> None:
    data = load(MMRConfig(data=str(write_mmr(tmp_path, SMALL))))
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps({"uid": "attribute/X/01#0", "prediction": "A"}) + "\n"
                    + json.dumps({"id": "attribute/X/01", "question_type": "POS", "prediction": "B"}) + "\n")
    with pytest.raises(DataError) as err:
        read_predictions(path, data)
    assert err.value.file == str(path) and err.value.line == 2 and err.value.field == "uid"


def test_a_missing_image_names_the_record_unless_a_predictions_file_is_scored(tmp_path: Path) -> None:
    folder = write_mmr(tmp_path, SMALL)
    (folder / "img.png").unlink()
    with pytest.raises(DataError) as err:
        load(MMRConfig(data=str(folder)))
    assert err.value.field == "image" and err.value.file.endswith("MMR-benchmark.json") and err.value.line
    assert "img.png" in str(err.value)
    assert load(MMRConfig(data=str(folder), predictions="answers.jsonl")).n == 4  # no images needed
