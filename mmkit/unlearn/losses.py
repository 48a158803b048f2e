"""EFUF losses (unlearn.md §3): per-sample likelihood, the paper and released-code objectives,
their schedules, and the collapse guard of §3.5.

Every function is pure over tensors; :mod:`mmkit.unlearn.efuf` wires them into the training loop.
A batch holds samples of several kinds (``pos``, ``neg``, ``sent``, ``replay``); ``kinds`` is the
per-row kind list (the training loop's ``stream`` column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mmkit.registry import Registry

KINDS = ("pos", "neg", "sent", "replay")
#: Decay of the training ``L_pos`` moving average the collapse guard watches (§3.5).
GUARD_EMA_DECAY = 0.98
#: Optimizer step at which the training EMA's reference value is taken (capped at ``T``).
GUARD_EMA_WARMUP = 50


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """§3.2: ``NLL_i = -(1/|T_i|) sum_{t in T_i} log softmax(z_{i,t-1})[y_{i,t}]`` in fp32.

    ``logits`` [B, L, V], ``labels`` [B, L]; shifted by one. A per-sample mean over labelled
    tokens, never a flat mean over the batch. A row without labelled tokens gives NaN.
    """
    z = logits[:, :-1].float()
    y = labels[:, 1:]
    mask = y != ignore_index
    logp = torch.log_softmax(z, dim=-1)
    token_lp = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_lp = torch.where(mask, token_lp, torch.zeros_like(token_lp))
    return -token_lp.sum(1) / mask.sum(1)


def kind_mean(values: torch.Tensor, kinds: Sequence[str], kind: str,
              weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean of ``values`` (times ``weights``) over the rows of ``kind``; ``None`` when the batch
    has none. Rows are selected before weighting, so other rows' NaN weights never reach a gradient."""
    rows = [i for i, k in enumerate(kinds) if k == kind]
    if not rows:
        return None
    index = torch.tensor(rows, device=values.device)
    picked = values[index]
    return (picked if weights is None else weights[index].to(picked) * picked).mean()


def w_pos_schedule(t: int, total: int) -> float:
    """§3.4: ``w_pos(t) = 1 - 0.5 t / T`` (linear 1 -> 0.5)."""
    return 1.0 - 0.5 * t / total


def w_neg_schedule(t: int, total: int, base: float = 0.3) -> float:
    """§3.4: ``w_neg = 0.3`` for ``t < 0.4 T``, then ``0.3 (T - t) / (0.6 T)`` (linear to 0)."""
    if t < 0.4 * total:
        return base
    return max(0.0, base * (total - t) / (0.6 * total))


@dataclass
class LossInput:
    """What an objective sees: per-sample NLLs, kinds, CLIP scores (NaN if none), step and total."""

    nll: torch.Tensor
    kinds: Sequence[str]
    scores: torch.Tensor
    step: int
    total: int


@dataclass
class ObjectiveConfig:
    """Weights and thresholds of §3.3/§3.4 (``tau`` = ``inf`` without the clip)."""

    lambda_neg: float = 0.3
    lambda_sent: float = 0.2
    tau: float = math.inf
    t_hal: float = 23.0
    t_real: float = 32.0
    w_neg: float = 0.3
    w_sent: float = 0.0
    w_rep: float = 0.3
    rep_scale: float = 40.0


@dataclass
class LossTerms:
    """The total ``loss``, the unweighted §3.3 terms (None for a kind absent from the batch) and
    the negative weight in effect."""

    loss: torch.Tensor
    l_pos: torch.Tensor | None
    l_neg: torch.Tensor | None
    l_sent: torch.Tensor | None
    l_rep: torch.Tensor | None
    w_neg: float


def _terms(x: LossInput, tau: float) -> dict[str, torch.Tensor | None]:
    """The unweighted terms of §3.3: ``L_pos``, ``L_neg = -mean min(NLL, tau)``, ``L_sent``, ``L_rep``."""
    clipped = x.nll.clamp(max=tau)
    l_neg = kind_mean(clipped, x.kinds, "neg")
    return {"l_pos": kind_mean(x.nll, x.kinds, "pos"), "l_neg": None if l_neg is None else -l_neg,
            "l_sent": kind_mean(x.nll, x.kinds, "sent"), "l_rep": kind_mean(x.nll, x.kinds, "replay")}


