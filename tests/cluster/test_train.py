"""Tests of mmkit/cluster/train.py: prompt templates, response-only labels, padding, split."""

from __future__ import annotations

import numpy as np
import pytest

from mmkit.cluster import train as S
from mmkit.core.models import load_model


@pytest.fixture(scope="module")
def tok(tiny_causal_lm):
    return load_model(tiny_causal_lm, "causal-lm", device="cpu").preprocessor


CONV = [("user", "what is a dog"), ("assistant", "a dog is an animal")]


def trained_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != S.IGNORE])


@pytest.mark.parametrize("template", sorted(S.TEMPLATES))
def test_labels_cover_exactly_the_response_and_its_eos(tok, template):
    (ids, labels), = S.TEMPLATES.resolve(template)(tok, [CONV], "you help")
    assert len(ids) == len(labels)
    kept = [i for i, l in zip(ids, labels) if l != S.IGNORE]
    assert all(l in (S.IGNORE, i) for i, l in zip(ids, labels))
    assert kept[-1] == tok.eos_token_id and kept.count(tok.eos_token_id) == 1
    assert tok.decode(kept[:-1]).strip() == "a dog is an animal"
    assert "what" not in trained_text(tok, ids, labels)


def test_llmzoo_layout_by_hand(tok):
    """The llmzoo rendering equals tokenising the documented string piece by piece."""
    (ids, labels), = S.encode_llmzoo(tok, [CONV], "you help")
    eos = tok.eos_token
    pieces = ["you help\n\n", f"Human: what is a dog{eos}\n", "Assistant: ", f"a dog is an animal{eos}"]
    expected = S._leading_special_ids(tok) + sum((tok(p, add_special_tokens=False)["input_ids"] for p in pieces), [])
    assert ids == expected
    n_resp = len(tok(pieces[-1], add_special_tokens=False)["input_ids"])
    assert labels[-n_resp:] == ids[-n_resp:] and set(labels[:-n_resp]) == {S.IGNORE}


def test_multi_turn_trains_every_assistant_turn(tok):
    conv = [("user", "a cat"), ("assistant", "yes a cat"), ("user", "a dog"), ("assistant", "no a dog")]
    (ids, labels), = S.encode_llmzoo(tok, [conv], "")
    kept = [i for i, l in zip(ids, labels) if l != S.IGNORE]
    assert kept.count(tok.eos_token_id) == 2


def test_truncation_drops_records_without_response_and_keeps_rows_aligned(tok):
    long_prompt = [("user", " ".join(["dog"] * 60)), ("assistant", "a cat")]
    examples, rows = S.build_examples(tok, [CONV, long_prompt, CONV], "llmzoo", "", max_length=40)
    assert rows.tolist() == [0, 2]
    assert all(len(e["input_ids"]) <= 40 for e in examples)


def test_collator_masks_padding_explicitly_even_when_pad_is_eos(tok):
    (a, la), (b, lb) = S.encode_llmzoo(tok, [CONV, [("user", "hi"), ("assistant", "a")]], "")
    collate = S.SFTCollator(pad_id=tok.eos_token_id)  # the SmolLM2 case: pad id == EOS id
    batch = collate([{"input_ids": a, "labels": la}, {"input_ids": b, "labels": lb}])
    short = len(b)
    assert batch["labels"][1, short:].eq(S.IGNORE).all()
    assert batch["labels"][1, short - 1].item() == tok.eos_token_id  # the real EOS is still trained
    assert batch["attention_mask"][1].sum().item() == short
    assert batch["input_ids"][1, short:].eq(tok.eos_token_id).all()


def test_held_out_split_is_seeded_and_disjoint():
    tr, ev = S.held_out_split(100, 0.05, seed=0)
    assert len(ev) == 5 and not set(tr) & set(ev) and len(tr) + len(ev) == 100
    assert np.array_equal(ev, S.held_out_split(100, 0.05, seed=0)[1])
    assert not np.array_equal(ev, S.held_out_split(100, 0.05, seed=1)[1])


def test_heldout_loss_per_group_matches_the_model_loss(tiny_causal_lm, tok):
    import torch

    model = load_model(tiny_causal_lm, "causal-lm", device="cpu", preprocessor=False).model.eval()
    examples, _ = S.build_examples(tok, [CONV, [("user", "a cat"), ("assistant", "the cat sat")]], "llmzoo", "", 64)
    collate = S.SFTCollator(pad_id=tok.pad_token_id)
    with torch.inference_mode():
        got = S.heldout_loss(model, examples, np.array([0, 1]), collate, batch_size=2)
        alone = [model(**{k: v for k, v in collate([e]).items()}).loss.item() for e in examples]
    assert got["heldout_loss_per_group"] == pytest.approx({"0": alone[0], "1": alone[1]}, rel=1e-5)
