"""The CHAIR vocabulary and mention extraction (unlearn.md §5.2; mmkit/core/objects.py)."""

from __future__ import annotations

import pytest

from mmkit.core.objects import (COCO_OBJECTS, SYNONYMS, TWO_WORDS, VOCAB, Mention, Vocabulary, find_objects,
                                singularize, word_tokens)
from mmkit.errors import DataError


def found(caption: str, vocab: Vocabulary | None = None) -> list[tuple[str, str]]:
    return [(m.canonical, m.surface) for m in find_objects(caption, vocab)]


def test_vocabulary_is_the_80_coco_categories_with_the_later_additions():
    assert len(COCO_OBJECTS) == 80 and len(set(COCO_OBJECTS)) == 80
    assert COCO_OBJECTS[0] == "person" and COCO_OBJECTS[-1] == "toothbrush"
    for name in ("dining table", "hot dog", "cell phone", "teddy bear", "hair drier", "tv", "couch"):
        assert name in COCO_OBJECTS and SYNONYMS[name] == name
    assert SYNONYMS["brother"] == SYNONYMS["pedestrian"] == "person"
    assert SYNONYMS["coffee table"] == "dining table"
    assert SYNONYMS["remote control"] == "remote"
    assert SYNONYMS["motor bike"] == "motorcycle" and SYNONYMS["puppy"] == "dog"
    assert SYNONYMS["iphone"] == "cell phone"  # entries are lower-cased like captions


def test_two_word_map_holds_entries_and_fixed_rules():
    assert TWO_WORDS["hot dog"] == "hot dog" and TWO_WORDS["dining table"] == "dining table"
    assert TWO_WORDS["home plate"] == "home plate" and TWO_WORDS["train track"] == "train track"
    assert TWO_WORDS["baby bird"] == "bird" and TWO_WORDS["adult cub"] == "cub"
    assert TWO_WORDS["passenger jet"] == "jet" and TWO_WORDS["bow tie"] == "tie"
    assert TWO_WORDS["toilet seat"] == "toilet"
    assert "stove top oven" not in TWO_WORDS  # three words: never matched by the pairwise scan


@pytest.mark.parametrize("plural, singular", [
    ("dogs", "dog"), ("men", "man"), ("women", "woman"), ("mice", "mouse"), ("knives", "knife"),
    ("geese", "goose"), ("teeth", "tooth"), ("buses", "bus"), ("calves", "calf"), ("ladies", "lady"),
    ("benches", "bench"), ("toothbrushes", "toothbrush"), ("glasses", "glass"), ("boxes", "box"),
    ("waltzes", "waltz"), ("horses", "horse"), ("glass", "glass"), ("bus", "bus"), ("tennis", "tennis"),
    ("s", "s"),
])
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_word_tokens():
    assert word_tokens("A Dog's 2 toys!") == ["a", "dog", "s", "2", "toys"]


def test_plurals_and_synonyms_map_to_categories():
    assert found("Two dogs and three people.") == [("dog", "dogs"), ("person", "people")]
    assert found("Men ride motorbikes past parked cabs") == [
        ("person", "Men"), ("motorcycle", "motorbikes"), ("car", "cabs")]
    assert found("a puppy and kittens") == [("dog", "puppy"), ("cat", "kittens")]


def test_two_word_phrases_win_over_their_parts():
    assert found("a hot dog") == [("hot dog", "hot dog")]
    assert found("Teddy Bears on a dining table") == [("teddy bear", "Teddy Bears"), ("dining table", "dining table")]
    assert found("a motor bike and a cell phone") == [("motorcycle", "motor bike"), ("cell phone", "cell phone")]
    assert found("two sports balls and wine glasses") == [
        ("sports ball", "sports balls"), ("wine glass", "wine glasses")]
    assert found("a bear") == [("bear", "bear")]


def test_qualifiers_and_non_objects():
    assert found("train tracks") == []  # home plate / train track are no objects, so no train
    assert found("a passenger train") == [("train", "passenger train")]
    assert found("a baby bird") == [("bird", "baby bird")]  # not a person
    assert found("a baby") == [("person", "baby")]
    assert found("a man in a bow tie") == [("person", "man"), ("tie", "bow tie")]


def test_toilet_seat_rule():
    assert found("The toilet seat is up.") == [("toilet", "toilet seat")]
    assert found("A toilet next to a seat.") == [("toilet", "toilet")]  # every seat dropped
    assert found("A seat by the window.") == [("chair", "seat")]


def test_mentions_carry_offsets_word_and_repeats():
    caption = "A dog sees two Dogs."
    mentions = find_objects(caption)
    assert mentions == [Mention("dog", "dog", 2, 5, "dog"), Mention("dog", "Dogs", 15, 19, "dog")]
    assert all(caption[m.start:m.end] == m.surface for m in mentions)
    assert find_objects("") == []


def test_canonical_of_words_and_phrases():
    assert VOCAB.canonical("Hot Dogs") == "hot dog"
    assert VOCAB.canonical("puppies") == "dog"
    assert VOCAB.canonical("stove top oven") == "oven"
    assert VOCAB.canonical("train tracks") is None and VOCAB.canonical("sky") is None


def test_custom_vocabulary_table_and_file(tmp_path):
    table = "animal, critter, baby goat\n\nsky, heaven\n"
    vocab = Vocabulary.from_table(table)
    assert vocab.categories == ("animal", "sky")
    assert found("critters under the Heavens", vocab) == [("animal", "critters"), ("sky", "Heavens")]
    assert found("a baby goat", vocab) == [("animal", "baby goat")]
    path = tmp_path / "vocab.txt"
    path.write_text(table, encoding="utf-8")
    assert Vocabulary.from_file(path).synonyms == vocab.synonyms


def test_vocabulary_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"v\.txt:2: vocabulary: 'pup' belongs to both 'dog' and 'puppy'"):
        Vocabulary.from_table("dog, pup\npuppy, pup\n", source="v.txt")
    with pytest.raises(DataError, match="category 'dog' is listed twice"):
        Vocabulary.from_table("dog\ndog, hound\n")
    with pytest.raises(DataError, match="empty"):
        Vocabulary.from_table("\n , \n")
    with pytest.raises(DataError, match="cannot read the vocabulary"):
        Vocabulary.from_file(tmp_path / "missing.txt")
