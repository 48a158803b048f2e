"""Tests for mmkit/unlearn/losses.py (unlearn.md §3.2-§3.5, §8 items 2, 5, 6)."""

from __future__ import annotations

import math

import pytest
import torch

from mmkit.unlearn.losses import (CollapseGuard, LossInput, ObjectiveConfig, code_objective, kind_mean,
                                  paper_objective, per_sample_nll, w_neg_schedule, w_pos_schedule)


def _logits_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 7)
    labels = torch.full((2, 12), -100)
    labels[0, 3:5] = torch.tensor([1, 2])           # 2-token target
    labels[1, 1:11] = torch.arange(10) % 7          # 10-token target
    return logits, labels


def test_per_sample_nll_is_a_mean_per_sample_not_a_flat_token_mean():
    logits, labels = _logits_labels()
    nll = per_sample_nll(logits, labels)
    for i in range(2):
        pos = (labels[i, 1:] != -100).nonzero().flatten()
        lp = torch.log_softmax(logits[i, :-1], -1)[pos, labels[i, 1:][pos]]
        assert nll[i].item() == pytest.approx(-lp.mean().item(), abs=1e-6)
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert abs(nll.mean().item() - flat.item()) > 1e-3


def test_paper_objective_composition_and_empty_kinds():
    nll = torch.tensor([2.0, 3.0, 5.0, 7.0])
    x = LossInput(nll, ["pos", "neg", "sent", "pos"], torch.full((4,), float("nan")), 0, 10)
    terms = paper_objective(x, ObjectiveConfig(), True)
    assert terms.loss.item() == pytest.approx(4.5 - 0.3 * 3.0 + 0.2 * 5.0)
    assert terms.l_neg.item() == pytest.approx(-3.0) and terms.l_rep is None and terms.w_neg == 0.3
    only_pos = paper_objective(LossInput(nll[:1], ["pos"], nll[:1], 0, 10), ObjectiveConfig(), True)
    assert only_pos.loss.item() == pytest.approx(2.0) and only_pos.l_neg is None
    off = paper_objective(x, ObjectiveConfig(), False)
    assert off.loss.item() == pytest.approx(4.5 + 0.2 * 5.0) and off.w_neg == 0.0


def test_negative_clip_tau_zero_gives_zero_gradient():
    nll = torch.tensor([1.5, 2.5], requires_grad=True)
    terms = paper_objective(LossInput(nll, ["neg", "neg"], torch.zeros(2), 0, 1), ObjectiveConfig(tau=0.0), True)
    terms.loss.backward()
    assert torch.equal(nll.grad, torch.zeros(2))
    nll2 = torch.tensor([1.5, 2.5], requires_grad=True)
    paper_objective(LossInput(nll2, ["neg", "neg"], torch.zeros(2), 0, 1), ObjectiveConfig(tau=2.0), True).loss.backward()
    assert nll2.grad.tolist() == pytest.approx([-0.15, 0.0])  # only the sample under tau ascends


@pytest.mark.parametrize("t,expected", [(0, 0.3), (39, 0.3), (40, 0.3), (70, 0.15), (100, 0.0)])
def test_w_neg_schedule(t, expected):
    assert w_neg_schedule(t, 100) == pytest.approx(expected)


@pytest.mark.parametrize("t,expected", [(0, 1.0), (50, 0.75), (100, 0.5)])
def test_w_pos_schedule(t, expected):
    assert w_pos_schedule(t, 100) == pytest.approx(expected)


def test_code_objective_weights_by_score_and_ignores_nan_scores_of_other_rows():
    nll = torch.tensor([2.0, 3.0, 4.0, 1.0], requires_grad=True)
    scores = torch.tensor([40.0, 20.0, 30.0, float("nan")])
    x = LossInput(nll, ["pos", "neg", "sent", "replay"], scores, 50, 100)
    terms = code_objective(x, ObjectiveConfig(), True)
    expected = 0.75 * 40 * 2.0 - w_neg_schedule(50, 100) * (55 - 20) * 3.0 + 0.0 + 0.3 * 40 * 1.0
    assert terms.loss.item() == pytest.approx(expected)
    terms.loss.backward()
    assert torch.isfinite(nll.grad).all()
    assert nll.grad.tolist() == pytest.approx([30.0, -w_neg_schedule(50, 100) * 35, 0.0, 12.0])


def test_kind_mean_absent_kind_is_none():
    assert kind_mean(torch.ones(2), ["pos", "pos"], "neg") is None


def test_collapse_guard_training_ema_triggers_at_expected_step():
    guard = CollapseGuard(total=1000, rise=1.0)
    for step in range(1, 51):
        guard.update_train(step, 1.0)
    assert guard.ema_ref == pytest.approx(1.0) and guard.neg_enabled
    guard.update_train(51, 30.0)   # ema 0.98 + 0.6 = 1.58 <= 2
    assert guard.neg_enabled
    guard.update_train(52, 30.0)   # ema 0.98 * 1.58 + 0.6 = 2.148 > 2
    assert guard.triggered_at == 52 and guard.reason == "train_pos_rise"
    guard.update_train(53, 0.0)
    assert guard.triggered_at == 52 and not guard.neg_enabled


def test_collapse_guard_not_compared_before_warmup_and_short_runs():
    guard = CollapseGuard(total=3, rise=1.0)
    guard.update_train(1, 1.0)
    guard.update_train(2, 100.0)   # before min(50, T) = 3: no comparison
    assert guard.neg_enabled
    guard.update_train(3, 100.0)   # reference taken here, at min(50, T) = 3
    assert guard.ema_ref == pytest.approx(0.98 * (0.98 * 1.0 + 2.0) + 2.0) and guard.neg_enabled
    guard.update_train(4, 200.0)   # compared from now on: 0.98 * 4.9204 + 4 > 4.9204 + 1
    assert guard.triggered_at == 4


def test_collapse_guard_validation_and_ceiling():
    guard = CollapseGuard(total=10, rise=1.0, neg_stop=5.0)
    guard.update_val(0, 2.0, 3.0)
    guard.update_val(2, 2.9, 4.0)
    assert guard.neg_enabled
    guard.update_val(4, 3.1, 4.0)
    assert guard.triggered_at == 4 and guard.reason == "val_pos_rise"
    ceiling = CollapseGuard(total=10, neg_stop=5.0)
    ceiling.update_val(3, None, 5.5)
    assert ceiling.triggered_at == 3 and ceiling.reason == "neg_stop"
    off = CollapseGuard(total=10, neg_stop=5.0, enabled=False)
    off.update_val(3, None, 50.0)
    assert off.neg_enabled


def test_guard_state_round_trip():
    guard = CollapseGuard(total=10)
    guard.update_val(0, 1.0, None)
    other = CollapseGuard(total=10)
    other.load(guard.state())
    assert other.val_ref == 1.0 and math.isinf(other.neg_stop)
