"""Tests for mmkit/unlearn/efuf.py on the tiny LLaVA (unlearn.md §3.1-§3.5, §4, §8 items 1-5)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmkit.core.models import load_model
from mmkit.core.train import TrainConfig, param_groups
from mmkit.errors import ConfigError, MmkitError
from mmkit.unlearn.efuf import (IGNORE, Collate, EfufLoss, SampleEncoder, check_image_tokens, select_trainable,
                                target_labels)
from mmkit.unlearn.losses import CollapseGuard, ObjectiveConfig
from mmkit.unlearn.samples import Sample

CONNECTOR = ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
             "model.multi_modal_projector.linear_2.weight", "model.multi_modal_projector.linear_2.bias"]


@pytest.fixture()
def llava(tiny_llava):
    return load_model(tiny_llava, "mllm", device="cpu")


@pytest.fixture()
def image():
    return Image.new("RGB", (40, 30), (200, 30, 10))


def _sample(kind: str, target: str = " next to a cat", context: str = "A dog lies on a sofa,") -> Sample:
    return Sample(id=kind, image="unused.jpg", target=target, kind=kind, context=context, score=20.0)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_target_labels_longest_common_prefix():
    assert target_labels([1, 2, 3], [1, 2, 4, 5]) == ([1, 2, 4, 5], [IGNORE, IGNORE, 4, 5])
    assert target_labels([1, 2], [1, 2, 4], eos_id=9) == ([1, 2, 4, 9], [IGNORE, IGNORE, 4, 9])


def test_labels_mask_everything_but_the_fragment(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    tok = enc.tokenizer
    item = enc.encode(_sample("neg"), image)
    ids, labels = item["input_ids"], item["labels"]
    target = _ids(tok, " next to a cat")
    assert labels[-len(target):].tolist() == target
    assert (labels[:-len(target)] == IGNORE).all()
    assert ids[0] == tok.bos_token_id and (ids == llava.model.config.image_token_id).sum() == 16
    assert tok.eos_token_id not in labels.tolist()
    prefix_ids = _ids(tok, "A dog lies on a sofa ,")
    assert ids[-len(target) - len(prefix_ids):-len(target)].tolist() == prefix_ids  # the context, masked


@pytest.mark.parametrize("kind", ["sent", "replay"])
def test_sentence_and_replay_end_with_one_labelled_eos(llava, image, kind):
    enc = SampleEncoder(llava.preprocessor)
    item = enc.encode(_sample(kind, target="A dog lies on a sofa.", context=""), image)
    labels = item["labels"].tolist()
    target = _ids(enc.tokenizer, "A dog lies on a sofa.")
    assert labels[-1] == enc.tokenizer.eos_token_id and labels.count(enc.tokenizer.eos_token_id) == 1
    assert labels[-len(target) - 1:-1] == target and set(labels[:-len(target) - 1]) == {IGNORE}


def test_join_that_tokenises_differently_uses_the_common_prefix(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    tok = enc.tokenizer
    item = enc.encode(_sample("pos", target="nd a cat", context="A dog sits on a"), image)
    labelled = [t for t in item["labels"].tolist() if t != IGNORE]
    assert labelled == _ids(tok, "and a cat")  # "a" + "nd" became one word: its token is the target's
    assert enc.n_target_tokens([_sample("pos", target="nd a cat", context="A dog sits on a")]) == [3]
    assert enc.n_target_tokens([_sample("pos", target=",", context="A dog")]) == [1]


def test_collate_pads_right_with_masked_labels(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    items = [enc.encode(_sample("neg"), image), enc.encode(_sample("sent", "A cat.", ""), image)]
    batch = Collate(enc.tokenizer.pad_token_id)(items)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert n0 > n1 and batch["input_ids"].shape == (2, n0)
    assert (batch["labels"][1, n1:] == IGNORE).all() and (batch["attention_mask"][1, n1:] == 0).all()
    assert (batch["input_ids"][1, n1:] == enc.tokenizer.pad_token_id).all()
    assert batch["kind"] == ["neg", "sent"] and batch["pixel_values"].shape[0] == 2


def _loss(variant: str = "paper", tau: float = float("inf")) -> EfufLoss:
    return EfufLoss(variant, ObjectiveConfig(tau=tau), CollapseGuard(total=1, enabled=False))


def test_loss_equals_separate_forwards(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    items = [enc.encode(_sample("pos", " next to a big cat"), image), enc.encode(_sample("neg"), image),
             enc.encode(_sample("sent", "A dog lies on a sofa.", ""), image)]
    collate = Collate(enc.tokenizer.pad_token_id)
    loss = _loss()
    out = loss(llava.model, collate(items))
    nll = [loss.nll(llava.model, collate([it]))[0].item() for it in items]
    assert out["loss"].item() == pytest.approx(nll[0] - 0.3 * nll[1] + 0.2 * nll[2], abs=1e-5)
    assert out["l_neg"].item() == pytest.approx(-nll[1], abs=1e-5)


def _nll_after_step(model, loss, batch, term: str) -> tuple[float, float]:
    names = select_trainable(model)
    params = [p for n, p in model.named_parameters() if n in names]
    before = loss.nll(model, batch)[0]
    value = -before if term == "neg" else before
    value.backward()
    torch.optim.SGD(params, lr=0.05).step()
    with torch.no_grad():
        return before.item(), loss.nll(model, batch)[0].item()


def test_negative_term_step_raises_the_fragment_nll(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    batch = Collate(enc.tokenizer.pad_token_id)([enc.encode(_sample("neg"), image)])
    before, after = _nll_after_step(llava.model, _loss(), batch, "neg")
    assert after > before


def test_positive_term_step_lowers_the_fragment_nll(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    batch = Collate(enc.tokenizer.pad_token_id)([enc.encode(_sample("pos"), image)])
    before, after = _nll_after_step(llava.model, _loss(), batch, "pos")
    assert after < before


def test_non_finite_loss_skips_the_update_and_aborts_after_ten(llava, image, monkeypatch):
    model = llava.model
    names = select_trainable(model)
    params = {n: p for n, p in model.named_parameters() if n in names}
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.05)
    loss = _loss()
    monkeypatch.setattr(loss, "nll", lambda m, b: params[CONNECTOR[0]].sum() * torch.tensor([float("nan")]))
    batch = {"kind": ["neg"], "score": torch.tensor([1.0])}
    out = loss(model, batch)
    out["loss"].backward()
    opt.step()
    assert loss.skipped == 1 and all(p.grad is None for p in params.values())
    assert all(torch.equal(p, snapshot[n]) for n, p in params.items())
    for _ in range(8):
        loss(model, batch)
    with pytest.raises(MmkitError, match="10 consecutive non-finite"):
        loss(model, batch)


def test_select_trainable_connector_and_optimizer_groups(llava):
    model = llava.model
    assert select_trainable(model) == CONNECTOR
    grouped = [n for g in param_groups(model, TrainConfig(weight_decay=0.05)) for n in g["names"]]
    assert sorted(grouped) == sorted(CONNECTOR)
    assert select_trainable(model, r"lm_head") == ["lm_head.weight"]
    with pytest.raises(MmkitError, match="no parameter matches 'nothing_here'"):
        select_trainable(model, "nothing_here")
    with pytest.raises(ConfigError, match="--trainable"):
        select_trainable(model, "(")


def test_image_token_count_must_match_features(llava, image):
    enc = SampleEncoder(llava.preprocessor)
    item = enc.encode(_sample("neg"), image)
    check_image_tokens(llava.model, item)
    ids = item["input_ids"].clone()
    ids[ids == llava.model.config.image_token_id] = enc.tokenizer.unk_token_id
    ids[2] = llava.model.config.image_token_id
    with pytest.raises(MmkitError, match="1 image tokens but the model produces 16"):
        check_image_tokens(llava.model, {**item, "input_ids": ids})
