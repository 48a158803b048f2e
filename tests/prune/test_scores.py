"""Scores and the chunked scoring engine (prune.md sections 3, 5 and 10 items 1-5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmkit.errors import MmkitError
from mmkit.prune.dynamics import ArrayDynamics
from mmkit.prune.scores import (METHODS, OnlineDynUnc, ScoreParams, aum, cartography,
                                compute_scores, dyn_unc, dyn_unc_cumsum, el2n, entropy,
                                forgetting, random_importance)
from mmkit.prune.select import n_keep_for, select

# §10.1: K = 4 epochs (rows) of three samples (columns).
P_HAND = np.array([[0.1, 0.5, 0.9],
                   [0.3, 0.5, 0.1],
                   [0.3, 0.5, 0.9],
                   [0.7, 0.5, 0.1]])
U_HAND = [0.1414214, 0.0, 0.5656854]
RAMP = np.array([[0.2], [0.4], [0.6], [0.8]])


def naive_dyn_unc(p: np.ndarray, window: int, drop_last: bool = False) -> np.ndarray:
    """Per-sample, per-window float64 loop straight from §3.1 and the §5 missing-value rule."""
    k, n = p.shape
    out = np.full(n, np.nan)
    for i in range(n):
        stds = []
        for start in range(k - window + 1 - int(drop_last)):
            vals = [float(v) for v in p[start:start + window, i] if not math.isnan(v)]
            if len(vals) >= 2:
                m = sum(vals) / len(vals)
                stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)))
        if stds:
            out[i] = sum(stds) / len(stds)
    return out


def online(p: np.ndarray, window: int) -> np.ndarray:
    acc = OnlineDynUnc(p.shape[1], window)
    for row in p:
        acc.update(row)
    return acc.result()


class CountingDynamics(ArrayDynamics):
    """ArrayDynamics that counts ``read`` calls (to see the engine chunk)."""

    reads = 0

    def read(self, channel: str, start: int, stop: int) -> np.ndarray:
        self.reads += 1
        return super().read(channel, start, stop)


# ---------------------------------------------------------------- §10.1 hand-computed dyn-unc

@pytest.mark.parametrize("fn", [dyn_unc, dyn_unc_cumsum, online])
def test_dyn_unc_hand_values(fn):
    np.testing.assert_allclose(fn(P_HAND, 2), U_HAND, atol=1e-7)


def test_dyn_unc_hand_selection_and_drop_last_window():
    result = compute_scores([ArrayDynamics({"p_true": P_HAND})], "dyn-unc", ScoreParams(window=2))
    np.testing.assert_allclose(result.importance, U_HAND, atol=1e-7)
    np.testing.assert_array_equal(result.score, result.importance)
    n_keep = n_keep_for(3, keep=2 / 3)
    assert n_keep == 2
    assert select(result.importance, n_keep).kept.tolist() == [0, 2]
    dropped = compute_scores([ArrayDynamics({"p_true": P_HAND})], "dyn-unc",
                             ScoreParams(window=2, drop_last_window=True))
    assert dropped.importance[0] == pytest.approx(0.0707107, abs=1e-7)
    assert dyn_unc_cumsum(P_HAND, 2, drop_last_window=True)[0] == pytest.approx(0.0707107, abs=1e-7)


def test_dyn_unc_ramp_and_cartography_identity():
    assert dyn_unc(RAMP, 3)[0] == pytest.approx(0.2, abs=1e-7)
    u = dyn_unc(RAMP, 4)[0]
    variability = cartography(RAMP)["variability"][0]
    assert u == pytest.approx(0.2581989, abs=1e-7)
    assert variability == pytest.approx(0.2236068, abs=1e-7)
    assert u == pytest.approx(math.sqrt(4 / 3) * variability, abs=1e-7)


# ---------------------------------------------------------------- §10.2 equivalences

@pytest.mark.parametrize("window", [2, 5, 15])
def test_dyn_unc_forms_agree_with_naive_loop(window):
    rng = np.random.default_rng(window)
    p = rng.random((15, 1000)).astype(np.float32)
    expected = naive_dyn_unc(p, window)
    source = CountingDynamics({"p_true": p})
    chunked = compute_scores([source], "dyn-unc", ScoreParams(window=window), mem_limit=50_000)
    assert source.reads > 5                                   # many chunks
    for got in (dyn_unc(p, window), dyn_unc_cumsum(p, window), chunked.importance, online(p, window)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [2, 5])
def test_dyn_unc_masked_forms_agree_with_naive_loop(window):
    rng = np.random.default_rng(7)
    p = rng.random((15, 300)).astype(np.float32)
    p[rng.random(p.shape) < 0.3] = np.nan
    p[:, 0] = np.nan                                          # never seen -> NaN
    p[:, 1] = np.nan
    p[0, 1] = 0.4                                             # seen once -> no usable window
    expected = naive_dyn_unc(p, window)
    assert np.isnan(expected[:2]).all()
    chunked = compute_scores([ArrayDynamics({"p_true": p})], "dyn-unc", ScoreParams(window=window),
                             mem_limit=20_000)
    assert chunked.nan_count == int(np.isnan(expected).sum()) >= 2
    for got in (dyn_unc(p, window), dyn_unc_cumsum(p, window), chunked.importance, online(p, window)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    dropped = dyn_unc(p, window, drop_last_window=True)
    np.testing.assert_allclose(dropped, naive_dyn_unc(p, window, drop_last=True), atol=1e-6)


def test_missing_values_do_not_touch_other_samples():
    rng = np.random.default_rng(3)
    p = rng.random((12, 50)).astype(np.float32)
    holey = p.copy()
    holey[[2, 5], 10] = np.nan
    clean = np.arange(50) != 10
    np.testing.assert_allclose(dyn_unc(holey, 4)[clean], dyn_unc(p, 4)[clean], atol=1e-7)


def test_float16_round_trip():
    rng = np.random.default_rng(0)
    p = rng.random((15, 1000)).astype(np.float32)
    half = p.astype(np.float16).astype(np.float32)
    assert np.abs(half - p).max() <= 2.0 ** -11
    assert np.abs(dyn_unc(half, 5) - dyn_unc(p, 5)).max() <= 2.0 ** -11


def test_online_needs_window_epochs():
    acc = OnlineDynUnc(4, 3)
    acc.update(np.full(4, 0.5, dtype=np.float32))
    with pytest.raises(MmkitError) as err:
        acc.result()
    assert err.value.field == "--window"


# ---------------------------------------------------------------- window errors (§3.1)

def test_window_one_is_an_error():
    with pytest.raises(MmkitError) as err:
        compute_scores([ArrayDynamics({"p_true": P_HAND})], "dyn-unc", ScoreParams(window=1))
    assert err.value.field == "--window"


def test_window_longer_than_epochs_suggests_window_k():
    with pytest.raises(MmkitError) as err:
        compute_scores([ArrayDynamics({"p_true": P_HAND})], "dyn-unc", ScoreParams(window=10))
    assert err.value.field == "--window"
    assert "--window 4" in str(err.value) and "more epochs" in str(err.value)


def test_drop_last_window_needs_more_epochs_than_window():
    with pytest.raises(MmkitError) as err:
        dyn_unc(P_HAND, 4, drop_last_window=True)
    assert err.value.field == "--drop-last-window"


# ---------------------------------------------------------------- §10.3 forgetting

FORGET_ROWS = {"111111": 0, "010101": 2, "000000": 6, "100000": 1, "000001": 0, "101010": 3}


def test_forgetting_rows_and_selection():
    correct = np.array([[float(c) for c in row] for row in FORGET_ROWS]).T   # [K=6, 6]
    np.testing.assert_array_equal(forgetting(correct), list(FORGET_ROWS.values()))
    result = compute_scores([ArrayDynamics({"correct": correct})], "forgetting")
    kept = select(result.importance, n_keep_for(6, keep=0.5)).kept
    assert sorted(np.array(list(FORGET_ROWS))[kept]) == ["000000", "010101", "101010"]


def test_forgetting_skips_missing_epochs_and_all_nan_is_nan():
    correct = np.array([[1, np.nan, 0, 1], [np.nan] * 4, [np.nan, 0, np.nan, 0]]).T
    f = forgetting(correct)
    assert f[0] == 1 and np.isnan(f[1]) and f[2] == 2       # never learned: K_i = 2 observed
    result = compute_scores([ArrayDynamics({"correct": correct})], "forgetting")
    assert result.nan_count == 1
    assert select(result.importance, 1, nan_policy="keep").kept.tolist() == [1]
    assert select(result.importance, 1, nan_policy="drop").kept.tolist() == [2]


def test_forgetting_sums_over_runs():
    a = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], dtype=np.float32)       # F = 2, 0
    b = np.array([[1, 0], [0, 0], [1, 0], [1, np.nan]], dtype=np.float32)  # F = 1, 3 (never learned)
    result = compute_scores([ArrayDynamics({"correct": a}), ArrayDynamics({"correct": b})], "forgetting")
    np.testing.assert_array_equal(result.score, [3, 3])


# ---------------------------------------------------------------- §10.4 AUM

def test_aum_hand_values_and_importance():
    # y = 0: logits [2,1,.5] then [0,3,1] -> margins 1, -3; y = 2: [1,1,1] then [0,0,2] -> 0, 2
    margin = np.array([[1.0, 0.0], [-3.0, 2.0]])
    np.testing.assert_allclose(aum(margin), [-1.0, 1.0])
    result = compute_scores([ArrayDynamics({"margin": margin})], "aum")
    np.testing.assert_allclose(result.score, [-1.0, 1.0])
    np.testing.assert_allclose(result.importance, [1.0, -1.0])
    assert select(result.importance, 1).kept.tolist() == [0]


def test_aum_mean_over_observed_and_prob_space_sum():
    margin = np.array([[1.0, 0.2], [np.nan, 0.4], [3.0, np.nan]])
    np.testing.assert_allclose(aum(margin), [2.0, 0.3])
    result = compute_scores([ArrayDynamics({"prob_margin": margin})], "aum",
                            ScoreParams(aum_space="prob"))
    np.testing.assert_allclose(result.score, [4.0, 0.6], rtol=1e-6)   # CCS sums (§12.7)
    np.testing.assert_allclose(result.importance, [-4.0, -0.6], rtol=1e-6)


# ---------------------------------------------------------------- §10.5 EL2N and entropy

def channel_from_logits(name: str, logits: list[list[float]], targets: list[int]) -> np.ndarray:
    """The recorder's channel ``name`` (mmkit.prune.dynamics.CHANNELS) for one epoch of logits."""
    import torch

    from mmkit.prune.dynamics import CHANNELS

    z = torch.tensor(logits, dtype=torch.float32)
    return CHANNELS.resolve(name).fn(z, z.softmax(1), torch.tensor(targets)).numpy()


