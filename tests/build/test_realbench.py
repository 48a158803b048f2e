"""mmkit/build/realbench.py: RealBench sample validation and statistics (build.md §6 tests 1-5)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmkit.build import realbench as rb
from mmkit.config import load_config
from mmkit.errors import DataError

pytest.importorskip("jieba")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (200, 137), (255, 0, 0)).save(d / "small.jpg")
    Image.new("RGB", (1080, 3500), (0, 255, 0)).save(d / "tall.png")
    Image.new("RGB", (400, 300), (0, 0, 255)).save(d / "mid.webp")
    Image.new("RGB", (20, 300)).save(d / "thin.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def sample(i, task="retrieval", images=("imgs/small.jpg", "imgs/tall.png"), **kw):
    row = {"id": f"rb-{i:04d}", "task": task, "images": list(images), "question": "哪张图片拍到了店铺的营业时间？",
           "options": None, "answer_type": "image_index", "answer": "1"}
    row.update(kw)
    return row


def write(tmp_path, rows, name="samples.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build(path, tmp_path, name="o", **flags):
    cfg = load_config(rb.RealBenchBuildConfig, flags={"samples": str(path), **flags})
    return rb.run(cfg, str(tmp_path / name))


def test_resolution_bins_and_hand_counts(images, tmp_path):
    rows = [sample(3, images=("imgs/small.jpg", "imgs/tall.png", "imgs/mid.webp")),
            sample(1),
            sample(2, task="ranking", answer_type="order", answer=[2, 1], question="请按制作步骤的先后顺序排列这些图片。"),
            sample(4, task="reasoning", answer_type="choice", answer="B", options=["第一家", "第二家"],
                   question="对比两张价签，这件外套在哪家店更便宜？")]
    m = build(write(tmp_path, rows), tmp_path)
    out = tmp_path / "o"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    # images: small x4, tall x4, mid x1
    assert stats["width"] == {"histogram": {"200": 4, "400": 1, "1000": 4}, "min": 200, "max": 1080}
    assert stats["height"] == {"histogram": {"100": 4, "300": 1, "3500": 4}, "min": 137, "max": 3500}
    # 200/137 = 1.46 -> [1.25, 1.5); 1080/3500 = 0.31 -> [0.25, 0.5); 400/300 = 1.33 -> [1.25, 1.5)
    assert stats["aspect_ratio"] == {"histogram": {"0.25": 4, "1.25": 5}}
    assert stats["images_per_sample"] == {"histogram": {"2": 3, "3": 1}, "mean": 2.25, "median": 2.0, "max": 3}
    assert stats["tasks"] == {"ranking": {"count": 1, "percent": 25.0}, "reasoning": {"count": 1, "percent": 25.0},
                              "retrieval": {"count": 2, "percent": 50.0}}
    assert stats["images_per_task"]["retrieval"] == {"samples": 2, "images": 5, "mean": 2.5}
    assert stats["megapixels"]["min"] == pytest.approx(0.0274) and stats["megapixels"]["max"] == pytest.approx(3.78)
    assert stats["question_chars"]["max"] == len("对比两张价签，这件外套在哪家店更便宜？")
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == ["rb-0001", "rb-0002", "rb-0003", "rb-0004"]
    assert list(lines[0]) == ["id", "task", "images", "question", "options", "answer_type", "answer"]
    assert lines[0]["images"] == ["../imgs/small.jpg", "../imgs/tall.png"]
    assert lines[1]["answer"] == [2, 1]
    assert (out / "stats.md").read_text(encoding="utf-8").startswith("# RealBench build statistics\n")
    for name in ("images_per_sample", "width", "height", "aspect_ratio", "question_tokens"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["metrics"]["stages"] == [{"name": "validate", "in": 4, "kept": 4, "dropped": {}},
                                      {"name": "export", "in": 4, "kept": 4, "dropped": {}}]


def test_output_validates_with_the_evaluator(images, tmp_path):
    from mmkit.evaluate.realbench import check_record
    from mmkit.io import read_records

    build(write(tmp_path, [sample(1), sample(2)]), tmp_path, copy_images=True)
    out = tmp_path / "o"
    for rec in read_records(str(out / "samples.jsonl")):
        s = check_record(rec, out)
        assert rec["images"] == [f"images/{rec['id']}/1.jpg", f"images/{rec['id']}/2.png"]
        assert all((out / p).is_file() for p in rec["images"])
        assert len(s.images) == 2


def test_english_question_fails_cjk_ratio(images, tmp_path):
    rows = [sample(1), sample(2, question="Which photo shows the opening hours?")]
    path = write(tmp_path, rows)
    with pytest.raises(DataError, match=r"samples.jsonl:2: question: CJK ratio 0.00 is below --min-cjk-ratio 0.5"):
        build(path, tmp_path)
    assert not (tmp_path / "o").exists()
    m = build(path, tmp_path, on_invalid="skip")
    assert m["metrics"]["stages"][0] == {"name": "validate", "in": 2, "kept": 1, "dropped": {"cjk_ratio": 1}}
    dropped = [json.loads(x) for x in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert dropped == [{"id": "rb-0002", "reason": "cjk_ratio"}]


def test_missing_third_image_names_line_and_field(images, tmp_path):
    rows = [sample(1), sample(2), sample(3, images=("imgs/small.jpg", "imgs/tall.png", "imgs/gone.jpg"))]
    path = write(tmp_path, rows)
    with pytest.raises(DataError) as exc:
        build(path, tmp_path)
    assert str(exc.value).startswith(f"{path}:3: images[2]: image file not found")
    assert not (tmp_path / "o").exists()


def test_image_count_and_image_checks(images, tmp_path):
    with pytest.raises(DataError, match=r":1: images: expected 2 to 20 images, got 1"):
        build(write(tmp_path, [sample(1, images=("imgs/small.jpg",))]), tmp_path)
    with pytest.raises(DataError, match=r":1: images\[1\]: image is 20x300; both sides must be >= 32 px"):
        build(write(tmp_path, [sample(1, images=("imgs/small.jpg", "imgs/thin.png"))]), tmp_path)
    with pytest.raises(DataError, match=r":1: images\[0\]: unreadable image"):
        build(write(tmp_path, [sample(1, images=("imgs/broken.jpg", "imgs/tall.png"))]), tmp_path)
    m = build(write(tmp_path, [sample(1, images=("imgs/small.jpg", "imgs/small.jpg"))]), tmp_path)
    assert any("images[1] is the same image as images[0]" in w for w in m["warnings"])


def test_text_hygiene_and_tokens(images, tmp_path):
    assert rb.text_problem("营业\u0007时间") == "expected no control characters except \\n, found U+0007"
    assert rb.text_problem("e\u0301") == "expected NFC-normalised text"
    assert rb.text_problem("第一行\n第二行") is None
    assert rb.cjk_ratio("营业时间 ok") == pytest.approx(4 / 6)
    assert rb.cjk_ratio("123 ？") == 0.0
    rows = [sample(1, task="extraction", answer_type="text", answer="地址\u0000")]
    with pytest.raises(DataError, match=r":1: answer: expected no control characters"):
        build(write(tmp_path, rows), tmp_path)
    with pytest.raises(DataError, match=r":1: question: 1 jieba token\(s\), fewer than --min-tokens 2"):
        build(write(tmp_path, [sample(1, question="店")]), tmp_path)


def test_schema_errors_and_duplicates(images, tmp_path):
    with pytest.raises(DataError, match=r":1: task: expected one of retrieval"):
        build(write(tmp_path, [sample(1, task="counting")]), tmp_path)
    with pytest.raises(DataError, match=r":2: id: duplicate id 'rb-0001'"):
        build(write(tmp_path, [sample(1), sample(1)]), tmp_path)


def test_folder_input(images, tmp_path):
    posts = tmp_path / "posts"
    for i in (2, 1):
        d = posts / f"p{i}"
        d.mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(d / "a.png")
        Image.new("RGB", (64, 48)).save(d / "b.jpg")
        (d / "sample.json").write_text(json.dumps(sample(i, images=("a.png", "b.jpg")), ensure_ascii=False),
                                       encoding="utf-8")
    cfg = load_config(rb.RealBenchBuildConfig, flags={"folder": str(posts), "link_images": True})
    rb.run(cfg, str(tmp_path / "o"))
    lines = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert [x["images"] for x in lines] == [["images/rb-0001/1.png", "images/rb-0001/2.jpg"],
                                            ["images/rb-0002/1.png", "images/rb-0002/2.jpg"]]
    assert (tmp_path / "o" / "images" / "rb-0001" / "1.png").is_symlink()
