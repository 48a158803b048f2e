"""Tests for mmkit/unlearn/objects.py (unlearn.md §2.2, §8 item 9)."""

from __future__ import annotations

import pytest

from mmkit.errors import MmkitError
from mmkit.io import Record
from mmkit.unlearn.objects import ExtractConfig, Span, get_extractor, phrase_spans, vocab_spans


def test_vocab_plural_and_two_word_objects():
    text = "Two dogs and a teddy bear sit on a bed."
    assert vocab_spans(text) == [Span("dogs", 4, 8), Span("teddy bear", 15, 25), Span("bed", 35, 38)]


def test_vocab_synonyms_and_first_mention_only():
    text = "A puppy chases a kitten while the dog barks at the cats."
    spans = vocab_spans(text)
    assert [s.phrase for s in spans] == ["puppy", "kitten"]   # dog = puppy, cats = kitten: first mentions
    assert text[spans[1].start:spans[1].end] == "kitten"


def test_vocab_hot_dog_is_not_a_dog_and_case_insensitive():
    assert [s.phrase for s in vocab_spans("A Hot Dog stand next to a Man.")] == ["Hot Dog", "Man"]


def test_vocab_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("lamp, lantern\nsofa\n")
    out = get_extractor("vocab", ExtractConfig(vocab=str(vocab)))([{"response": "A lantern by the couch and a sofa."}])
    assert out == [([Span("lantern", 2, 9), Span("sofa", 29, 33)], 0)]


def test_phrase_spans_verbatim_whole_words_and_drops():
    text = "A man holds a c++ book (old) near the window, and a man waves."
    spans, dropped = phrase_spans(text, [" a man", "c++ book", "(old)", "wind", "giraffe", "none",
                                         "one two three four five six seven eight nine ten eleven", "A MAN"])
    assert [(s.phrase, s.start) for s in spans] == [("A man", 0), ("c++ book", 14), ("(old)", 23)]
    assert dropped == 4   # "wind" (not a whole word), "giraffe" (absent), "none" (refusal), 11 words


def test_llm_extractor_uses_the_answers():
    prompts = []

    def ask(batch):
        prompts.extend(batch)
        return ["a dog, a sofa, a unicorn", "I'm sorry"]

    out = get_extractor("llm", ExtractConfig(ask=ask))([{"response": "A dog on a sofa."}, {"response": "Sky."}])
    assert out == [([Span("A dog", 0, 5), Span("a sofa", 9, 15)], 1), ([], 1)]
    assert "A dog on a sofa." in prompts[0]


def test_llm_extractor_needs_a_model():
    with pytest.raises(MmkitError, match="extractor"):
        get_extractor("llm", ExtractConfig())


def test_given_extractor_and_bad_objects_field():
    extract = get_extractor("given", ExtractConfig())
    assert extract([{"response": "A cat naps.", "objects": ["cat", "dog"]}]) == [([Span("cat", 2, 5)], 1)]
    with pytest.raises(MmkitError, match=r"r\.jsonl:3: objects"):
        extract([Record({"response": "A cat.", "objects": "cat"}, "r.jsonl", 3)])


def test_unknown_extractor():
    with pytest.raises(MmkitError, match="vocab"):
        get_extractor("vocabb", ExtractConfig())