def _sum(parts: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    present = [p for p in parts if p is not None]
    return torch.stack(present).sum() if present else like.sum() * 0.0


Objective = Callable[[LossInput, ObjectiveConfig, bool], LossTerms]
OBJECTIVES: Registry = Registry("variant")


@OBJECTIVES.register("paper")
def paper_objective(x: LossInput, cfg: ObjectiveConfig, neg_enabled: bool = True) -> LossTerms:
    """§3.3: ``L = L_pos + lambda1 L_neg + lambda2 L_sent``; an absent kind contributes 0."""
    t = _terms(x, cfg.tau)
    w_neg = cfg.lambda_neg if neg_enabled else 0.0
    loss = _sum([t["l_pos"], None if t["l_neg"] is None else w_neg * t["l_neg"],
                 None if t["l_sent"] is None else cfg.lambda_sent * t["l_sent"]], x.nll)
    return LossTerms(loss, t["l_pos"], t["l_neg"], t["l_sent"], t["l_rep"], w_neg)


@OBJECTIVES.register("code")
def code_objective(x: LossInput, cfg: ObjectiveConfig, neg_enabled: bool = True) -> LossTerms:
    """§3.4 (released code): score-weighted terms with the ``w_pos``/``w_neg`` schedules::

        L = w_pos(t) mean_pos(S NLL) - w_neg(t) mean_neg(max(0, T_hal + T_real - S) min(NLL, tau))
            + w_sent mean_sent(Sbar NLL) + w_rep 40 mean_rep(NLL)
    """
    t = _terms(x, cfg.tau)
    w_pos = w_pos_schedule(x.step, x.total)
    w_neg = w_neg_schedule(x.step, x.total, cfg.w_neg) if neg_enabled else 0.0
    pos = kind_mean(x.nll, x.kinds, "pos", x.scores)
    neg_weight = (cfg.t_hal + cfg.t_real - x.scores).clamp(min=0.0)
    neg = kind_mean(x.nll.clamp(max=cfg.tau), x.kinds, "neg", neg_weight)
    sent = kind_mean(x.nll, x.kinds, "sent", x.scores)
    parts = [None if pos is None else w_pos * pos, None if neg is None else -w_neg * neg,
             None if sent is None or cfg.w_sent == 0 else cfg.w_sent * sent,
             None if t["l_rep"] is None else cfg.w_rep * cfg.rep_scale * t["l_rep"]]
    return LossTerms(_sum(parts, x.nll), t["l_pos"], t["l_neg"], t["l_sent"], t["l_rep"], w_neg)


@dataclass
class CollapseGuard:
    """§3.5 collapse guard and ascent ceiling: once triggered, the negative weight is 0 for good.

    Training: an EMA (decay 0.98) of ``L_pos`` starting at the first batch's value; its reference
    is its value at optimizer step ``min(50, T)`` and it is compared only after that. Validation:
    the reference is the first validation ``L_pos``. Either rising by more than ``rise`` nats
    triggers; so does a validation mean negative NLL above ``neg_stop``.
    """

    total: int
    rise: float = 1.0
    neg_stop: float = math.inf
    enabled: bool = True
    ema: float | None = None
    ema_ref: float | None = None
    val_ref: float | None = None
    triggered_at: int | None = None
    reason: str | None = None

    @property
    def neg_enabled(self) -> bool:
        return self.triggered_at is None

    def _trigger(self, step: int, reason: str) -> None:
        if self.enabled and self.triggered_at is None:
            self.triggered_at, self.reason = step, reason

    def update_train(self, step: int, l_pos: float | None) -> None:
        """After optimizer step ``step`` (1-based) with the step's training ``L_pos``."""
        if l_pos is None or not math.isfinite(l_pos):
            return
        self.ema = l_pos if self.ema is None else GUARD_EMA_DECAY * self.ema + (1 - GUARD_EMA_DECAY) * l_pos
        warm = min(GUARD_EMA_WARMUP, self.total)
        if step == warm:
            self.ema_ref = self.ema
        elif self.ema_ref is not None and step > warm and self.ema > self.ema_ref + self.rise:
            self._trigger(step, "train_pos_rise")

    def update_val(self, step: int, l_pos: float | None, neg_nll: float | None) -> None:
        """After a validation at ``step`` with the mean ``pos`` and ``neg`` NLLs."""
        if l_pos is not None:
            if self.val_ref is None:
                self.val_ref = l_pos
            elif l_pos > self.val_ref + self.rise:
                self._trigger(step, "val_pos_rise")
        if neg_nll is not None and neg_nll > self.neg_stop:
            self._trigger(step, "neg_stop")

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("ema", "ema_ref", "val_ref", "triggered_at", "reason")}

    def load(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
