"""Budget and selection strategies (prune.md sections 2, 6 and 10 items 6, 7 and 10)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mmkit.errors import MmkitError
from mmkit.prune.dynamics import ArrayDynamics
from mmkit.prune.scores import ScoreParams, compute_scores
from mmkit.prune.select import (STRATEGIES, ccs_beta, ccs_bins, ccs_budgets, class_budgets,
                                n_keep_for, select)


def tie_perm(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(n)


# ---------------------------------------------------------------- budget (§2)

@pytest.mark.parametrize("kwargs, expected", [
    ({}, 75),                                   # default keep 0.75
    ({"keep": 0.5}, 50),
    ({"prune": 0.25}, 75),
    ({"keep": 1.0}, 100),
    ({"keep": 0.005}, 1),                       # 0.5 rounds half up
    ({"keep": 0.3, "n_keep": 7}, 7),            # --n-keep overrides
])
def test_n_keep_for(kwargs, expected):
    assert n_keep_for(100, **kwargs) == expected


def test_n_keep_rounds_half_up_on_the_given_decimal():
    assert n_keep_for(5, keep=0.5) == 3                 # DeepCore's round() would give 2
    assert n_keep_for(5, keep=0.7) == 4                 # 3.5 -> 4
    assert n_keep_for(5, prune=0.3) == 4
    assert n_keep_for(3, keep=2 / 3) == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"keep": 0.5, "prune": 0.5}, "--prune"),
    ({"keep": 0.0}, "--keep"),
    ({"keep": 1.5}, "--keep"),
    ({"keep": 0.004}, "--keep"),                # rounds to 0 examples
    ({"prune": 1.0}, "--prune"),
    ({"prune": 0.996}, "--prune"),
    ({"n_keep": 0}, "--n-keep"),
    ({"n_keep": 101}, "--n-keep"),
    ({"n_keep": 2.5}, "--n-keep"),
])
def test_n_keep_errors(kwargs, field):
    with pytest.raises(MmkitError) as err:
        n_keep_for(100, **kwargs)
    assert err.value.field == field


# ---------------------------------------------------------------- top-k and ties (§6.1, §6.2)

def test_topk_keeps_highest_and_ranks_in_keep_order():
    imp = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    sel = select(imp, 3)
    assert sel.kept.tolist() == [1, 3, 4]
    assert sel.rank.tolist() == [3, 0, 4, 2, 1]
    assert sel.kept.dtype == np.int64 and sel.rank.dtype == np.int64
    assert sel.per_class_kept == {} and sel.n_cut == 0 and sel.beta is None


def test_all_equal_scores_tie_break():
    n, n_keep = 40, 15
    imp = np.ones(n)
    assert select(imp, n_keep, tie_break="index").kept.tolist() == list(range(n_keep))
    default = select(imp, n_keep).kept
    assert default.tolist() != list(range(n_keep))
    assert default.tolist() == sorted(np.argsort(tie_perm(0, n))[:n_keep].tolist())
    assert select(imp, n_keep, seed=1).kept.tolist() == sorted(np.argsort(tie_perm(1, n))[:n_keep])


def test_ties_only_decide_within_equal_scores():
    imp = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    for seed in range(5):
        kept = select(imp, 3, seed=seed).kept
        assert 0 in kept and 5 not in kept


# ---------------------------------------------------------------- NaN policy (§5)

def test_nan_policy_keep_drop_error(caplog):
    imp = np.array([0.5, np.nan, 0.9, np.nan, 0.1])
    with caplog.at_level(logging.WARNING, logger="mmkit"):
        keep = select(imp, 3, nan_policy="keep")
    assert keep.kept.tolist() == [1, 2, 3]
    assert set(keep.rank[[1, 3]]) == {0, 1} and keep.rank[2] == 2
    assert keep.nan_count == 2 and "2 of 5" in keep.warnings[0]
    assert "2 of 5" in caplog.text
    drop = select(imp, 3, nan_policy="drop")
    assert drop.kept.tolist() == [0, 2, 4] and set(drop.rank[[1, 3]]) == {3, 4}
    assert drop.warnings
    assert select(imp, 4, nan_policy="drop").kept.tolist() in ([0, 1, 2, 4], [0, 2, 3, 4])
    with pytest.raises(MmkitError) as err:
        select(imp, 3, nan_policy="error")
    assert err.value.field == "--nan-policy"
    assert select(np.array([0.2, 0.1]), 1, nan_policy="error").warnings == []


@pytest.mark.parametrize("strategy", ["topk", "ccs", "random"])
def test_nan_policy_applies_to_every_strategy(strategy):
    rng = np.random.default_rng(0)
    imp = rng.random(60)
    imp[:10] = np.nan
    kept = select(imp, 30, strategy=strategy, nan_policy="keep").kept
    assert set(range(10)) <= set(kept.tolist())
    kept = select(imp, 30, strategy=strategy, nan_policy="drop").kept
    assert not set(range(10)) & set(kept.tolist())


# ---------------------------------------------------------------- CCS (§6.4, §10.6)

def test_ccs_budget_cases():
    imp = np.array([0.0] * 8 + [1.0] * 2)
    for budget, from_zero in ((4, 2), (6, 4)):
        sel = select(imp, budget, strategy="ccs", ccs_hard_fraction=0.0, ccs_strata=2)
        assert len(sel.kept) == budget
        assert int((imp[sel.kept] == 1.0).sum()) == 2 and int((imp[sel.kept] == 0.0).sum()) == from_zero
        assert sel.n_cut == 0 and sel.beta == 0.0
    np.testing.assert_array_equal(ccs_budgets(np.array([8, 2]), 4), [2, 2])
    np.testing.assert_array_equal(ccs_budgets(np.array([8, 2]), 6), [4, 2])
    np.testing.assert_array_equal(ccs_budgets(np.array([3, 0, 3, 5]), 7), [2, 0, 2, 3])  # ties by id


def test_ccs_keeps_the_maximum():
    imp = np.arange(-5.0, 0.0)
    np.testing.assert_array_equal(ccs_bins(imp, 5), [0, 1, 2, 3, 4])                   # last closed
    sel = select(imp, 5, strategy="ccs", ccs_strata=5)
    assert sel.kept.tolist() == [0, 1, 2, 3, 4]


def test_ccs_bins_equal_scores_are_one_bin():
    np.testing.assert_array_equal(ccs_bins(np.full(4, 0.3), 50), [0, 0, 0, 0])


def test_ccs_cutoff_removes_the_top_of_the_cutoff_score():
    rng = np.random.default_rng(5)
    imp, cutoff = rng.random(200), rng.random(200)
    sel = select(imp, 80, strategy="ccs", ccs_hard_fraction=0.25, ccs_cutoff=cutoff)
    assert sel.n_cut == 50 and sel.beta == 0.25 and len(sel.kept) == 80
    top_cut = set(np.argsort(-cutoff)[:50].tolist())
    assert not top_cut & set(sel.kept.tolist())
    own = select(imp, 80, strategy="ccs", ccs_hard_fraction=0.25)      # default: own importance
    assert not set(np.argsort(-imp)[:50].tolist()) & set(own.kept.tolist())


def test_ccs_nan_cutoff_scores_are_not_cut():
    imp = np.arange(10.0)
    cutoff = np.array([np.nan, np.nan] + [0.0] * 8)
    sel = select(imp, 8, strategy="ccs", ccs_hard_fraction=0.2, ccs_cutoff=cutoff)
    assert sel.n_cut == 2 and {0, 1} <= set(sel.kept.tolist())


def test_ccs_clamp_warning():
    imp = np.random.default_rng(2).random(20)
    sel = select(imp, 15, strategy="ccs", ccs_hard_fraction=0.3)       # 15 > 20 - 6
    assert sel.n_cut == 5 and len(sel.kept) == 15
    assert any("n_cut" in w for w in sel.warnings)
    ok = select(imp, 14, strategy="ccs", ccs_hard_fraction=0.3)        # 14 = 20 - 6: no clamp
    assert ok.n_cut == 6 and ok.warnings == []


@pytest.mark.parametrize("keep, beta", [(1.0, 0.0), (0.7, 0.0), (0.69, 0.1), (0.5, 0.1),
                                        (0.2, 0.2), (0.19, 0.3), (0.1, 0.3)])
def test_ccs_auto_beta_table(keep, beta):
    assert ccs_beta(keep, "auto") == beta
    n = 1000
    assert select(np.random.default_rng(0).random(n), n_keep_for(n, keep=keep),
                  strategy="ccs").beta == beta


def test_ccs_bad_hard_fraction():
    with pytest.raises(MmkitError) as err:
        select(np.ones(10), 5, strategy="ccs", ccs_hard_fraction=1.0)
    assert err.value.field == "--ccs-hard-fraction"


# ---------------------------------------------------------------- class balance (§6.3)

def test_class_budgets_largest_remainder():
    labels = np.repeat([0, 1, 2], [3, 5, 2])
    assert class_budgets(labels, 5) == {0: 2, 1: 2, 2: 1}      # 1.5, 2.5, 1.0: tie -> class 0
    assert class_budgets(np.array([0, 1, 2]), 2) == {0: 1, 1: 1, 2: 0}
    assert class_budgets(np.array([4, 4, 7]), 3) == {4: 2, 7: 1}


def test_class_balanced_topk_takes_top_of_each_class():
    imp = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1])
    sel = select(imp, 4, balance="class", labels=labels)
    assert sel.kept.tolist() == [0, 1, 4, 5]
    assert sel.per_class_kept == {0: 2, 1: 2}
    assert select(imp, 4, labels=labels).per_class_kept == {0: 3, 1: 1}


def test_balance_errors():
    with pytest.raises(MmkitError) as err:
        select(np.ones(4), 2, balance="class")
    assert err.value.field == "--balance"
    with pytest.raises(MmkitError) as err:
        select(np.ones(4), 2, balance="class", labels=np.zeros(3, dtype=int))
    assert err.value.field == "--labels"
    for kwargs, field in (({"strategy": "top"}, "--strategy"), ({"balance": "yes"}, "--balance"),
                          ({"tie_break": "x"}, "--tie-break"), ({"nan_policy": "x"}, "--nan-policy")):
        with pytest.raises(MmkitError) as err:
            select(np.ones(4), 2, **kwargs)
        assert err.value.field == field
    with pytest.raises(MmkitError) as err:
        select(np.ones(4), 5)
    assert err.value.field == "--n-keep"


# ---------------------------------------------------------------- invariants (§10.7)

@pytest.mark.parametrize("balance", ["none", "class"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_selection_invariants(strategy, balance):
    rng = np.random.default_rng([ord(c) for c in strategy + balance])
    for _ in range(25):
        n = int(rng.integers(1, 400))
        keep = float(rng.uniform(1 / n, 1.0))
        seed = int(rng.integers(0, 1000))
        n_keep = n_keep_for(n, keep=keep)
        imp = rng.integers(0, 5, n).astype(float) if rng.random() < 0.5 else rng.random(n)
        labels = rng.integers(0, 4, n)
        kwargs = dict(strategy=strategy, balance=balance, labels=labels, seed=seed)
        sel = select(imp, n_keep, **kwargs)
        kept = sel.kept
        assert len(kept) == n_keep == int(np.floor(keep * n + 0.5))
        assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
        assert kept.min() >= 0 and kept.max() < n
        assert sorted(sel.rank.tolist()) == list(range(n))
        assert set(np.flatnonzero(sel.rank < n_keep).tolist()) == set(kept.tolist())
        if strategy == "topk" and balance == "none" and n_keep < n:
            pruned = np.setdiff1d(np.arange(n), kept)
            assert imp[kept].min() >= imp[pruned].max()
        budgets = class_budgets(labels, n_keep)
        assert sum(budgets.values()) == n_keep
        assert all(abs(k - n_keep / n * np.sum(labels == c)) < 1 for c, k in budgets.items())
        if balance == "class":
            assert sel.per_class_kept == budgets
        assert sum(sel.per_class_kept.values()) == n_keep
        again = select(imp, n_keep, **kwargs)
        np.testing.assert_array_equal(again.kept, kept)
        np.testing.assert_array_equal(again.rank, sel.rank)


def test_all_equal_scores_reduce_to_seeded_random_choice():
    n, n_keep = 100, 30
    for strategy in ("topk", "ccs"):
        kept = [select(np.zeros(n), n_keep, strategy=strategy, seed=s,
                       ccs_hard_fraction=0.0).kept.tolist() for s in range(3)]
        assert kept[0] != kept[1] != kept[2]
        assert kept[0] == select(np.zeros(n), n_keep, strategy=strategy, seed=0,
                                 ccs_hard_fraction=0.0).kept.tolist()


def test_random_strategy_ignores_importance():
    a = select(np.arange(50.0), 20, strategy="random", seed=4).kept
    b = select(np.random.default_rng(9).random(50), 20, strategy="random", seed=4).kept
    np.testing.assert_array_equal(a, b)
    assert a.tolist() != list(range(30, 50))
    assert select(np.arange(50.0), 20, strategy="random", seed=5).kept.tolist() != a.tolist()


# ---------------------------------------------------------------- reference parity (§10.10)

def baai_get_coreset(prob_history: list[np.ndarray], window: int, fraction: float) -> set[int]:
    """The logic of BAAI-DCAI/Dataset-Pruning ``ImageNet/get_coreset.py``, re-implemented here:
    a rolling ``[N, J]`` history (0 = unseen, not shifted in), the std (ddof 1) x 10 once the
    history is full and for all but the last epoch, averaged; keep the top ``int(N * fraction)``."""
    nums = len(prob_history[0])
    history = np.zeros((nums, window))
    uncertainty = []
    for idx, pred in enumerate(prob_history):
        seen = np.flatnonzero(pred)
        history[seen] = np.concatenate([history[seen, 1:], pred[seen, None]], axis=1)
        if window - 1 <= idx < len(prob_history) - 1:
            uncertainty.append(history.std(axis=1, ddof=1) * 10)
    score = np.mean(np.array(uncertainty), axis=0)
    return set(np.argsort(-score)[:int(nums * fraction)].tolist())


@pytest.mark.parametrize("k, window, fraction", [(12, 10, 0.75), (8, 3, 0.5), (20, 5, 0.3)])
def test_reference_parity(k, window, fraction):
    n = 2000
    p = np.random.default_rng(k).uniform(0.01, 1.0, (k, n)).astype(np.float32)
    expected = baai_get_coreset(list(p.astype(np.float64)), window, fraction)
    scores = compute_scores([ArrayDynamics({"p_true": p})], "dyn-unc",
                            ScoreParams(window=window, drop_last_window=True))
    sel = select(scores.importance, n_keep_for(n, n_keep=int(n * fraction)), tie_break="index")
    assert set(sel.kept.tolist()) == expected