def test_aum_from_logits():
    epochs = [[[2, 1, 0.5], [1, 1, 1]], [[0, 3, 1], [0, 0, 2]]]          # [K, n, C], y = 0, 2
    margin = np.stack([channel_from_logits("margin", z, [0, 2]) for z in epochs])
    np.testing.assert_allclose(margin, [[1, 0], [-3, 2]])
    result = compute_scores([ArrayDynamics({"margin": margin})], "aum")
    np.testing.assert_allclose(result.score, [-1.0, 1.0])
    assert result.importance[0] > result.importance[1]


def test_el2n_and_entropy_hand_values():
    logits, targets = [[0, 0, 0, 0], [30, 0, 0, 0]], [1, 0]
    e = np.stack([channel_from_logits("el2n", logits, targets)] * 3)
    h = np.stack([channel_from_logits("entropy", logits, targets)] * 3)
    np.testing.assert_allclose(el2n(e)[0], 0.8660254, atol=1e-6)
    np.testing.assert_allclose(entropy(h)[0], 1.3862944, atol=1e-6)
    assert entropy(h)[1] < 1e-3
    src = ArrayDynamics({"el2n": e, "entropy": h})
    np.testing.assert_allclose(compute_scores([src], "el2n").score[0], 0.8660254, atol=1e-6)
    np.testing.assert_allclose(compute_scores([src], "entropy").score[0], 1.3862944, atol=1e-6)


