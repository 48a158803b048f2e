"""Tests of mmkit/core/losses.py against hand-computed values and reference formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmkit.core.losses import attention_mse, ce_loss, cca_loss, cka_loss, hidden_mse, kd_loss, relation_kl
from mmkit.errors import ConfigError


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_loss_matches_a_hand_computed_2x3_example_with_the_t_squared_factor():
    zs = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 2.0
    ps, pt = _softmax(zs / t), _softmax(zt / t)
    kl_rows = (pt * (np.log(pt) - np.log(ps))).sum(1)          # KL(p_t || p_s) per row
    expected = t * t * kl_rows.mean()                          # batchmean, times T^2
    got = kd_loss(torch.tensor(zs), torch.tensor(zt), temperature=t)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # The T^2 factor: the same KL without it is 4x smaller.
    assert float(got) / kl_rows.mean() == pytest.approx(4.0)
    assert float(kd_loss(torch.tensor(zs), torch.tensor(zt), 1.0)) == pytest.approx(
        (_softmax(zt) * (np.log(_softmax(zt)) - np.log(_softmax(zs)))).sum(1).mean(), rel=1e-10)


def test_kd_loss_is_zero_when_logits_agree_and_mse_for_regression():
    z = torch.randn(4, 3)
    assert float(kd_loss(z, z.clone(), 3.0)) == pytest.approx(0.0, abs=1e-7)
    s, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    assert float(kd_loss(s, t, temperature=2.0)) == pytest.approx((1 + 4) / 2)  # raw MSE, no T


def test_kd_loss_sends_no_gradient_to_the_teacher():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def test_ce_loss_skips_ignored_labels_and_is_mse_for_regression():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    labels = torch.tensor([0, 1, -100])
    expected = -(math.log(_softmax(np.array([2.0, 0.0]))[0]) + math.log(_softmax(np.array([0.0, 1.0]))[1])) / 2
    assert float(ce_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(ce_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 1.0]))) == pytest.approx((1 + 4) / 2)


def test_hidden_mse_with_projection_hand_value_and_padding_ignored():
    h_s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])          # B=1, L=3, d_s=2
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])                # W_h: d_s=2 -> d_t=3
    h_t = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [7.0, 7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 1: h W = (1, 0, 1) vs (1, 1, 1): |.|^2 = 1; token 2: (0, 2, 2) vs 0: 8; each / d_t = 3; mean of 2.
    expected = (1 / 3 + 8 / 3) / 2
    assert float(hidden_mse(h_s, h_t, mask, w)) == pytest.approx(expected)
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(w.T)
    assert float(hidden_mse(h_s, h_t, mask, proj).detach()) == pytest.approx(expected)
    perturbed_s, perturbed_t = h_s.clone(), h_t.clone()
    perturbed_s[0, 2] = -100.0
    perturbed_t[0, 2] = 55.0
    assert float(hidden_mse(perturbed_s, perturbed_t, mask, w)) == pytest.approx(expected)
    assert float(hidden_mse(h_t, h_t.clone(), mask)) == 0.0


def test_attention_mse_masks_padded_queries_and_keys():
    a_s = torch.zeros(1, 2, 3, 3)
    a_t = torch.zeros(1, 2, 3, 3)
    a_s[0, 0, 0, 1] = 0.5      # valid (query 0, key 1), head 0
    a_s[0, 1, 1, 0] = -0.25    # valid, head 1
    mask = torch.tensor([[1, 1, 0]])
    expected = (0.25 + 0.0625) / (2 * 2 * 2)  # mean over H=2 heads x 2 valid queries x 2 valid keys
    assert float(attention_mse(a_s, a_t, mask)) == pytest.approx(expected)
    a_s[0, :, 2, :] = 7.0     # padded query row
    a_s[0, :, :, 2] = 3.0     # padded key column
    assert float(attention_mse(a_s, a_t, mask)) == pytest.approx(expected)


def _relation_reference(x_s, x_t, mask, heads):
    """Loop-based KL(R_t || R_s) averaged over (b, r, valid query)."""
    total, count = 0.0, 0
    for b in range(x_s.shape[0]):
        n = int(mask[b].sum())
        for r in range(heads):
            rel = []
            for x in (x_t, x_s):
                d = x.shape[-1]
                part = x[b, :n, r * d // heads:(r + 1) * d // heads].double()
                rel.append(torch.softmax(part @ part.T / math.sqrt(d / heads), -1))
            for i in range(n):
                total += float((rel[0][i] * (rel[0][i].log() - rel[1][i].log())).sum())
                count += 1
    return total / count


def test_relation_kl_matches_a_loop_reference_across_widths():
    torch.manual_seed(0)
    x_s, x_t = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(relation_kl(x_s, x_t, mask, 4)) == pytest.approx(_relation_reference(x_s, x_t, mask, 4), rel=1e-5)
    assert float(relation_kl(x_s, x_s.clone(), mask, 2)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="relation heads"):
        relation_kl(x_s, x_t, mask, 5)


def _exact_pair(n: int, rho: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X, Y whose canonical correlations are exactly (1, rho): orthonormal centred columns."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, 3)) - rng.standard_normal((n, 3)).mean(0))
    q -= q.mean(0)
    q, _ = np.linalg.qr(q)  # centred orthonormal columns z1, z2, e
    x = q[:, :2]
    y = np.stack([q[:, 0], rho * q[:, 1] + math.sqrt(1 - rho ** 2) * q[:, 2]], 1)
    return torch.tensor(x), torch.tensor(y)


def test_cca_loss_known_answer_and_top_k():
    x, y = _exact_pair(200, 0.6)
    assert float(cca_loss(x, y, eps=0.0)) == pytest.approx(1 - (1 + 0.6) / 2, abs=1e-5)
    assert float(cca_loss(x, y, eps=0.0, top_k=1)) == pytest.approx(0.0, abs=1e-5)


def test_cca_loss_is_invariant_to_invertible_maps_and_small_for_independent_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 6, generator=g)
    a = torch.randn(6, 6, generator=g) + 3 * torch.eye(6)
    assert float(cca_loss(x, x @ a, eps=1e-6)) == pytest.approx(0.0, abs=1e-3)
    # Independent Gaussians: canonical correlations are O(sqrt(d / N)), so the loss is close to 1.
    assert float(cca_loss(x, torch.randn(2000, 6, generator=g), eps=1e-6)) > 0.9


def test_cca_loss_has_finite_gradients_for_rank_deficient_inputs():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(100, 2, generator=g) @ torch.randn(2, 6, generator=g)).requires_grad_()  # rank 2 of 6
    loss = cca_loss(x, torch.randn(100, 4, generator=g), eps=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_cka_loss_matches_the_sample_space_formula_and_its_invariances():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    h = np.eye(50) - 1 / 50
    k, lmat = h @ (x @ x.T).numpy() @ h, h @ (y @ y.T).numpy() @ h
    cka = (k * lmat).sum() / math.sqrt((k * k).sum() * (lmat * lmat).sum())
    assert float(cka_loss(x, y)) == pytest.approx(1 - cka, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert float(cka_loss(x, 2.5 * x @ q)) == pytest.approx(0.0, abs=1e-6)
