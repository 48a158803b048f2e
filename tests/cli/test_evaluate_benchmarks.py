"""``mmkit evaluate <benchmark>`` end to end through typer's CliRunner (evaluate.md §1, §3-§9): every
generation benchmark on a tiny model and a data set written here, a predictions file scored by
hand, bad inputs (one ``error:`` line, exit 2, no run folder) and the runner's routes (``--limit``
and ``--tasks`` against a full predictions file, CHAIR's decoding and per-caption file, SNARE's
direct-route lines and its resolved route in ``config_hash``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from mmkit.cli import build_app
from mmkit.evaluate.hallucination import clean_caption
from tests.cli.test_evaluate_generation import invoke, ok, one_error_line, runner
from tests.core.test_backends import FakeServer, ok_reply
from tests.evaluate.test_realbench import SAMPLES, write_samples
from tests.evaluate.test_run import lines_of, write_mmr
from tests.evaluate.test_snare import PROBES, write_probes

#: A new-token budget that keeps every tiny-model run short.
FEW_TOKENS = ("--max-new-tokens", "3")


def save_images(folder: Path, names: list[str]) -> Path:
    """Small RGB images of distinct colours (PIL), one per name."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40 + 8 * i, 30), (50 * i % 256, 120, 200)).save(folder / name)
    return folder


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- data of each benchmark


def realbench_case(root: Path) -> tuple[list[str], list[str]]:
    return ["--data", str(write_samples(root))], [s["id"] for s in SAMPLES]


def mmt_case(root: Path) -> tuple[list[str], list[str]]:
    folder = root / "3am"
    folder.mkdir()
    (folder / "test.en").write_text("a dog runs on the grass\na bank by the river\n", encoding="utf-8")
    (folder / "test.zh").write_text("一只狗在草地上跑\n河边的银行\n", encoding="utf-8")
    (folder / "images-test.txt").write_text("cc_1.png\nsbu_2.png\n", encoding="utf-8")
    save_images(folder / "images", ["cc_1.png", "sbu_2.png"])
    return ["--data", str(folder), "--split", "test"], ["test:1", "test:2"]


CHAIR_IMAGES = ["COCO_val2014_000000000042.png", "COCO_val2014_000000000007.png"]


def chair_case(root: Path) -> tuple[list[str], list[str]]:
    images = save_images(root / "val2014", CHAIR_IMAGES)
    gt = write_jsonl(root / "gt.jsonl", [
        {"image_id": "42", "objects": ["dog"], "captions": ["A man walks his dog."]},
        {"image_id": "7", "objects": ["dining table", "pizza"], "captions": ["A table with pizza."]}])
    return ["--gt", gt, "--images", str(images)], ["7", "42"]


def pope_case(root: Path) -> tuple[list[str], list[str]]:
    images = save_images(root / "img", ["a.png", "b.png"])
    questions = write_jsonl(root / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.png", "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": "b.png", "text": "Is there a person in the image?", "label": "yes"},
        {"question_id": 4, "image": "b.png", "text": "Is there an umbrella in the image?", "label": "no"}])
    return ["--data", questions, "--images", str(images)], [f"random:{i}" for i in range(1, 5)]


def snare_case(root: Path) -> tuple[list[str], list[str]]:
    """The yes/no route (tiny LLaVA's default): one request per caption, uid ``{id}#{j}``."""
    uids = [f"{p['id']}#{j}" for p in PROBES for j in range(len(p["captions"]))]
    return ["--data", str(write_probes(root))], uids


