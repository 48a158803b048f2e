"""mmkit/core/similarity.py: CCA, SVCCA, PWCCA, linear CKA (distill.md §1.5) and activation extraction."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mmkit.core import similarity as S
from mmkit.errors import MmkitError

N, D = 2000, 10


def gauss(seed: int, n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def orthogonal(seed: int, d: int = D) -> np.ndarray:
    q, r = np.linalg.qr(gauss(seed, d, d))
    return q * np.sign(np.diag(r))


def test_import_does_not_import_torch():
    code = "import sys, mmkit.core.similarity; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_registry_holds_the_four_metrics():
    assert S.METRIC_NAMES == ("cca", "svcca", "pwcca", "cka")
    assert [S.METRICS.resolve(m).needs_samples for m in S.METRIC_NAMES] == [True, True, True, False]


# --------------------------------------------------------------------------- the Done-when properties


def test_identical_inputs_give_one_for_every_metric():
    x = gauss(0)
    for r in (S.cca(x, x), S.svcca(x, x), S.pwcca(x, x)):
        assert r.mean == pytest.approx(1.0, abs=1e-5) and len(r.rho) == D
    assert S.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    exact = S.cca(x, x, eps=0.0)
    np.testing.assert_allclose(exact.rho, 1.0, atol=1e-10)


def test_invertible_linear_map_gives_one():
    x = gauss(1)
    y = x @ (gauss(2, D, D) + 3 * np.eye(D))  # invertible, not orthogonal
    assert np.linalg.cond(y.T @ y) > 2  # a real distortion, not a rotation
    for fn in (S.cca, S.svcca, S.pwcca):
        assert fn(x, y).mean == pytest.approx(1.0, abs=1e-4)
        assert fn(x, y, eps=0.0).mean == pytest.approx(1.0, abs=1e-9)
    assert S.linear_cka(x, y) < 0.99  # CKA is not invariant to general invertible maps


def test_independent_noise_with_n_much_larger_than_d_is_near_zero():
    x, y = gauss(3, 5000), gauss(4, 5000)
    # E[mean rho] is about sqrt(d / N) = 0.045 here; the bound leaves a factor two
    for fn in (S.cca, S.svcca, S.pwcca):
        assert 0 <= fn(x, y).mean < 0.1
    assert 0 <= S.linear_cka(x, y) < 0.01  # E[CKA] is about d / N = 0.002


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling():
    x = gauss(5)
    y = np.tanh(x @ gauss(6, D, D)) + 0.5 * gauss(7)
    base = S.linear_cka(x, y)
    assert 0.1 < base < 0.95
    assert S.linear_cka(x @ orthogonal(8), y) == pytest.approx(base, rel=1e-10)
    assert S.linear_cka(x, y @ orthogonal(9)) == pytest.approx(base, rel=1e-10)
    assert S.linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert S.linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, rel=1e-10)  # centred first
    assert S.linear_cka(x * np.arange(1, D + 1), y) != pytest.approx(base, rel=1e-3)  # anisotropic scaling


# --------------------------------------------------------------------------- against independent formulas


def test_one_dimensional_cca_is_abs_pearson_r_and_cka_is_r_squared():
    rng = np.random.default_rng(10)
    x = rng.standard_normal(300)
    y = -0.5 * x + rng.standard_normal(300)
    r = np.corrcoef(x, y)[0, 1]
    assert r < -0.3
    assert S.cca(x[:, None], y[:, None], eps=0.0).mean == pytest.approx(abs(r), rel=1e-12)
    assert S.linear_cka(x[:, None], y[:, None]) == pytest.approx(r * r, rel=1e-12)


def test_rho_equals_singular_values_of_qr_bases_with_eps_zero():
    x = gauss(11, 500, 6)
    y = x[:, :4] @ gauss(12, 4, 4) + gauss(13, 500, 4)
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    want = np.linalg.svd(qx.T @ qy, compute_uv=False)
    got = S.cca(x, y, eps=0.0)
    np.testing.assert_allclose(got.rho, want, atol=1e-10)
    assert got.mean == pytest.approx(want.mean(), abs=1e-12) and got.dims == (6, 4)
    assert S.cca(x, y).mean == pytest.approx(want.mean(), abs=1e-5)  # the default ridge changes little


def test_pwcca_weights_match_an_independent_qr_computation():
    x = gauss(14, 800, 4)                                # the smaller side
    y = np.c_[x @ gauss(15, 4, 4), gauss(16, 800, 3)] + 0.8 * gauss(17, 800, 7)
    xc = x - x.mean(0)
    qx, rx = np.linalg.qr(xc)
    qy, _ = np.linalg.qr(y - y.mean(0))
    u, s, _ = np.linalg.svd(qx.T @ qy)
    alpha = np.abs(u.T @ rx).sum(1)                      # sum_j |<p_i, a_j>| with P = Q_x U
    alpha /= alpha.sum()
    got = S.pwcca(x, y, eps=0.0)
    np.testing.assert_allclose(got.weights, alpha, atol=1e-8)
    assert got.mean == pytest.approx(alpha @ s, abs=1e-10)
    assert got.weights.sum() == pytest.approx(1.0) and (got.weights >= 0).all()
    swapped = S.pwcca(y, x, eps=0.0)                     # the smaller side is now B
    np.testing.assert_allclose(swapped.weights, alpha, atol=1e-8)
    assert S.pwcca(x, x).mean == pytest.approx(1.0, abs=1e-5)


def test_svcca_keeps_the_known_rank_of_low_rank_data():
    z = gauss(18, N, 3)
    x = z @ gauss(19, 3, 12) + 1e-4 * gauss(20, N, 12)  # rank 3 plus faint noise
    y = z @ gauss(21, 3, 8)                               # exactly rank 3
    assert S.svd_reduce(x).shape == (N, 3) and S.svd_reduce(y).shape == (N, 3)
    assert S.svd_reduce(x, dims=5).shape == (N, 5) and S.svd_reduce(x, dims=50).shape == (N, 12)
    r = S.svcca(x, y)
    assert r.dims == (3, 3) and r.mean == pytest.approx(1.0, abs=1e-5)
    energy = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    k = S.svd_reduce(x, keep=0.5).shape[1]               # fewest directions reaching 50%
    assert energy[:k].sum() >= 0.5 * energy.sum() > energy[:k - 1].sum()


def test_near_constant_neurons_are_dropped():
    x = gauss(22)
    padded = np.c_[x, np.full(N, 3.0), 1e-9 * gauss(23, N, 1)]
    r = S.cca(padded, x)
    assert r.dims == (D, D) and r.mean == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(MmkitError, match="every feature is constant"):
        S.cca(np.ones((50, 3)), gauss(24, 50, 3))


def test_too_few_samples_is_an_error_that_says_how_many_are_needed():
    x, y = gauss(25, 8, 10), gauss(26, 8, 6)
    with pytest.raises(MmkitError) as err:
        S.cca(x, y)
    assert str(err.value) == ("CCA needs more samples than features: N=8, d=10; give at least 11 samples "
                              "(50 or more recommended)")
    for fn in (S.svcca, S.pwcca):
        with pytest.raises(MmkitError, match="N=8, d=10"):
            fn(x, y)
    with pytest.raises(MmkitError, match="N=10, d=10"):
        S.check_samples(10, 10)
    S.check_samples(11, 10)
    assert 0 <= S.linear_cka(x, y) <= 1  # CKA has no such requirement


def test_torch_tensors_are_accepted_in_float64():
    torch = pytest.importorskip("torch")
    x = gauss(27, 300, 5)
    assert S.cca(torch.from_numpy(x).float(), x).mean == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- grid


def test_grid_matches_direct_calls_and_diagonal_leaves_the_rest_empty():
    acts_a = {0: gauss(30, 400, 6), 1: gauss(31, 400, 6)}
    acts_b = {"x": acts_a[0] @ gauss(32, 6, 4), "y": gauss(33, 400, 3), "z": acts_a[1]}
    grid = S.similarity_grid(acts_a, acts_b, progress=False)
    assert grid.layers_a == [0, 1] and grid.layers_b == ["x", "y", "z"] and len(grid.pairs) == 6
    for la, lb in grid.pairs:
        assert grid.value("cca", la, lb) == pytest.approx(S.cca(acts_a[la], acts_b[lb]).mean, abs=1e-12)
        assert grid.value("svcca", la, lb) == pytest.approx(S.svcca(acts_a[la], acts_b[lb]).mean, abs=1e-12)
        assert grid.value("pwcca", la, lb) == pytest.approx(S.pwcca(acts_a[la], acts_b[lb]).mean, abs=1e-12)
        assert grid.value("cka", la, lb) == pytest.approx(S.linear_cka(acts_a[la], acts_b[lb]), abs=1e-12)
        np.testing.assert_allclose(grid.rho[(la, lb)]["cca"], S.cca(acts_a[la], acts_b[lb]).rho)
    assert grid.value("cca", 0, "x") == pytest.approx(1.0, abs=1e-5)
    diag = S.similarity_grid(acts_a, {"x": acts_b["x"], "z": acts_b["z"]}, pairs=[(0, "x"), (1, "z")],
                             metrics=["cka"], progress=False)
    assert diag.metrics == ["cka"] and np.isnan(diag.values["cka"][0, 1]) and np.isnan(diag.values["cka"][1, 0])
    assert diag.value("cka", 1, "z") == pytest.approx(1.0)


def test_grid_checks_samples_only_for_the_cca_family():
    few = {"l": gauss(34, 5, 8)}
    with pytest.raises(MmkitError, match="N=5, d=8; give at least 9 samples"):
        S.similarity_grid(few, few, metrics=["cka", "pwcca"], progress=False)
    assert S.similarity_grid(few, few, metrics=["cka"], progress=False).value("cka", "l", "l") == pytest.approx(1.0)
    with pytest.raises(MmkitError, match="unknown similarity metric 'ckaa'"):
        S.similarity_grid(few, few, metrics=["ckaa"], progress=False)


# --------------------------------------------------------------------------- activations of a text encoder

TEXTS = ["a man riding a horse", "two cats", "a red bus near the street with a dog", "what is there"]


@pytest.fixture(scope="module")
def bert(tiny_bert):
    from mmkit.core.models import load_model

    return load_model(tiny_bert, "encoder", device="cpu")


def _reference_states(lm, text: str, pair: str | None = None):
    """Hidden states of one text, run alone (no padding, no batching)."""
    import torch

    enc = lm.preprocessor(text, text_pair=pair, return_tensors="pt")
    with torch.no_grad():
        return [h[0].numpy() for h in lm.model(**enc, output_hidden_states=True).hidden_states]


@pytest.mark.parametrize("unit", ["token", "cls", "mean"])
def test_hidden_states_match_unbatched_forward_passes(bert, unit):
    tokens = S.tokenize(bert.preprocessor, TEXTS, max_length=64)
    sel = S.select_samples(tokens, unit, max_samples=10_000)
    got = S.hidden_states(bert.model, tokens, sel, [0, 2], pad_id=0, batch_size=3, progress=False)
    for layer in (0, 2):
        ref = [_reference_states(bert, t)[layer] for t in TEXTS]
        want = {"token": np.concatenate(ref), "cls": np.stack([r[0] for r in ref]),
                "mean": np.stack([r.mean(0) for r in ref])}[unit]
        assert got[layer].shape == want.shape and got[layer].dtype == np.float32
        np.testing.assert_allclose(got[layer], want, atol=1e-5)


def test_token_subsample_is_seeded_and_picks_the_right_rows(bert):
    tokens = S.tokenize(bert.preprocessor, TEXTS, max_length=64)
    total = int(tokens.ids.lengths.sum())
    sel = S.select_samples(tokens, "token", max_samples=7, seed=3)
    assert len(sel) == 7 and np.array_equal(sel.chosen, S.select_samples(tokens, "token", 7, seed=3).chosen)
    assert not np.array_equal(sel.chosen, S.select_samples(tokens, "token", 7, seed=4).chosen)
    got = S.hidden_states(bert.model, tokens, sel, [1], pad_id=0, batch_size=2, progress=False)[1]
    every = np.concatenate([_reference_states(bert, t)[1] for t in TEXTS])
    assert len(every) == total
    np.testing.assert_allclose(got, every[sel.chosen], atol=1e-5)
    assert set(sel.sequences) == set(np.searchsorted(tokens.ids.offsets, sel.chosen, side="right") - 1)


def test_text_pairs_keep_token_type_ids(bert):
    pairs = ["a dog", "the cat is on the bed", "yes", "no"]
    tokens = S.tokenize(bert.preprocessor, TEXTS, pairs, max_length=64)
    assert tokens.types is not None and tokens.types.flat.max() == 1
    got = S.hidden_states(bert.model, tokens, S.select_samples(tokens, "mean"), [2], pad_id=0, progress=False)[2]
    want = np.stack([_reference_states(bert, t, p)[2].mean(0) for t, p in zip(TEXTS, pairs)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_first_difference_finds_the_first_differing_sequence():
    from mmkit.core.data import TokenArrays

    def tok(seqs):
        return S.Tokenized(TokenArrays.from_lists(seqs))

    assert S.first_difference(tok([[1, 2], [3]]), tok([[1, 2], [3]])) is None
    assert S.first_difference(tok([[1, 2], [3], [4, 5]]), tok([[1, 2], [3], [4, 6]])) == 2
    assert S.first_difference(tok([[1, 2], [3, 4]]), tok([[1, 2], [3]])) == 1
    assert S.first_difference(tok([[1], [2, 3]]), tok([[1], [2, 3], [4]])) == 2


def test_layer_beyond_the_model_is_a_model_error(bert):
    tokens = S.tokenize(bert.preprocessor, TEXTS[:1], max_length=64)
    assert S.num_hidden_states(bert.model.config) == 3
    with pytest.raises(MmkitError, match="layer 3 does not exist: the model returns 3 hidden states"):
        S.hidden_states(bert.model, tokens, S.select_samples(tokens, "cls"), [3], pad_id=0, progress=False)


def test_heatmap_is_a_png(tmp_path):
    path = tmp_path / "h.png"
    S.plot_heatmap(path, np.array([[1.0, np.nan], [0.2, 0.5]]), [0, 1], ["a", "b"], title="cca", outline=[(0, 0)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temp file left
