"""MMT on the 3AM layout (evaluate.md §7, tests in §9): BLEU/METEOR, ``--hyp/--ref``, the generation route."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mmkit.errors import ConfigError, DataError
from mmkit.evaluate.metrics.text import (corpus_bleu, corpus_meteor, count_chunks, exact_alignment,
                                         meteor_sentence, zh_tokens)
from mmkit.evaluate.mmt import BENCHMARK, INSTRUCTION, MMTConfig, load, prompt, score, score_direct


def write(path: Path, lines: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- --hyp / --ref


def test_identical_five_characters_through_hyp_ref(tmp_path: Path) -> None:
    hyp, ref = write(tmp_path / "hyp.zh", ["我爱北京天"]), write(tmp_path / "ref.zh", ["我爱北京天"])
    cfg = MMTConfig(hyp=hyp, ref=ref)
    out = score_direct(load(cfg), cfg)
    m = out["metrics"]
    assert set(m) == {"bleu", "meteor", "bleu_signature"}
    assert m["bleu"] == pytest.approx(100.0)
    assert m["meteor"] == pytest.approx(99.60)  # one chunk: penalty 0.5 * (1/5)^3 = 0.004
    assert m["bleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:zh|smooth:exp|version:")


def test_hyp_ref_line_counts_must_match(tmp_path: Path) -> None:
    hyp = write(tmp_path / "hyp.zh", ["一", "二"])
    ref = write(tmp_path / "ref.zh", ["一", "二", "三"])
    with pytest.raises(DataError) as err:
        load(MMTConfig(hyp=hyp, ref=ref))
    assert err.value.file == hyp and err.value.line == 3 and ref in str(err.value)


def test_hyp_needs_ref_and_excludes_data(tmp_path: Path) -> None:
    hyp = write(tmp_path / "hyp.zh", ["一"])
    with pytest.raises(ConfigError):
        load(MMTConfig(hyp=hyp))
    with pytest.raises(ConfigError):
        load(MMTConfig(hyp=hyp, ref=hyp, data=str(tmp_path)))
    with pytest.raises(ConfigError):
        load(MMTConfig())


# --------------------------------------------------------------------------- metrics


def test_meteor_hand_computed() -> None:
    # two swapped chunks: 4 matches, 2 chunks -> penalty 0.5 * (2/4)^3 = 0.0625, F_mean 1
    assert meteor_sentence(zh_tokens("北京天安"), zh_tokens("天安北京")) == pytest.approx(0.9375)
    # P = 2/3, R = 1/2: F_mean = (1/3) / (0.9*2/3 + 0.1*1/2) = 0.51282; one chunk of 2: penalty 0.0625
    assert meteor_sentence(zh_tokens("我爱猫"), zh_tokens("我爱狗狗")) == pytest.approx((1 / 3) / 0.65 * 0.9375)
    assert meteor_sentence(zh_tokens("猫"), zh_tokens("狗")) == 0.0
    assert meteor_sentence([], zh_tokens("狗")) == 0.0
    assert count_chunks(exact_alignment(list("abab"), list("abab"))) == 1


def test_meteor_equals_nltk_without_synonyms() -> None:
    meteor = pytest.importorskip("nltk.translate.meteor_score")

    class NoSynsets:  # a synonym source that returns nothing (WordNet does not apply to Chinese)
        def synsets(self, *args, **kwargs):
            return []

    rng = random.Random(0)
    chars = "我爱北京天安门的猫狗在"
    for _ in range(300):
        h = [rng.choice(chars) for _ in range(rng.randint(0, 10))]
        r = [rng.choice(chars) for _ in range(rng.randint(1, 10))]
        assert meteor_sentence(h, r) == pytest.approx(meteor.single_meteor_score(r, h, wordnet=NoSynsets()))


def test_zh_tokens_and_lowercased_bleu() -> None:
    assert zh_tokens("A Dog在草地上") == ["a", "dog", "在", "草", "地", "上"]
    bleu, _ = corpus_bleu(["A Dog在草地上跑"], ["a dog在草地上跑"])
    assert bleu == pytest.approx(100.0)
    assert corpus_meteor(["A Dog在草地上跑", "猫"], ["a dog在草地上跑", "狗"]) == pytest.approx(
        50.0 * (1 - 0.5 * (1 / 7) ** 3))


# --------------------------------------------------------------------------- 3AM generation route


@pytest.fixture
def threeam(tmp_path: Path) -> Path:
    folder = tmp_path / "3am"
    write(folder / "test.en", ["a dog runs on the grass", "a bank by the river"])
    write(folder / "test.zh", ["一只狗在草地上跑", "河边的银行"])
    write(folder / "images-test.txt", ["cc_1.jpg", "sbu_2.jpg"])
    touch_images(folder / "images")
    return folder


def touch_images(folder: Path, names: tuple[str, ...] = ("cc_1.jpg", "sbu_2.jpg")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not decoded by load")


def test_load_and_prompt(threeam: Path, tmp_path: Path) -> None:
    touch_images(tmp_path / "img")
    cfg = MMTConfig(data=str(threeam), image_root=str(tmp_path / "img"))
    data = load(cfg)
    requests = prompt(data, cfg)
    assert [r.uid for r in requests] == ["test:1", "test:2"]
    assert requests[1].text == ("Translate the following English sentence into Chinese. Output only the translation."
                                "\na bank by the river")
    assert requests[1].text.split("\n")[0] == INSTRUCTION
    assert requests[1].images == (str(tmp_path / "img" / "sbu_2.jpg"),)
    assert prompt(load(MMTConfig(data=str(threeam))), cfg)[0].images == (str(threeam / "images" / "cc_1.jpg"),)
    assert score_direct(data, cfg) is None and BENCHMARK.max_new_tokens == 128
    assert load(MMTConfig(data=str(threeam), limit=1)).n == 1


def test_score_generation_route(threeam: Path) -> None:
    cfg = MMTConfig(data=str(threeam))
    data = load(cfg)
    answers = {"test:1": {"prediction": "  一只狗在草地上跑\nExplanation: ...", "error": None},
               "test:2": {"prediction": "河边的银行", "error": None}}
    out = score(data, answers, cfg)
    assert out["metrics"]["bleu"] == pytest.approx(100.0)
    assert out["metrics"]["meteor"] == pytest.approx(100 * (1 - 0.5 * ((1 / 8) ** 3 + (1 / 5) ** 3) / 2))
    assert out["warnings"] == []
    assert BENCHMARK.parse("  一只狗\n解释", None) == "一只狗"
    # a failed answer is an empty translation, with a warning
    answers["test:2"] = {"prediction": "", "error": "HTTP 500"}
    failed = score(data, answers, cfg)
    assert failed["metrics"]["meteor"] == pytest.approx(100 * (1 - 0.5 * (1 / 8) ** 3) / 2)
    assert failed["warnings"] == ["1 of 2 segments have no translation; scored as empty"]


def test_layout_errors(threeam: Path) -> None:
    write(threeam / "test.zh", ["一只狗在草地上跑"])
    with pytest.raises(DataError) as err:
        load(MMTConfig(data=str(threeam)))
    assert err.value.file.endswith("test.zh") and err.value.line == 2
    with pytest.raises(DataError) as err:
        load(MMTConfig(data=str(threeam), split="val"))
    assert err.value.file.endswith("val.en")


def test_a_missing_image_names_its_line_unless_a_predictions_file_is_scored(threeam: Path) -> None:
    (threeam / "images" / "sbu_2.jpg").unlink()
    with pytest.raises(DataError) as err:
        load(MMTConfig(data=str(threeam)))
    assert err.value.file.endswith("images-test.txt") and err.value.line == 2 and err.value.field == "image"
    assert load(MMTConfig(data=str(threeam), predictions="answers.jsonl")).n == 2