#: benchmark -> (data writer, the metrics keys its results.json documents, records it counts).
CASES: dict[str, tuple[Callable[[Path], tuple[list[str], list[str]]], set[str], int]] = {
    "realbench": (realbench_case, {"macro", "micro", "retrieval_accuracy", "ranking_exact_order_accuracy",
                                   "extraction_char_f1", "reasoning_accuracy", "n", "n_unparsed", "n_partial",
                                   "n_failed"}, len(SAMPLES)),
    "mmt": (mmt_case, {"bleu", "meteor", "bleu_signature"}, 2),
    "chair": (chair_case, {"chair_i", "chair_s", "n_captions", "n_mentions", "n_hallucinated", "n_empty", "bleu1",
                           "bleu2", "bleu4", "mean_words", "mean_chars", "distinct1", "distinct2"}, 2),
    "pope": (pope_case, {"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "n_default_yes"}, 4),
    "snare": (snare_case, {"accuracy", "macro_accuracy", "relationship_composition_accuracy",
                           "negation_logic_accuracy", "attribute_ownership_accuracy", "n", "n_ties", "n_unparsed",
                           "n_failed", "n_degenerate"}, len(PROBES)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_generation_benchmark_runs_end_to_end_on_tiny_llava(name, tmp_path, tiny_llava):
    write, keys, n_records = CASES[name]
    data_args, uids = write(tmp_path)
    out = tmp_path / "run"
    res = ok(invoke(name, "--model", tiny_llava, *data_args, *FEW_TOKENS, "--device", "cpu", "--out", str(out),
                    "-q", "--json"))
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == res
    assert res["method"] == name and res["command"] == f"evaluate {name}" and res["complete"] is True
    assert keys <= set(res["metrics"]), keys - set(res["metrics"])
    counts = dict(res["counts"])
    assert 0 <= counts.pop("unparsed") <= len(uids)
    assert counts == {"records": n_records, "requests": len(uids), "answered": len(uids), "failed": 0}
    assert res["models"]["model"]["class"] == "LlavaForConditionalGeneration" and res["data"]["n"] == n_records
    lines = lines_of(out / "predictions.jsonl")
    assert sorted(x["uid"] for x in lines) == sorted(uids)  # each uid exactly once
    assert all(x["error"] is None and x["config_hash"] == lines[0]["config_hash"] for x in lines)
    assert all(x["usage"]["completion_tokens"] <= 3 for x in lines)


def test_chair_writes_per_caption_rows_and_records_its_beam_decoding(tmp_path, tiny_llava):
    data_args, _ = chair_case(tmp_path)
    out = tmp_path / "run"
    args = ["chair", "--model", tiny_llava, *data_args, *FEW_TOKENS, "--device", "cpu", "--out", str(out), "-q"]
    res = ok(invoke(*args, "--json"))
    # unlearn.md §5.1: beam search, 5 beams, length penalty 0, unless the user says otherwise
    assert res["config"]["decoding"] == {"strategy": "beam search", "num_beams": 5, "length_penalty": 0.0,
                                         "temperature": 0.0, "top_p": None, "n": 1, "max_new_tokens": 3}
    assert "num_beams" not in res["config"] and res["config"]["generation"]["num_beams"] is None
    captions = {x["uid"]: x["prediction"] for x in lines_of(out / "predictions.jsonl")}
    rows = lines_of(out / "chair_per_caption.jsonl")
    assert [r["image_id"] for r in rows] == ["7", "42"]  # the evaluated images, in order
    assert all(set(r) == {"image_id", "caption", "mentions", "hallucinated"} for r in rows)
    assert all(r["caption"] == clean_caption(captions[r["image_id"]]) for r in rows)
    assert sum(len(r["mentions"]) for r in rows) == res["metrics"]["n_mentions"]
    assert sum(r["hallucinated"] for r in rows) * 50.0 == res["metrics"]["chair_s"]
    # --num-beams / --length-penalty are the generation settings: they change the hash and the decoding
    line = one_error_line(invoke(*args, "--num-beams", "1"))
    assert "config_hash" in line and "--overwrite" in line
    greedy = ok(invoke(*args, "--num-beams", "1", "--overwrite", "--json"))
    assert greedy["config"]["decoding"]["strategy"] == "greedy"
    assert greedy["config"]["generation"]["num_beams"] == 1
    two = ok(invoke(*args, "--num-beams", "2", "--length-penalty", "1.5", "--overwrite", "--json"))
    assert (two["config"]["decoding"]["num_beams"], two["config"]["decoding"]["length_penalty"]) == (2, 1.5)


def test_chair_over_http_is_greedy_and_says_so(tmp_path):
    data_args, _ = chair_case(tmp_path)
    with FakeServer(lambda body: ok_reply("A dog and a cat on a table.")) as server:
        res = ok(invoke("chair", "--base-url", server.url, "--model", "served-model", *data_args, "--out",
                        str(tmp_path / "run"), "-q", "--json"))
    assert len(server.bodies) == 2 and all(b["temperature"] == 0.0 and b["max_tokens"] == 200 for b in server.bodies)
    assert res["config"]["decoding"] == {"strategy": "greedy", "num_beams": 1, "temperature": 0.0, "top_p": None,
                                         "n": 1, "max_new_tokens": 200}
    assert any("num_beams 5 (beam search) needs the hf backend" in w for w in res["warnings"])
    # image 42 (dog): cat and table hallucinated; image 7 (table, pizza): dog and cat hallucinated
    assert (res["metrics"]["n_mentions"], res["metrics"]["n_hallucinated"]) == (6, 4)
    assert res["metrics"]["chair_i"] == pytest.approx(400 / 6) and res["metrics"]["chair_s"] == 100.0


def test_chair_help_shows_the_beam_defaults():
    result = runner.invoke(build_app(), ["evaluate", "chair", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--num-beams VALUE   (config key generation.num_beams; default: 5)" in result.output
    assert "--length-penalty VALUE   (config key generation.length_penalty; default: 0.0)" in result.output


def test_snare_cosine_with_tiny_clip_logs_each_probe(tmp_path, tiny_clip):
    out = tmp_path / "run"
    res = ok(invoke("snare", "--model", tiny_clip, "--data", str(write_probes(tmp_path)), "--device", "cpu",
                    "--out", str(out), "-q", "--json"))
    assert res["scoring"] == {"route": "cosine", "tie_policy": "strict"} and res["complete"] is True
    assert CASES["snare"][1] <= set(res["metrics"]) and res["metrics"]["n"] == 3
    assert res["counts"] == {"records": 3, "requests": 3, "answered": 3, "failed": 0, "unparsed": 0}
    lines = lines_of(out / "predictions.jsonl")
    assert [x["uid"] for x in lines] == [p["id"] for p in PROBES]
    assert [len(x["scores"]) for x in lines] == [len(p["captions"]) for p in PROBES]
    assert all(x["route"] == "cosine" and x["error"] is None and len(x["config_hash"]) == 64 for x in lines)
    # the lines are a predictions file: scoring them again gives the same metrics
    again = ok(invoke("snare", "--data", str(tmp_path / "probes.jsonl"), "--predictions",
                      str(out / "predictions.jsonl"), "--score", "cosine", "--out", str(tmp_path / "again"),
                      "-q", "--json"))
    assert again["metrics"] == res["metrics"]


def test_snare_config_hash_uses_the_resolved_route(tmp_path, tiny_llava):
    out = tmp_path / "run"
    args = ["snare", "--model", tiny_llava, "--data", str(write_probes(tmp_path)), *FEW_TOKENS, "--device", "cpu",
            "--out", str(out), "-q"]
    first = ok(invoke(*args, "--json"))
    assert first["scoring"]["route"] == "yesno"
    raw = (out / "predictions.jsonl").read_bytes()
    # the default route resolved to yesno, so naming it resumes the same run: nothing new is asked
    assert ok(invoke(*args, "--score", "yesno", "--json"))["metrics"] == first["metrics"]
    assert (out / "predictions.jsonl").read_bytes() == raw
    line = one_error_line(invoke(*args, "--score", "choice"))
    assert "config_hash" in line and "--overwrite" in line


def test_mmt_hyp_ref_logs_each_translation(tmp_path):
    hyp, ref = tmp_path / "hyp.zh", tmp_path / "ref.zh"
    hyp.write_text("一只狗在草地上跑\n银行\n", encoding="utf-8")
    ref.write_text("一只狗在草地上跑\n河边的银行\n", encoding="utf-8")
    out = tmp_path / "run"
    res = ok(invoke("mmt", "--hyp", str(hyp), "--ref", str(ref), "--out", str(out), "-q", "--json"))
    assert {"bleu", "meteor", "bleu_signature"} <= set(res["metrics"]) and res["counts"]["answered"] == 2
    lines = lines_of(out / "predictions.jsonl")
    assert [(x["uid"], x["prediction"]) for x in lines] == [("1", "一只狗在草地上跑"), ("2", "银行")]


# --------------------------------------------------------------------------- a predictions file, by hand


def mmr_answers(folder: Path, answers: dict[str, str]) -> str:
    """A predictions file answering the questions of ``write_mmr``'s two pairs (uid -> letter)."""
    return write_jsonl(folder / "answers.jsonl", [{"uid": u, "prediction": f"{a}."} for u, a in answers.items()])


#: write_mmr: pair 0 lists (POS, NEG), pair 1 (NEG, POS); every ground truth is A.
BOTH_RIGHT_AND_MISLED = {"attribute/color&texture/01#0": "A", "attribute/color&texture/01#1": "A",
                         "context/expert/02#0": "B", "context/expert/02#1": "A"}


def test_mmr_predictions_file_is_scored_by_hand(tmp_path):
    data = write_mmr(tmp_path / "mmr")
    preds = mmr_answers(tmp_path, BOTH_RIGHT_AND_MISLED)
    out = tmp_path / "run"
    res = ok(invoke("mmr", "--data", str(data), "--predictions", preds, "--out", str(out), "--json"))
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == res
    m = res["metrics"]
    # pair 0 both right; pair 1: POS right, NEG (leading) wrong = misled -> RA 1/2, MR 1/(1+1)
    assert (m["ra"], m["misleading_rate"], m["pos_acc"], m["neg_acc"]) == (50.0, 50.0, 100.0, 50.0)
    assert res["per_category"]["context/expert"]["ra"] == 0.0
    assert res["per_category"]["attribute/color&texture"]["ra"] == 100.0
    assert res["models"]["model"]["backend"] == "predictions" and res["config"]["decoding"] is None
    assert res["counts"] == {"records": 2, "requests": 4, "answered": 4, "failed": 0, "unparsed": 0}
    lines = lines_of(out / "predictions.jsonl")
    assert sorted(x["uid"] for x in lines) == sorted(BOTH_RIGHT_AND_MISLED)
    assert {x["uid"]: x["parsed"] for x in lines} == BOTH_RIGHT_AND_MISLED


def test_predictions_file_with_limit_ignores_the_records_left_out(tmp_path):
    data = write_mmr(tmp_path / "mmr")
    preds = mmr_answers(tmp_path, BOTH_RIGHT_AND_MISLED)
    res = ok(invoke("mmr", "--data", str(data), "--predictions", preds, "--limit", "1", "--out",
                    str(tmp_path / "run"), "-q", "--json"))
    assert res["complete"] is False and res["counts"]["records"] == 1 and res["counts"]["requests"] == 2
    assert res["metrics"]["ra"] == 100.0
    assert len(lines_of(tmp_path / "run" / "predictions.jsonl")) == 2


def test_realbench_tasks_ignore_predictions_of_other_tasks(tmp_path):
    data = write_samples(tmp_path)
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"uid": "k1", "prediction": "3,1,2"},
                                                    {"uid": "k2", "prediction": "1,2,4,3"},
                                                    *({"uid": s["id"], "prediction": "A"} for s in SAMPLES
                                                      if s["task"] != "ranking")])
    res = ok(invoke("realbench", "--data", str(data), "--predictions", preds, "--tasks", "ranking", "--out",
                    str(tmp_path / "run"), "-q", "--json"))
    assert list(res["per_category"]) == ["ranking"] and res["counts"]["requests"] == 2
    # k1 exact; k2 has one discordant pair of 6: tau = (5 - 1) / 6
    assert res["metrics"]["ranking_exact_order_accuracy"] == 50.0
    assert res["per_category"]["ranking"]["kendall_tau"] == pytest.approx((1 + 4 / 6) / 2)
    assert sorted(x["uid"] for x in lines_of(tmp_path / "run" / "predictions.jsonl")) == ["k1", "k2"]


# --------------------------------------------------------------------------- bad inputs


def write_mmr_jsonl(folder: Path, change: Callable[[list[dict]], None]) -> Path:
    """write_mmr's records as a JSONL (one record a line, so errors name distinct lines), changed."""
    write_mmr(folder)
    records = json.loads((folder / "MMR-benchmark.json").read_text(encoding="utf-8"))
    (folder / "MMR-benchmark.json").unlink()
    change(records)
    write_jsonl(folder / "mmr.jsonl", records)
    return folder / "mmr.jsonl"


def test_an_mmr_record_without_question_type(tmp_path):
    data = write_mmr_jsonl(tmp_path / "mmr", lambda recs: recs[2].pop("question_type"))
    out = tmp_path / "run"
    line = one_error_line(invoke("mmr", "--model", "unused", "--data", str(data), "--out", str(out)))
    assert f"{data}:3: question_type:" in line and "missing" in line and not out.exists()


def test_an_image_that_does_not_exist(tmp_path):
    data = write_mmr_jsonl(tmp_path / "mmr", lambda recs: recs[3].update(image="nowhere.png"))
    out = tmp_path / "run"
    line = one_error_line(invoke("mmr", "--model", "unused", "--data", str(data), "--out", str(out)))
    assert f"{data}:4: image:" in line and "nowhere.png" in line and not out.exists()


def test_a_predictions_file_naming_unknown_ids(tmp_path):
    data = write_mmr(tmp_path / "mmr")
    preds = mmr_answers(tmp_path, {**BOTH_RIGHT_AND_MISLED, "context/expert/99#0": "A"})
    out = tmp_path / "run"
    line = one_error_line(invoke("mmr", "--data", str(data), "--predictions", preds, "--out", str(out)))
    assert f"{preds}: uid:" in line and "'context/expert/99#0' (line 5)" in line and "--ignore-extra" in line
    assert not out.exists()
    res = ok(invoke("mmr", "--data", str(data), "--predictions", preds, "--ignore-extra", "--out", str(out), "-q",
                    "--json"))
    assert res["metrics"]["ra"] == 50.0


def test_a_predictions_file_whose_qhash_disagrees_with_the_data(tmp_path):
    data = write_mmr(tmp_path / "mmr")
    rows = [{"uid": u, "prediction": a, "qhash": "0" * 12 if u.endswith("#1") else None}
            for u, a in BOTH_RIGHT_AND_MISLED.items()]
    preds = write_jsonl(tmp_path / "answers.jsonl", [{k: v for k, v in r.items() if v is not None} for r in rows])
    out = tmp_path / "run"
    line = one_error_line(invoke("mmr", "--data", str(data), "--predictions", preds, "--out", str(out)))
    assert f"{preds}: qhash: uid attribute/color&texture/01#1: '000000000000' does not match" in line
    assert not out.exists()
