"""Tests of mmkit/evaluate/realbench.py and its text metrics in mmkit/evaluate/metrics/text.py (evaluate.md §4, §9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmkit.core.data import tile_images
from mmkit.errors import DataError, MmkitError
from mmkit.evaluate import get_benchmark
from mmkit.evaluate.metrics import text as tm
from mmkit.evaluate.realbench import BENCHMARK, INSTRUCTIONS, RealBenchConfig, load, parse, prompt, score

SAMPLES = [
    {"id": "r1", "task": "retrieval", "images": ["img/a.png", "img/b.png", "img/c.png"],
     "question": "哪张图片拍到了店铺的营业时间？", "options": None, "answer_type": "image_index", "answer": "2"},
    {"id": "r2", "task": "retrieval", "images": ["img/a.png", "img/b.png"],
     "question": "哪张图片是夜景？", "options": None, "answer_type": "image_index", "answer": "1"},
    {"id": "k1", "task": "ranking", "images": ["img/a.png", "img/b.png", "img/c.png"],
     "question": "请按制作步骤的先后顺序排列这些图片。", "options": None, "answer_type": "order", "answer": [3, 1, 2]},
    {"id": "k2", "task": "ranking", "images": ["img/a.png", "img/b.png", "img/c.png", "img/d.png"],
     "question": "请按时间顺序排列这些图片。", "options": None, "answer_type": "order", "answer": [1, 2, 3, 4]},
    {"id": "e1", "task": "extraction", "images": ["img/a.png", "img/b.png"], "question": "这家餐厅的地址是什么？",
     "options": None, "answer_type": "text", "answer": "浦东新区世纪大道100号",
     "references": ["上海市浦东新区世纪大道100号"]},
    {"id": "x1", "task": "reasoning", "images": ["img/a.png", "img/b.png"],
     "question": "对比两张价签，这件外套在哪家店更便宜？", "options": ["第一家", "第二家", "一样贵", "无法判断"],
     "answer_type": "choice", "answer": "B"},
    {"id": "x2", "task": "reasoning", "images": ["img/a.png", "img/b.png"], "question": "哪家店更远？",
     "options": ["第一家", "第二家"], "answer_type": "choice", "answer": "A"},
]


def write_samples(root: Path, samples=SAMPLES, name: str = "samples.jsonl") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate("abcd"):
        Image.new("RGB", (40 + 10 * i, 30), (60 * i, 100, 200)).save(root / "img" / f"{stem}.png")
    path = root / name
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def line(prediction: str | None, error: str | None = None) -> dict:
    return {"prediction": prediction or "", "error": error}


# --------------------------------------------------------------------------- text metrics (§9 list)


def test_char_f1_and_rouge_l_hand_values():
    assert tm.char_f1("北京市", "北京") == pytest.approx(80.0)
    assert tm.char_f1("上海浦东", "浦东新区") == pytest.approx(50.0)
    assert tm.char_f1("东浦", "浦东") == pytest.approx(100.0)
    assert tm.rouge_l("东浦", "浦东") == pytest.approx(50.0)
    assert tm.char_f1("", "") == 100.0 and tm.char_f1("，。", "北京") == 0.0 and tm.rouge_l("", "北京") == 0.0


def test_normalisation_drops_punctuation_and_spaces_keeps_percent_and_symbols():
    assert tm.normalize_text("增长 5%，达到 ¥30。") == "增长5%达到¥30"
    assert tm.normalize_text("ＡＢ　Ｃ！") == "abc"  # NFKC full-width, lowercase, ideographic space
    assert tm.char_f1("北京，", "北 京。") == 100.0


def test_kendall_tau():
    assert tm.kendall_tau([1, 3, 2, 4], [1, 2, 3, 4]) == pytest.approx(0.6667, abs=1e-4)
    assert tm.kendall_tau([4, 3, 2, 1], [1, 2, 3, 4]) == -1.0
    assert tm.kendall_tau([2, 1, 3], [2, 1, 3]) == 1.0


@pytest.mark.parametrize("text", ["图3", "第三张", "答案是 3", "答案：图 3。", "应该是第3幅", "图三"])
def test_image_index_mentions_parse_to_3(text):
    assert tm.parse_image_index(text, 5) == 3


def test_image_index_priority_range_and_numerals():
    assert tm.parse_image_index("共5张图，图2最清楚", 5) == 2      # 图 k beats an earlier bare integer
    assert tm.parse_image_index("第二张，不是图9", 5) == 2         # an out-of-range 图 9 is skipped
    assert tm.parse_image_index("第十二张", 20) == 12
    assert tm.parse_image_index("图两", 3) == 2
    assert tm.parse_image_index("不知道", 3) is None and tm.parse_image_index("7", 3) is None
    assert [tm.chinese_int(s) for s in ("十", "十五", "二十", "九十九", "十十", "二二")] == [10, 15, 20, 99, None, None]


def test_order_parse_partial_and_unparsed():
    assert tm.parse_order("2,1", 3) == ([2, 1, 3], True)
    assert tm.parse_order("图3，然后图1，最后图2，图3", 3) == ([3, 1, 2], False)  # first occurrence kept
    assert tm.parse_order("5,2,1,3", 3) == ([2, 1, 3], False)                # out of range dropped
    assert tm.parse_order("无法判断", 3) == (None, False)


def test_choice_letter_parse():
    options = ["第一家", "第二家", "一样贵", "无法判断"]
    assert tm.parse_letter("I think B.", options) == "B"    # "I" is out of range (4 options)
    assert tm.parse_letter("答案：C", options) == "C"
    assert tm.parse_letter("ABC", options) is None          # no standalone letter, no option text
    assert tm.parse_letter("第二家。", options) == "B"      # normalised option text
    assert tm.parse_letter("E", options) is None


def test_word_f1_uses_jieba_words():
    pytest.importorskip("jieba")
    import jieba

    pred, gold = "浦东新区世纪大道", "上海市浦东新区世纪大道"
    words = lambda s: [w for w in jieba.lcut(s, cut_all=False) if w.strip()]  # noqa: E731
    assert tm.word_tokens(pred) == words(pred)
    common = sum(min(words(pred).count(w), words(gold).count(w)) for w in set(words(pred)))
    p, r = common / len(words(pred)), common / len(words(gold))
    assert tm.word_f1(pred, gold) == pytest.approx(100 * 2 * p * r / (p + r))
    assert tm.word_tokens("北京，上海。") == ["北京", "上海"]  # punctuation-only tokens dropped


def test_seven_images_tile_into_a_3x3_grid(tmp_path):
    images = [Image.new("RGB", (20 + 5 * i, 10 + 3 * i), (30 * i, 200, 90)) for i in range(7)]
    grid = tile_images(images, tile_size=64)
    assert grid.size == (3 * 64, 3 * 64)
    assert grid.getpixel((64 + 60, 2 * 64 + 60)) == (255, 255, 255)  # 8th cell empty: white
    assert grid.getpixel((1, 1)) == (0, 0, 0)                         # index box top-left


# --------------------------------------------------------------------------- schema and loading


def test_load_resolves_images_and_filters_tasks(tmp_path):
    path = write_samples(tmp_path)
    data = load(RealBenchConfig(data=str(path)))
    assert [s.id for s in data.records] == ["r1", "r2", "k1", "k2", "e1", "x1", "x2"]
    assert data.records[0].images[1] == str(tmp_path / "img/b.png") and data.records[0].answer == 2
    assert data.records[2].answer == (3, 1, 2) and data.sha256 and data.n == 7
    only = load(RealBenchConfig(data=str(path), tasks=["ranking", "extraction"]))
    assert [s.id for s in only.records] == ["k1", "k2", "e1"]
    assert [s.id for s in load(RealBenchConfig(data=str(path), limit=2)).records] == ["r1", "r2"]


@pytest.mark.parametrize("change, field, message", [
    ({"images": ["img/a.png", "img/b.png", "img/missing.png"]}, "images[2]", "image file not found"),
    ({"task": "counting"}, "task", "expected one of retrieval"),
    ({"answer_type": "choice", "options": ["x", "y"], "answer": "C"}, "answer", "option letter A-B"),
    ({"answer_type": "choice", "answer": "A"}, "options", "needs options"),
    ({"answer": "4"}, "answer", "image index"),
    ({"answer_type": "order", "answer": [1, 1, 2]}, "answer", "permutation of 1..3"),
    ({"answer_type": "text", "answer": "  "}, "answer", "non-empty text"),
    ({"question": None}, "question", "missing field"),
])
def test_schema_errors_name_file_line_and_field(tmp_path, change, field, message):
    bad = [SAMPLES[0], SAMPLES[1], {**SAMPLES[0], "id": "bad", **change}]
    path = write_samples(tmp_path, bad)
    with pytest.raises(DataError, match=message) as err:
        load(RealBenchConfig(data=str(path)))
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 3, field)
    assert str(err.value).startswith(f"{path}:3: {field}: ")


def test_order_needs_two_images_and_ids_are_unique(tmp_path):
    one = {**SAMPLES[2], "images": ["img/a.png"], "answer": [1]}
    with pytest.raises(DataError, match="at least 2 images"):
        load(RealBenchConfig(data=str(write_samples(tmp_path, [one]))))
    with pytest.raises(DataError, match="duplicate id 'r1' \\(first at line 1\\)") as err:
        load(RealBenchConfig(data=str(write_samples(tmp_path, [SAMPLES[0], SAMPLES[0]]))))
    assert err.value.line == 2
    with pytest.raises(MmkitError, match="no RealBench samples of the tasks ranking"):
        load(RealBenchConfig(data=str(write_samples(tmp_path, [SAMPLES[0]])), tasks=["ranking"]))


def test_unknown_task_flag_is_a_config_error():
    from mmkit.config import load_config

    cfg = load_config(RealBenchConfig, flags={"tasks": "ranking,extraction", "word_f1": True})
    assert cfg.tasks == ["ranking", "extraction"] and cfg.word_f1
    with pytest.raises(MmkitError, match="expected one of retrieval, ranking, extraction, reasoning"):
        load_config(RealBenchConfig, flags={"tasks": "ranking,ocr"})


# --------------------------------------------------------------------------- prompt and parse


def test_prompt_interleaves_numbered_images_then_question_options_instruction(tmp_path):
    data = load(RealBenchConfig(data=str(write_samples(tmp_path))))
    requests = {r.uid: r for r in prompt(data, RealBenchConfig())}
    x1 = requests["x1"]
    assert x1.parts == (("text", "图1："), ("image", str(tmp_path / "img/a.png")), ("text", "\n图2："),
                        ("image", str(tmp_path / "img/b.png")),
                        ("text", "\n对比两张价签，这件外套在哪家店更便宜？\nA. 第一家\nB. 第二家\nC. 一样贵\nD. 无法判断\n"
                                 + INSTRUCTIONS["choice"]))
    assert x1.images == (str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png"))
    assert x1.extras == {"task": "reasoning", "answer_type": "choice", "options": ["第一家", "第二家", "一样贵", "无法判断"]}
    assert requests["k1"].text.endswith("请按顺序列出全部图片编号，用英文逗号分隔，例如 2,1,3。")
    assert [requests[u].max_new_tokens for u in ("r1", "k1", "e1", "x1")] == [64, 64, 256, 64]
    assert parse("第三张", requests["k1"]) == [3, 1, 2]
    assert parse("图3", requests["r1"]) == 3 and parse("第二家", x1) == "B" and parse("  地址 ", requests["e1"]) == "地址"


# --------------------------------------------------------------------------- scoring


ANSWERS = {"r1": line("图2"), "r2": line("不知道"), "k1": line("3,1,2"), "k2": line("1,3"),
           "e1": line("世纪大道100号"), "x1": line("B"), "x2": line(None, error="HTTP 400")}


def test_score_hand_computed(tmp_path):
    data = load(RealBenchConfig(data=str(write_samples(tmp_path))))
    out = score(data, ANSWERS, RealBenchConfig())
    per = out["per_category"]
    assert list(per) == ["retrieval", "ranking", "extraction", "reasoning"]
    assert per["retrieval"]["accuracy"] == 50.0 and per["retrieval"]["n_unparsed"] == 1
    # k2: "1,3" of 4 images -> [1, 3, 2, 4] (partial), tau 4/6
    assert per["ranking"]["exact_order_accuracy"] == 50.0 and per["ranking"]["n_partial"] == 1
    assert per["ranking"]["kendall_tau"] == pytest.approx((1 + 2 / 3) / 2)
    assert per["ranking"]["kendall_tau_percent"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    # e1: 8 common characters of 8 predicted, 12 in the answer (15 in the reference): max F1 = 80
    assert per["extraction"]["char_f1"] == pytest.approx(80.0) and per["extraction"]["accuracy"] == 0.0
    assert per["extraction"]["rouge_l"] == pytest.approx(80.0) and "word_f1" not in per["extraction"]
    assert per["reasoning"]["accuracy"] == 50.0 and per["reasoning"]["n_failed"] == 1
    m = out["metrics"]
    assert m["macro"] == pytest.approx((50 + 50 + 80 + 50) / 4)
    assert m["micro"] == pytest.approx((100 + 0 + 100 + 0 + 80 + 100 + 0) / 7)
    assert (m["retrieval_accuracy"], m["ranking_exact_order_accuracy"], m["extraction_char_f1"],
            m["reasoning_accuracy"]) == (50.0, 50.0, pytest.approx(80.0), 50.0)
    assert (m["n"], m["n_unparsed"], m["n_partial"], m["n_failed"]) == (7, 1, 1, 1)
    assert all(per[t]["n"] == n for t, n in (("retrieval", 2), ("ranking", 2), ("extraction", 1), ("reasoning", 2)))


def test_missing_unparsed_and_reference_answers(tmp_path):
    data = load(RealBenchConfig(data=str(write_samples(tmp_path))))
    out = score(data, {"e1": line("上海市浦东新区世纪大道100号。"), "k1": line("不知道")}, RealBenchConfig())
    per = out["per_category"]
    assert per["extraction"]["accuracy"] == 100.0 and per["extraction"]["char_f1"] == 100.0  # a reference
    assert per["ranking"]["kendall_tau"] == 0.0 and per["ranking"]["n_unparsed"] == 1       # unparsed: tau 0
    assert per["retrieval"]["accuracy"] == 0.0 and per["retrieval"]["n_failed"] == 2        # missing = wrong
    assert out["metrics"]["n_failed"] == 5


def test_word_f1_is_added_and_its_tokenizer_recorded(tmp_path):
    jieba = pytest.importorskip("jieba")
    data = load(RealBenchConfig(data=str(write_samples(tmp_path)), tasks=["extraction"]))
    out = score(data, {"e1": line("浦东新区世纪大道100号")}, RealBenchConfig(word_f1=True))
    assert out["per_category"]["extraction"]["word_f1"] == 100.0
    assert out["word_f1_tokenizer"] == f"jieba {jieba.__version__} (cut_all=False)"
    assert list(out["per_category"]) == ["extraction"] and out["metrics"]["macro"] == 100.0


def test_registered_benchmark_and_predictions_run(tmp_path):
    """Through the runner with a predictions file: results.json carries the §4 blocks."""
    from mmkit.evaluate.run import evaluate

    bench = get_benchmark("realbench")
    assert bench is BENCHMARK and bench.flags == {"--tasks": "tasks", "--word-f1": "word_f1"}
    path = write_samples(tmp_path)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"uid": uid, "prediction": a["prediction"]}, ensure_ascii=False) + "\n"
                             for uid, a in ANSWERS.items() if a["error"] is None), encoding="utf-8")
    cfg = RealBenchConfig(data=str(path), predictions=str(preds), allow_missing=True)
    results = evaluate("realbench", cfg, out=str(tmp_path / "run"))
    assert results["method"] == "realbench" and results["complete"] is False
    assert results["metrics"]["macro"] == pytest.approx((50 + 50 + 80 + 50) / 4)
    assert results["per_category"]["ranking"]["n_partial"] == 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert saved["metrics"] == results["metrics"]
