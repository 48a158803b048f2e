"""Budget and selection of the kept subset from importance scores (prune.md sections 2 and 6).

Every strategy sees the examples with a finite importance; NaN-scored examples are placed by the
NaN policy (§5) first or last. The keep order is the key ``(NaN group, -importance, u)`` with ``u``
a seeded permutation (§6.2), and ``Selection.rank`` lists the kept examples first, then the rest,
each in that order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import numpy as np

from mmkit.errors import MmkitError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

TIE_TAG, RANDOM_TAG, CCS_TAG = 0, 1, 2          # SeedSequence([seed, tag]) streams (§6.5)
DEFAULT_KEEP = 0.75
NAN_POLICIES = ("keep", "drop", "error")
TIE_BREAKS = ("random", "index")
BALANCES = ("none", "class")
# ``auto`` CCS hard-cut fraction beta by prune rate r = 1 - keep (§6.4): (upper bound of r, beta)
CCS_AUTO_BETA = ((0.3, 0.0), (0.5, 0.1), (0.8, 0.2), (1.0, 0.3))
_EPS = 1e-9                                      # float slack on table bounds and floor(beta * N)


def stream(seed: int, tag: int) -> np.random.Generator:
    """The random stream ``tag`` of ``seed``: ``default_rng(SeedSequence([seed, tag]))`` (§6.5)."""
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def n_keep_for(num_samples: int, keep: float | None = None, prune: float | None = None,
               n_keep: int | None = None) -> int:
    """Budget (§2): ``n_keep`` if given (in ``[1, N]``), else ``floor(keep * N + 0.5)`` with
    ``keep`` (default 0.75) in ``(0, 1]`` or ``1 - prune``; computed on the decimal value given."""
    if n_keep is not None:
        if isinstance(n_keep, bool) or int(n_keep) != n_keep or not 1 <= n_keep <= num_samples:
            raise MmkitError(f"expected an integer in [1, {num_samples}], got {n_keep}", field="--n-keep")
        return int(n_keep)
    if keep is not None and prune is not None:
        raise MmkitError("give --keep or --prune, not both", field="--prune")
    flag, value = ("--prune", prune) if prune is not None else ("--keep", DEFAULT_KEEP if keep is None else keep)
    frac = Fraction(repr(float(value)))
    frac = 1 - frac if flag == "--prune" else frac
    if not 0 < frac <= 1:
        expected = "[0, 1)" if flag == "--prune" else "(0, 1]"
        raise MmkitError(f"expected a fraction in {expected}, got {value}", field=flag)
    count = int(frac * num_samples + Fraction(1, 2))
    if count == 0:
        raise MmkitError(f"{flag} {value} keeps 0 of {num_samples} examples; keep more or use --n-keep",
                         field=flag)
    return count


@dataclass
class Selection:
    """The kept subset: ``kept`` sorted ascending; ``rank[i]`` = position in the keep order."""

    kept: np.ndarray
    rank: np.ndarray
    per_class_kept: dict[int, int]
    n_cut: int = 0
    beta: float | None = None
    nan_count: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Context:
    """What a strategy needs besides its candidates: options, random streams and tallies."""

    seed: int
    keep_ratio: float
    ccs_hard_fraction: float | str
    ccs_strata: int
    ccs_cutoff: np.ndarray | None
    streams: dict[int, np.random.Generator] = field(default_factory=dict)
    n_cut: int = 0
    beta: float | None = None
    n_cut_planned: int = 0

    def rng(self, tag: int) -> np.random.Generator:
        """One generator per stream for the whole call (classes draw from it in id order)."""
        if tag not in self.streams:
            self.streams[tag] = stream(self.seed, tag)
        return self.streams[tag]


# A strategy gets the candidates (global indices, ascending keep-order position among themselves),
# their importances (finite) and a budget, and returns the kept global indices.
Strategy = Callable[[np.ndarray, np.ndarray, int, _Context], np.ndarray]
STRATEGIES = Registry("selection strategy")


@STRATEGIES.register("topk")
def topk(idx: np.ndarray, importance: np.ndarray, budget: int, ctx: _Context) -> np.ndarray:
    """Global top-k (§6.1): the first ``budget`` candidates in the keep order ``(-importance, u)``."""
    return idx[:budget]


@STRATEGIES.register("random")
def random_choice(idx: np.ndarray, importance: np.ndarray, budget: int, ctx: _Context) -> np.ndarray:
    """Seeded uniform choice of ``budget`` candidates, ignoring importance (stream tag 1)."""
    return ctx.rng(RANDOM_TAG).choice(np.sort(idx), size=budget, replace=False)


def ccs_beta(keep_ratio: float, hard_fraction: float | str) -> float:
    """CCS hard-cut fraction beta (§6.4): a float in ``[0, 1)`` or ``auto`` by prune rate."""
    if hard_fraction == "auto":
        rate = 1.0 - keep_ratio
        return next(beta for bound, beta in CCS_AUTO_BETA if rate <= bound + _EPS)
    try:
        beta = float(hard_fraction)
    except ValueError:
        beta = -1.0
    if not 0 <= beta < 1:
        raise MmkitError(f"expected 'auto' or a fraction in [0, 1), got {hard_fraction!r}",
                         field="--ccs-hard-fraction")
    return beta


def ccs_budgets(counts: np.ndarray, budget: int) -> np.ndarray:
    """Per-bin budgets (§6.4 step 3): bins by ascending population (ties by bin id), each
    ``min(|S_b|, floor(rem / bins_left))``."""
    out = np.zeros(len(counts), dtype=np.int64)
    rem = budget
    for left, b in zip(range(len(counts), 0, -1), np.argsort(counts, kind="stable")):
        out[b] = min(int(counts[b]), rem // left)
        rem -= out[b]
    return out


def ccs_bins(score: np.ndarray, strata: int) -> np.ndarray:
    """Equal-width bin of each score over ``[min, max]`` (§6.4 step 2), the last bin closed."""
    lo, hi = score.min(), score.max()
    if hi == lo:
        return np.zeros(len(score), dtype=np.int64)
    width = (hi - lo) / strata
    return np.minimum(strata - 1, np.floor((score - lo) / width).astype(np.int64))


@STRATEGIES.register("ccs")
def ccs(idx: np.ndarray, importance: np.ndarray, budget: int, ctx: _Context) -> np.ndarray:
    """Coverage-centric selection (§6.4): drop the ``floor(beta * N)`` highest under the cut-off
    score (clamped to ``N - n_keep``), bin the rest into equal-width strata, budget the bins by
    ascending population and sample uniformly within each (stream tag 2)."""
    n = len(idx)
    beta = ccs_beta(ctx.keep_ratio, ctx.ccs_hard_fraction)
    planned = int(np.floor(beta * n + _EPS))
    n_cut = min(planned, n - budget)
    ctx.beta, ctx.n_cut, ctx.n_cut_planned = beta, ctx.n_cut + n_cut, ctx.n_cut_planned + planned
    if ctx.ccs_cutoff is None:
        rest = np.arange(n_cut, n)                     # candidates already come in keep order
    else:
        cut = ctx.ccs_cutoff[idx]
        order = np.lexsort((np.arange(n), -np.nan_to_num(cut), np.isnan(cut)))  # NaN never cut
        rest = np.sort(order[n_cut:])
    if budget == 0:
        return idx[:0]
    bins = ccs_bins(importance[rest], ctx.ccs_strata)
    counts = np.bincount(bins, minlength=ctx.ccs_strata)
    per_bin = ccs_budgets(counts, budget)
    order = np.lexsort((ctx.rng(CCS_TAG).random(len(rest)), bins))    # by bin, shuffled within
    pos_in_bin = np.arange(len(rest)) - np.repeat(np.cumsum(counts) - counts, counts)
    return idx[rest[order[pos_in_bin < np.repeat(per_bin, counts)]]]


def class_budgets(labels: np.ndarray, n_keep: int) -> dict[int, int]:
    """Largest-remainder apportionment (§6.3) of ``n_keep`` over classes, ``keep = n_keep / N``:
    ``floor(keep * n_c)`` each, the rest one by one by largest remainder, ties to the lower id."""
    classes, sizes = np.unique(labels, return_counts=True)
    share = n_keep * sizes                              # keep * n_c = share / N, exact in integers
    base, remainder = share // len(labels), share % len(labels)
    extra = np.lexsort((classes, -remainder))[:n_keep - int(base.sum())]
    base[extra] += 1
    return {int(c): int(k) for c, k in zip(classes, base)}


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    log.warning(message)


def _check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise MmkitError(f"expected one of {', '.join(choices)}, got {value!r}", field=flag)


def check_options(strategy: str, balance: str, tie_break: str, nan_policy: str) -> Strategy:
    """Validate the selection options (before any expensive work); returns the strategy."""
    _check_choice(balance, BALANCES, "--balance")
    _check_choice(tie_break, TIE_BREAKS, "--tie-break")
    _check_choice(nan_policy, NAN_POLICIES, "--nan-policy")
    return STRATEGIES.resolve(strategy, field="--strategy")


def select(importance: np.ndarray, n_keep: int, *, strategy: str = "topk", balance: str = "none",
           labels: np.ndarray | None = None, seed: int = 0, tie_break: str = "random",
           nan_policy: str = "keep", ccs_hard_fraction: float | str = "auto", ccs_strata: int = 50,
           ccs_cutoff: np.ndarray | None = None) -> Selection:
    """Keep ``n_keep`` examples by ``strategy`` (§6), globally or per class (``balance="class"``).

    NaN importances follow ``nan_policy`` (§5): ``keep`` takes them first, ``drop`` last,
    ``error`` refuses; a warning gives their count. Same inputs and seed, same output.
    """
    imp = np.asarray(importance, dtype=np.float64)
    n = len(imp)
    fn: Strategy = check_options(strategy, balance, tie_break, nan_policy)
    n_keep_for(n, n_keep=n_keep)
    if ccs_strata < 1:
        raise MmkitError(f"expected a positive number of strata, got {ccs_strata}", field="--ccs-strata")
    if ccs_cutoff is not None and np.shape(ccs_cutoff) != (n,):
        raise MmkitError(f"expected {n} cut-off scores, got shape {np.shape(ccs_cutoff)}",
                         field="--ccs-cutoff-score")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise MmkitError(f"expected {n} labels, got shape {labels.shape}", field="--labels")
    if balance == "class" and labels is None:
        raise MmkitError("class balance needs labels (--labels FILE or the dynamics' labels.npy)",
                         field="--balance")

    warnings: list[str] = []
    nan = np.isnan(imp)
    nan_count = int(nan.sum())
    if nan_count:
        if nan_policy == "error":
            raise MmkitError(f"{nan_count} examples have a NaN score (never observed); "
                             f"use --nan-policy keep or drop", field="--nan-policy")
        _warn(warnings, f"{nan_count} of {n} examples have a NaN score; --nan-policy {nan_policy} "
                        f"puts them {'first' if nan_policy == 'keep' else 'last'}")
    tie = np.arange(n) if tie_break == "index" else stream(seed, TIE_TAG).permutation(n)
    group = ~nan if nan_policy == "keep" else nan                     # 0 sorts first
    order = np.lexsort((tie, -np.where(nan, 0.0, imp), group))        # the keep order (§6.2)

    ctx = _Context(seed=seed, keep_ratio=n_keep / n, ccs_hard_fraction=ccs_hard_fraction,
                   ccs_strata=ccs_strata,
                   ccs_cutoff=None if ccs_cutoff is None else np.asarray(ccs_cutoff, dtype=np.float64))
    if balance == "none":
        groups = [(order, n_keep)]
    else:                                               # each class's members, still in keep order
        budgets = class_budgets(labels, n_keep)
        by_class = order[np.argsort(labels[order], kind="stable")]
        sizes = np.cumsum(np.unique(labels, return_counts=True)[1])[:-1]
        groups = list(zip(np.split(by_class, sizes), budgets.values()))
    kept_mask = np.zeros(n, dtype=bool)
    for members, budget in groups:                      # members in keep order
        is_nan = nan[members]
        nans, finite = members[is_nan], members[~is_nan]
        n_nan = min(budget, len(nans)) if nan_policy == "keep" else max(0, budget - len(finite))
        kept_mask[nans[:n_nan]] = True
        kept_mask[fn(finite, imp[finite], budget - n_nan, ctx)] = True
    if ctx.n_cut < ctx.n_cut_planned:
        _warn(warnings, f"ccs: n_keep > N - n_cut, so the hard cut-off was lowered from "
                        f"{ctx.n_cut_planned} to n_cut = {ctx.n_cut} (beta = {ctx.beta})")

    keep_order = order[np.argsort(~kept_mask[order], kind="stable")]
    rank = np.empty(n, dtype=np.int64)
    rank[keep_order] = np.arange(n)
    kept = np.flatnonzero(kept_mask).astype(np.int64)
    per_class: dict[int, int] = {}
    if labels is not None:
        classes, inverse = np.unique(labels, return_inverse=True)
        counts = np.bincount(inverse[kept], minlength=len(classes))
        per_class = {int(c): int(k) for c, k in zip(classes, counts)}
    return Selection(kept=kept, rank=rank, per_class_kept=per_class, n_cut=ctx.n_cut,
                     beta=ctx.beta, nan_count=nan_count, warnings=warnings)