def test_el2n_default_first_ten_epochs_and_selection():
    values = np.arange(12, dtype=np.float32)[:, None] * np.ones((1, 2))     # e_k = k
    values[:, 1] *= 2
    result = compute_scores([ArrayDynamics({"el2n": values})], "el2n")
    np.testing.assert_allclose(result.score, [4.5, 9.0])                   # mean of epochs 0..9
    assert result.params["el2n_epochs"] == list(range(10))
    picked = compute_scores([ArrayDynamics({"el2n": values}, epochs=range(100, 112))], "el2n",
                            ScoreParams(el2n_epochs=[100, 111]))
    np.testing.assert_allclose(picked.score, [5.5, 11.0])
    with pytest.raises(MmkitError) as err:
        compute_scores([ArrayDynamics({"el2n": values})], "el2n", ScoreParams(el2n_epochs=[12]))
    assert err.value.field == "--el2n-epochs"


def test_el2n_averages_over_all_epochs_of_all_runs():
    a = np.array([[1.0], [np.nan], [3.0]])
    b = np.array([[5.0], [7.0], [9.0]])
    result = compute_scores([ArrayDynamics({"el2n": a}), ArrayDynamics({"el2n": b})], "el2n",
                            ScoreParams(el2n_epochs=[0, 1]))
    np.testing.assert_allclose(result.score, [(1 + 5 + 7) / 3])            # pooled, NaN skipped


