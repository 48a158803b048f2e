"""Reusable distillation losses (distill.md §0, §1.4).

Small pure functions over tensors; none knows about a particular model or method. Similarity
terms (CCA, CKA) run in float32 with autocast off (distill.md §0). "Mean over tokens" always
means over non-padding tokens, given by an attention ``mask`` [B, L] (1 = token, 0 = pad).
The second (teacher) argument of every two-sided loss is detached: teachers carry no gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmkit.errors import ConfigError

Projection = Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | None


def is_regression(logits: torch.Tensor) -> bool:
    """One output column means regression (C = 1, distill.md §0)."""
    return logits.shape[-1] == 1


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """``L_kd = T² · (1/B) Σ_b KL(softmax(z_t,b/T) ‖ softmax(z_s,b/T))`` (distill.md §1.4, "batchmean").

    For regression (C = 1) the softmax term becomes the MSE between the raw teacher and
    student outputs (distill.md §0). ``teacher_logits`` carry no gradient.
    """
    z_t = teacher_logits.detach().to(student_logits.dtype)
    if is_regression(student_logits):
        return F.mse_loss(student_logits, z_t)
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(z_t / t, dim=-1)
    return t * t * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``L_ce = CE(z_s, y)`` (distill.md §1.4); labels equal to ``ignore_index`` are skipped.

    For regression (C = 1) this is the MSE between the raw output and the float label (§0).
    """
    if is_regression(logits):
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                           ignore_index=ignore_index)


def _apply_projection(h: torch.Tensor, projection: Projection) -> torch.Tensor:
    if projection is None:
        return h
    if isinstance(projection, torch.Tensor):
        return h @ projection
    return projection(h)


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor,
               projection: Projection = None) -> torch.Tensor:
    """One layer's ``mean_tokens ‖ h_s W_h − h_t ‖² / d_t`` (distill.md §1.4, ``L_hid``).

    ``h_s`` [B, L, d_s], ``h_t`` [B, L, d_t], ``mask`` [B, L]. ``projection`` is W_h, either a
    [d_s, d_t] tensor or a module (e.g. ``nn.Linear(d_s, d_t, bias=False)``); None when d_s = d_t.
    Padded positions do not contribute. The caller sums over the mapped layers.
    """
    diff = _apply_projection(h_s, projection) - h_t.detach().to(h_s.dtype)
    per_token = diff.pow(2).sum(-1) / h_t.shape[-1]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def attention_mse(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One layer's ``mean over valid (b, head, i, k) of (A_s − A_t)²`` (distill.md §1.4, ``L_att`` mse).

    ``a_s``, ``a_t`` [B, H, L, L] post-softmax maps with the same head count; padded query rows
    and key columns (``mask`` [B, L] = 0) are excluded.
    """
    m = mask.to(a_s.dtype)
    valid = (m[:, :, None] * m[:, None, :])[:, None]                      # [B, 1, L, L]
    sq = (a_s - a_t.detach().to(a_s.dtype)).pow(2) * valid
    return sq.sum() / (valid.sum() * a_s.shape[1]).clamp_min(1)


def _relation_log_probs(x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """``log softmax(X_r X_rᵀ / √(d/r))`` [B, r, L, L] with padded keys masked to −inf."""
    b, n, d = x.shape
    if d % heads:
        raise ConfigError(f"relation heads ({heads}) must divide the hidden width ({d})",
                          field="loss.attention.relation_heads")
    xr = x.reshape(b, n, heads, d // heads).transpose(1, 2)              # [B, r, L, d/r]
    scores = xr @ xr.transpose(-1, -2) / (d / heads) ** 0.5
    keys = mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2 relation loss for one of Q, K, V (distill.md §1.4, ``L_att`` relation).

    ``R_X = softmax(X_r X_rᵀ / √(d/r))`` per model (d its own width, r = ``heads`` relation
    heads), padded keys masked; returns the mean over (b, r, valid query) of KL(R_t ‖ R_s).
    ``x_s`` [B, L, d_s], ``x_t`` [B, L, d_t]; head counts of the two models may differ.
    """
    log_s = _relation_log_probs(x_s, mask, heads)
    log_t = _relation_log_probs(x_t.detach().to(x_s.dtype), mask, heads)
    keys = mask.to(log_s.dtype)[:, None, None, :]
    kl = (log_t.exp() * (log_t - log_s) * keys).sum(-1)                  # [B, r, L]
    queries = mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * queries).sum() / queries.sum().clamp_min(1)


def _centre32(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x - x.mean(0, keepdim=True)


def cca_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-4, top_k: int | None = None) -> torch.Tensor:
    """``1 − mean(ρ_1..k)``, the differentiable CCA-alignment term (distill.md §1.4, ``L_cca``).

    mmkit's stand-in for the unpublished method of Fan et al. (ACL 2025). ``x`` [N, d_s] and
    ``y`` [N, d_t] are token rows. Centre; Σxx = XᵀX/(N−1) + ε·(tr Σxx/d_s)·I (same for Σyy);
    Σxy = XᵀY/(N−1); whiten with Cholesky factors by triangular solves; M = Wx Σxy Wyᵀ;
    ρ = svdvals(M) (descending); k = ``top_k`` or min(d_s, d_t). Float32, autocast off.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc, yc = _centre32(x), _centre32(y.detach())
        n = xc.shape[0]

        def chol(a: torch.Tensor) -> torch.Tensor:
            cov = a.T @ a / (n - 1)
            d = cov.shape[0]
            scale = (torch.trace(cov) / d).clamp_min(torch.finfo(cov.dtype).tiny)
            return torch.linalg.cholesky(cov + eps * scale * torch.eye(d, dtype=cov.dtype, device=cov.device))

        lx, ly = chol(xc), chol(yc)
        sxy = xc.T @ yc / (n - 1)
        a = torch.linalg.solve_triangular(lx, sxy, upper=False)          # Lx⁻¹ Σxy
        m = torch.linalg.solve_triangular(ly, a.T, upper=False).T          # Lx⁻¹ Σxy Ly⁻ᵀ
        rho = torch.linalg.svdvals(m)
        k = min(xc.shape[1], yc.shape[1]) if top_k is None else top_k
        return 1.0 - rho[:k].mean()


def cka_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 − linear CKA`` on centred X, Y: CKA = ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) (distill.md §1.4/§1.5).

    The ``cca.objective: cka`` variant of ``L_cca``; feature-space form, float32, autocast off.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc, yc = _centre32(x), _centre32(y.detach())
        num = (yc.T @ xc).pow(2).sum()
        den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
        return 1.0 - num / den.clamp_min(torch.finfo(den.dtype).tiny)
