"""Scores from training dynamics (prune.md section 3) and the chunked scoring engine (section 5).

The per-chunk functions take float arrays ``[K, n]`` (``K`` recorded epochs, ``n`` samples,
NaN = unseen) and return ``[n]``. :func:`compute_scores` reads the ``N`` samples of one or more
runs (:class:`~mmkit.prune.dynamics.DynamicsSource`) in chunks and applies a method of
:data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mmkit.errors import MmkitError
from mmkit.prune.select import RANDOM_TAG, stream
from mmkit.registry import Registry

if TYPE_CHECKING:
    from mmkit.prune.dynamics import DynamicsSource

EL2N_DEFAULT_EPOCHS = 10


# ---------------------------------------------------------------- small helpers

def _float(x: np.ndarray) -> np.ndarray:
    """``x`` as a float array, at least float32 (float64 input stays float64)."""
    x = np.asarray(x)
    return x.astype(np.result_type(x.dtype, np.float32), copy=False)


def _nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over the non-NaN entries along ``axis``; NaN where none (no RuntimeWarning)."""
    obs = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(obs, x, 0).sum(axis) / obs.sum(axis)


def _nansum(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sum over the non-NaN entries along ``axis``; NaN where none."""
    obs = ~np.isnan(x)
    return np.where(obs.any(axis), np.where(obs, x, 0).sum(axis), np.nan)


def check_window(num_epochs: int, window: int, drop_last_window: bool = False) -> None:
    """Validate ``2 <= J <= K`` (spec §3.1); ``--drop-last-window`` also needs ``K > J`` (§12.1)."""
    if window < 2:
        raise MmkitError(f"the window must be at least 2 epochs (the std of one epoch is undefined), "
                         f"got {window}", field="--window")
    if num_epochs < window:
        hint = (f"use --window {num_epochs} or record more epochs" if num_epochs >= 2
                else "record at least 2 epochs")
        raise MmkitError(f"window {window} is longer than the {num_epochs} recorded epochs; {hint}",
                         field="--window")
    if drop_last_window and num_epochs == window:
        raise MmkitError(f"--drop-last-window leaves no window when K = J = {window}; use a smaller "
                         f"--window or record more epochs", field="--drop-last-window")


# ---------------------------------------------------------------- dynamic uncertainty (§3.1, §5)

def _masked_std(w: np.ndarray, axis: int) -> np.ndarray:
    """Sample std (ddof 1) over the observed entries along ``axis``; NaN below 2 observed (§5)."""
    obs = ~np.isnan(w)
    c = obs.sum(axis).astype(w.dtype)
    d = np.where(obs, w, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        d -= np.expand_dims(d.sum(axis) / c, axis)
        d *= obs
        d *= d
        v = d.sum(axis) / (c - 1)
    return np.where(c >= 2, np.sqrt(v), np.nan)


def _mean_windows(u: np.ndarray, drop_last_window: bool) -> np.ndarray:
    """``U(i)``: mean of the usable window stds ``u [W, n]`` (§3.1); the reference drops the last."""
    return _nanmean(u[:-1] if drop_last_window else u, axis=0)


def dyn_unc(p_true: np.ndarray, window: int, drop_last_window: bool = False) -> np.ndarray:
    """Dynamic uncertainty ``U = mean_k std_ddof1(P[k:k+J])`` over the ``K-J+1`` windows (§3.1).

    Nothing missing: the plain form ``unfold(0, J, 1).std(-1, ddof=1).mean(0)`` (§5). Otherwise
    the masked form of §5: a window counts when at least 2 of its entries are observed, its std
    is over those entries, and ``U`` is NaN when no window counts. ``drop_last_window`` averages
    the first ``K-J`` windows only, as the reference ``get_coreset.py`` does (§12.1).
    """
    p = _float(p_true)
    check_window(p.shape[0], window, drop_last_window)
    w = sliding_window_view(p, window, axis=0)                       # [W, n, J], a view
    u = _masked_std(w, -1) if np.isnan(p).any() else w.std(-1, ddof=1)
    return _mean_windows(u, drop_last_window)


def dyn_unc_cumsum(p_true: np.ndarray, window: int, drop_last_window: bool = False) -> np.ndarray:
    """Dynamic uncertainty (§3.1) by float64 cumulative sums: ``var = (S2 - S1^2/c)/(c-1)``, >= 0 (§5).

    ``S1``, ``S2`` and ``c`` are the per-window sums of the observed values, their squares and the
    observed count, so missing entries follow the same masked rule as :func:`dyn_unc`.
    """
    p = np.asarray(p_true, dtype=np.float64)
    check_window(p.shape[0], window, drop_last_window)
    obs = ~np.isnan(p)
    x = np.where(obs, p, 0.0)

    def window_sums(a: np.ndarray) -> np.ndarray:
        s = np.concatenate([np.zeros((1, a.shape[1])), np.cumsum(a, axis=0)])
        return s[window:] - s[:-window]

    c, s1, s2 = window_sums(obs.astype(np.float64)), window_sums(x), window_sums(x * x)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum((s2 - s1 * s1 / c) / (c - 1), 0.0)
    return _mean_windows(np.where(c >= 2, np.sqrt(var), np.nan), drop_last_window)


class OnlineDynUnc:
    """Dynamic uncertainty accumulated during training (§5): a ring buffer ``[J, N]`` of the last
    ``J`` epochs of ``P`` and the running sum of the window stds; equals :func:`dyn_unc`."""

    def __init__(self, num_samples: int, window: int) -> None:
        check_window(window, window)
        self.window = window
        self.buffer = np.full((window, num_samples), np.nan, dtype=np.float32)
        self.total = np.zeros(num_samples, dtype=np.float64)
        self.count = np.zeros(num_samples, dtype=np.int64)
        self.epochs = 0

    def update(self, p_true_epoch: np.ndarray) -> None:
        """Add one epoch of ``P[k, :]`` (NaN = unseen) and, once ``J`` epochs are in, its window."""
        self.buffer[self.epochs % self.window] = p_true_epoch
        self.epochs += 1
        if self.epochs >= self.window:
            u = _masked_std(self.buffer, 0)
            ok = ~np.isnan(u)
            self.total[ok] += u[ok]
            self.count += ok

    def result(self) -> np.ndarray:
        """``U [N]`` over the windows seen so far (NaN where no window was usable)."""
        check_window(self.epochs, self.window)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total / self.count


# ---------------------------------------------------------------- the other scores (§3.2-3.7)

def random_importance(num_samples: int, seed: int) -> np.ndarray:
    """Random baseline (§3.2): a seeded uniform permutation of ``0..N-1`` (stream tag 1, §6.5),
    as float32 (exact for ``N <= 2^24``)."""
    return stream(seed, RANDOM_TAG).permutation(num_samples).astype(np.float32)


def forgetting(correct: np.ndarray) -> np.ndarray:
    """Forgetting events ``F(i) = sum_k 1[acc[k-1]=1 and acc[k]=0]`` over consecutive observed
    epochs (§3.4); never correct in any of its ``K_i`` observed epochs: ``F = K_i``; none observed:
    NaN. ``correct`` is 0/1 (>= 0.5 counts as correct) with NaN for unseen."""
    a = _float(correct)
    obs = ~np.isnan(a)
    acc = obs & (a >= 0.5)
    last = np.where(obs, np.arange(a.shape[0])[:, None], -1)
    np.maximum.accumulate(last, axis=0, out=last)                     # last observed epoch <= k
    prev = np.concatenate([np.full((1, a.shape[1]), -1), last[:-1]])  # ... < k
    prev_acc = np.take_along_axis(acc, np.maximum(prev, 0), axis=0) & (prev >= 0)
    events = (prev_acc & obs & ~acc).sum(0)
    k_i = obs.sum(0)
    return np.where(k_i == 0, np.nan, np.where(acc.any(0), events, k_i)).astype(np.float64)


def aum(margin: np.ndarray) -> np.ndarray:
    """Area under the margin ``AUM(i) = mean over observed k of M_k(i)`` (logit margins, §3.5)."""
    return _nanmean(_float(margin), 0)


def aum_prob(prob_margin: np.ndarray) -> np.ndarray:
    """``--aum-space prob`` (§3.5, §12.7): the *sum* over observed epochs of probability margins
    ``p_y - max_{c != y} p_c``, as the CCS code accumulates them; NaN when never observed."""
    return _nansum(_float(prob_margin), 0)


def el2n(el2n_channel: np.ndarray, epochs: Sequence[int] | None = None) -> np.ndarray:
    """EL2N (§3.3): mean over the rows ``epochs`` (default the first ``min(10, K)``) of the
    per-epoch error norms ``e_k = ||p_k - onehot(y)||_2``, skipping NaN."""
    e = _float(el2n_channel)
    rows = list(range(min(EL2N_DEFAULT_EPOCHS, e.shape[0]))) if epochs is None else list(epochs)
    return _nanmean(e[rows], 0)


def entropy(entropy_channel: np.ndarray, epochs: Sequence[int] | None = None) -> np.ndarray:
    """Prediction entropy (§3.6): ``H`` at the last recorded row (NaN if unseen there), or the mean
    over the rows ``epochs``."""
    h = _float(entropy_channel)
    return h[-1].copy() if epochs is None else _nanmean(h[list(epochs)], 0)


def cartography(p_true: np.ndarray, correct: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Dataset cartography (§3.7): ``confidence = mean_k P``, ``variability = std_k P`` (ddof 0)
    and, given ``correct``, ``correctness = mean_k acc``; all over observed epochs."""
    p = _float(p_true)
    mu = _nanmean(p, 0)
    out = {"confidence": mu, "variability": np.sqrt(_nanmean((p - mu) ** 2, 0))}
    if correct is not None:
        c = _float(correct)
        out["correctness"] = _nanmean(np.where(np.isnan(c), np.nan, c >= 0.5), 0)
    return out


# ---------------------------------------------------------------- parameters and methods (§3.9)

AUM_CHANNELS = {"logit": "margin", "prob": "prob_margin"}
CARTO_MODES = {"ambiguous": ("variability", 1.0), "hard": ("confidence", -1.0),
               "easy": ("confidence", 1.0)}


@dataclass
class ScoreParams:
    """Scoring options (§3, §9). Epoch lists are recorded epoch numbers (``source.epochs``).

    ``aum_space="prob"`` reads the channel ``prob_margin`` (``p_y - max_{c != y} p_c`` per epoch),
    which the recorder must record (or an ``.npz``/``.safetensors`` import must provide).
    """

    window: int = 10
    drop_last_window: bool = False
    el2n_epochs: list[int] | None = None
    entropy_epochs: list[int] | None = None
    aum_space: str = "logit"
    carto_mode: str = "ambiguous"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, choices in (("--aum-space", self.aum_space, AUM_CHANNELS),
                                     ("--carto-mode", self.carto_mode, CARTO_MODES)):
            if value not in choices:
                raise MmkitError(f"expected one of {', '.join(choices)}, got {value!r}", field=name)


@dataclass
class Chunk:
    """Samples ``start..stop-1`` of every run: ``runs[r][channel]`` is ``float32 [K_r, n]`` and
    ``ctx[r]`` what the method's ``prepare`` resolved for run ``r``."""

    start: int
    stop: int
    num_samples: int
    runs: list[dict[str, np.ndarray]]
    ctx: list[dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """A score method: the channels it reads, per-run checks, the chunk score and its importance.

    ``score(chunk, params)`` returns ``{"score": [n], **extras}``; ``importance(score, params)``
    maps the raw score to importance (higher = keep first, §3.9); ``prepare(source, params)``
    validates one run before any reading and returns its context (keys named like a
    :class:`ScoreParams` field are reported as resolved parameters). ``work`` estimates the
    working set as a multiple of the float32 input bytes, for the chunk size.
    """

    channels: Callable[[ScoreParams], tuple[str, ...]]
    score: Callable[[Chunk, ScoreParams], dict[str, np.ndarray]]
    importance: Callable[[np.ndarray, ScoreParams], np.ndarray] = lambda s, p: s
    optional: tuple[str, ...] = ()
    prepare: Callable[[DynamicsSource, ScoreParams], dict[str, Any]] = lambda src, p: {}
    work: Callable[[ScoreParams], int] = lambda p: 4


METHODS = Registry("score method")


def _run_mean(per_run: list[np.ndarray]) -> np.ndarray:
    """Average per-run scores, skipping runs where the sample is NaN (several ``--dynamics``)."""
    return per_run[0] if len(per_run) == 1 else _nanmean(np.stack(per_run), 0)


def _epoch_rows(source: DynamicsSource, epochs: list[int] | None, default: list[int],
                flag: str) -> tuple[list[int], list[int]]:
    """(recorded epoch numbers, their row positions) for an epoch selection; out of range -> error."""
    if epochs is None:
        return [source.epochs[r] for r in default], default
    where = {e: r for r, e in enumerate(source.epochs)}
    missing = [e for e in epochs if e not in where]
    if missing or not epochs:
        raise MmkitError(f"expected recorded epoch numbers ({source.epochs[0]}..{source.epochs[-1]}), "
                         f"got {list(epochs)}", field=flag)
    return list(epochs), [where[e] for e in epochs]


def _prepare_dyn_unc(source: DynamicsSource, p: ScoreParams) -> dict[str, Any]:
    check_window(len(source.epochs), p.window, p.drop_last_window)
    return {}


def _prepare_el2n(source: DynamicsSource, p: ScoreParams) -> dict[str, Any]:
    default = list(range(min(EL2N_DEFAULT_EPOCHS, len(source.epochs))))
    epochs, rows = _epoch_rows(source, p.el2n_epochs, default, "--el2n-epochs")
    return {"el2n_epochs": epochs, "rows": rows}


def _prepare_entropy(source: DynamicsSource, p: ScoreParams) -> dict[str, Any]:
    epochs, rows = _epoch_rows(source, p.entropy_epochs, [len(source.epochs) - 1], "--entropy-epochs")
    return {"entropy_epochs": epochs, "rows": rows}


def _score_cartography(chunk: Chunk, p: ScoreParams) -> dict[str, np.ndarray]:
    per_run = [cartography(r["p_true"], r.get("correct")) for r in chunk.runs]
    stats = {key: _run_mean([s[key] for s in per_run]) for key in per_run[0]}
    return {"score": stats[CARTO_MODES[p.carto_mode][0]], **stats}


def _score_aum(chunk: Chunk, p: ScoreParams) -> dict[str, np.ndarray]:
    fn, channel = {"logit": aum, "prob": aum_prob}[p.aum_space], AUM_CHANNELS[p.aum_space]
    return {"score": _run_mean([fn(r[channel]) for r in chunk.runs])}


METHODS.register("dyn-unc", Method(
    channels=lambda p: ("p_true",),
    score=lambda c, p: {"score": _run_mean([dyn_unc(r["p_true"], p.window, p.drop_last_window)
                                            for r in c.runs])},
    prepare=_prepare_dyn_unc,
    work=lambda p: 3 + 2 * p.window))
METHODS.register("random", Method(
    channels=lambda p: (),
    score=lambda c, p: {"score": random_importance(c.num_samples, p.seed)[c.start:c.stop]}))
METHODS.register("el2n", Method(
    channels=lambda p: ("el2n",),
    score=lambda c, p: {"score": el2n(np.concatenate([r["el2n"][x["rows"]]
                                                       for r, x in zip(c.runs, c.ctx)]),
                                      epochs=range(sum(len(x["rows"]) for x in c.ctx)))},
    prepare=_prepare_el2n))
METHODS.register("forgetting", Method(
    channels=lambda p: ("correct",),
    score=lambda c, p: {"score": _nansum(np.stack([forgetting(r["correct"]) for r in c.runs]), 0)},
    work=lambda p: 8))
METHODS.register("aum", Method(
    channels=lambda p: (AUM_CHANNELS[p.aum_space],),
    score=_score_aum,
    importance=lambda s, p: -s))
METHODS.register("entropy", Method(
    channels=lambda p: ("entropy",),
    score=lambda c, p: {"score": _run_mean([entropy(r["entropy"], x["rows"])
                                            for r, x in zip(c.runs, c.ctx)])},
    prepare=_prepare_entropy))
METHODS.register("cartography", Method(
    channels=lambda p: ("p_true",),
    optional=("correct",),
    score=_score_cartography,
    importance=lambda s, p: CARTO_MODES[p.carto_mode][1] * s))


# ---------------------------------------------------------------- the engine (§5)

@dataclass
class ScoreResult:
    """Raw scores, importance (higher = keep first) and method extras, all ``float32 [N]``."""

    score: np.ndarray
    importance: np.ndarray
    extras: dict[str, np.ndarray]
    nan_count: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def _check_sources(sources: Sequence[DynamicsSource], spec: Method, params: ScoreParams) -> int:
    """The common ``N`` of all runs; a run without a needed channel is an error (§3.9)."""
    if not sources:
        raise MmkitError("no dynamics given", field="--dynamics")
    sizes = [s.num_samples for s in sources]
    if len(set(sizes)) != 1:
        raise MmkitError(f"all dynamics must cover the same samples, got N = "
                         f"{', '.join(map(str, sizes))}", field="--dynamics")
    if sizes[0] == 0:
        raise MmkitError("the dynamics cover no samples", field="--dynamics")
    for run, source in enumerate(sources):
        if spec.channels(params) and not source.epochs:
            raise MmkitError(f"run {run} has no recorded epochs", field="--dynamics")
        for channel in spec.channels(params):
            if channel not in source.channels:
                have = list(source.channels)
                raise MmkitError(
                    f"run {run} has no {channel!r} channel (recorded: {', '.join(have) or 'none'}); "
                    f"record it with --channels {','.join(have + [channel])}", field="--channels")
    return sizes[0]


def _chunk_size(sources: Sequence[DynamicsSource], channels: tuple[str, ...], work: int,
                num_samples: int, mem_limit: int) -> int:
    """Samples per chunk so that ``work x`` the float32 ``[K, chunk]`` inputs fit in ``mem_limit``."""
    per_sample = sum(4 * len(s.epochs) * len(channels) for s in sources) * work
    return num_samples if per_sample == 0 else int(np.clip(mem_limit // per_sample, 1, num_samples))


def _resolved_params(params: ScoreParams, contexts: list[dict[str, Any]], num_runs: int) -> dict:
    """``params`` as a dict with epoch selections resolved (one list, or one per run if they differ)."""
    out = dataclasses.asdict(params)
    for key in out:
        values = [c[key] for c in contexts if key in c]
        if values:
            out[key] = values[0] if all(v == values[0] for v in values) else values
    out["num_runs"] = num_runs
    return out


def compute_scores(sources: Sequence[DynamicsSource], method: str,
                   params: ScoreParams | None = None, mem_limit: int = 1 << 30) -> ScoreResult:
    """Score every sample with ``method`` (§3) over one or more runs, reading ``N`` in chunks (§5).

    Several sources are several runs (e.g. seeds): EL2N averages over all selected epochs of all
    runs (§3.3), forgetting sums the counts (§3.4), and dyn-unc, aum, entropy and cartography
    average the per-run scores (a run where a sample is NaN is skipped for it).
    """
    params = params or ScoreParams()
    spec = METHODS.resolve(method, field="--method")
    sources = list(sources)
    n = _check_sources(sources, spec, params)
    contexts = [spec.prepare(s, params) for s in sources]
    channels = spec.channels(params) + tuple(
        c for c in spec.optional if all(c in s.channels for s in sources))
    size = _chunk_size(sources, channels, spec.work(params), n, mem_limit)
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, size):
        stop = min(n, start + size)
        runs = [{c: s.read(c, start, stop) for c in channels} for s in sources]
        for key, value in spec.score(Chunk(start, stop, n, runs, contexts), params).items():
            out.setdefault(key, np.empty(n, dtype=np.float32))[start:stop] = value
    score = out.pop("score")
    importance = spec.importance(score, params).astype(np.float32)
    return ScoreResult(score=score, importance=importance, extras=out,
                       nan_count=int(np.isnan(importance).sum()), method=method,
                       params=_resolved_params(params, contexts, len(sources)))