def test_entropy_last_epoch_or_mean_of_epochs():
    h = np.array([[0.1, 0.9], [0.3, 0.7], [0.5, 0.2]])
    src = ArrayDynamics({"entropy": h})
    np.testing.assert_allclose(compute_scores([src], "entropy").score, [0.5, 0.2], rtol=1e-6)
    mean = compute_scores([src], "entropy", ScoreParams(entropy_epochs=[0, 1]))
    np.testing.assert_allclose(mean.score, [0.2, 0.8], rtol=1e-6)
    assert mean.params["entropy_epochs"] == [0, 1]
    with pytest.raises(MmkitError) as err:
        compute_scores([src], "entropy", ScoreParams(entropy_epochs=[3]))
    assert err.value.field == "--entropy-epochs"


# ---------------------------------------------------------------- cartography, random

def test_cartography_modes_and_extras():
    p = np.array([[0.2, 0.9], [0.6, 0.9], [0.4, 0.6]])
    correct = np.array([[0, 1], [1, 1], [np.nan, 0]], dtype=np.float32)
    src = ArrayDynamics({"p_true": p, "correct": correct})
    amb = compute_scores([src], "cartography")
    np.testing.assert_allclose(amb.extras["confidence"], [0.4, 0.8], rtol=1e-6)
    np.testing.assert_allclose(amb.extras["variability"], [np.sqrt(0.08 / 3), np.sqrt(0.06 / 3)],
                               rtol=1e-6)
    np.testing.assert_allclose(amb.extras["correctness"], [0.5, 2 / 3], rtol=1e-6)
    np.testing.assert_array_equal(amb.importance, amb.extras["variability"])
    hard = compute_scores([src], "cartography", ScoreParams(carto_mode="hard"))
    np.testing.assert_allclose(hard.importance, [-0.4, -0.8], rtol=1e-6)
    easy = compute_scores([src], "cartography", ScoreParams(carto_mode="easy"))
    np.testing.assert_allclose(easy.importance, [0.4, 0.8], rtol=1e-6)
    no_correct = compute_scores([ArrayDynamics({"p_true": p})], "cartography")
    assert set(no_correct.extras) == {"confidence", "variability"}


def test_random_importance_is_a_seeded_permutation():
    imp = random_importance(50, 3)
    assert sorted(imp.tolist()) == list(range(50))
    expected = np.random.default_rng(np.random.SeedSequence([3, 1])).permutation(50)
    np.testing.assert_array_equal(imp, expected)
    src = ArrayDynamics({"p_true": np.zeros((2, 50))})
    np.testing.assert_array_equal(compute_scores([src], "random", ScoreParams(seed=3)).importance, imp)
    assert not np.array_equal(random_importance(50, 4), imp)


# ---------------------------------------------------------------- engine errors and runs

def test_missing_channel_names_channel_and_channels_value():
    with pytest.raises(MmkitError) as err:
        compute_scores([ArrayDynamics({"p_true": P_HAND})], "aum")
    assert err.value.field == "--channels"
    assert "'margin'" in str(err.value) and "--channels p_true,margin" in str(err.value)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_checks_its_channels(method):
    src = ArrayDynamics({"unrelated": np.zeros((3, 4))})
    if not METHODS.resolve(method).channels(ScoreParams()):
        assert compute_scores([src], method).importance.shape == (4,)
    else:
        with pytest.raises(MmkitError, match="--channels"):
            compute_scores([src], method, ScoreParams(window=2))


def test_sources_of_different_size_are_an_error():
    a = ArrayDynamics({"p_true": np.zeros((4, 3))})
    b = ArrayDynamics({"p_true": np.zeros((4, 5))})
    with pytest.raises(MmkitError) as err:
        compute_scores([a, b], "dyn-unc", ScoreParams(window=2))
    assert err.value.field == "--dynamics"


def test_dyn_unc_averages_runs_and_skips_nan_runs():
    rng = np.random.default_rng(1)
    a, b = rng.random((6, 20)), rng.random((8, 20))
    b[:, 3] = np.nan
    result = compute_scores([ArrayDynamics({"p_true": a}), ArrayDynamics({"p_true": b})], "dyn-unc",
                            ScoreParams(window=3))
    expected = (dyn_unc(a, 3) + dyn_unc(b, 3)) / 2
    expected[3] = dyn_unc(a, 3)[3]
    np.testing.assert_allclose(result.importance, expected, atol=1e-6)
    assert result.params["num_runs"] == 2 and result.params["window"] == 3


def test_unknown_method_and_bad_params():
    with pytest.raises(MmkitError) as err:
        compute_scores([ArrayDynamics({"p_true": P_HAND})], "dynunc")
    assert err.value.field == "--method" and "dyn-unc" in str(err.value)
    with pytest.raises(MmkitError, match="--carto-mode"):
        ScoreParams(carto_mode="middle")
    with pytest.raises(MmkitError, match="--aum-space"):
        ScoreParams(aum_space="log")
