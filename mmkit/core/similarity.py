"""Representation similarity: CCA, SVCCA, PWCCA and linear CKA (distill.md §1.5), in float64 numpy.

Activations are matrices with one row per sample (``A`` ∈ R^{N×d1}, ``B`` ∈ R^{N×d2}, the same
samples in the same order). The CCA family needs ``N > max(d1, d2)`` (:func:`check_samples`);
linear CKA is defined for any N.

- :func:`cca`: centre; drop near-constant neurons (variance < 1e-10 · the largest); add
  ``eps`` · (mean variance) to the covariance diagonals; Σ^{-1/2} by ``eigh`` with eigenvalues
  clamped at that ε; ρ = singular values of Σxx^{-1/2} Σxy Σyy^{-1/2}, clipped to [0, 1]; the
  score is the plain mean of all ``k = min(d1', d2')`` values (d' = kept neurons).
- :func:`svcca`: per side, the fewest SVD directions holding ``keep`` (99%) of the variance (or a
  fixed ``dims``), then CCA.
- :func:`pwcca`: ρ weighted by α_i = Σ_j |⟨p_i, a_j⟩| (normalised), where P orthonormalises the
  canonical variates of the side with fewer kept neurons and a_j are its centred neurons.
- :func:`linear_cka`: ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) on centred X, Y (feature space, O(N d²)).

:data:`METRICS` maps each name to a :class:`Metric` (a per-layer ``prepare`` step and a pairwise
``compare``), so :func:`similarity_grid` prepares each layer once for a layer × layer grid.
:func:`tokenize`, :func:`select_samples` and :func:`hidden_states` extract per-layer activations
from text encoders (units ``token``, ``cls``, ``mean``); :func:`plot_heatmap` draws one grid.
Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from mmkit.errors import ConfigError, MmkitError, ModelError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

EPS = 1e-6                 # covariance ridge, relative to the mean variance
SVCCA_KEEP = 0.99          # fraction of variance the SVCCA directions keep
CONSTANT_RATIO = 1e-10     # a neuron whose variance is below this times the largest is dropped
RECOMMENDED_RATIO = 5      # recommended N / d
MAX_SAMPLES = 10_000
UNITS = ("token", "cls", "mean")


# --------------------------------------------------------------------------- checks


def check_samples(n: int, d: int, *, file: str | None = None, field: str | None = None, hint: str = "",
                  warn: bool = True) -> None:
    """Raise unless ``n > d`` (the CCA rule N > max(d1, d2)); warn below the recommended 5·d."""
    if n <= d:
        raise MmkitError(f"CCA needs more samples than features: N={n}, d={d}; give at least {d + 1} "
                         f"samples ({RECOMMENDED_RATIO * d} or more recommended){hint}", file=file, field=field)
    if warn and n < RECOMMENDED_RATIO * d:
        log.warning("CCA on N=%d samples of d=%d features: fewer than the recommended %d (5x); "
                    "correlations are biased upwards", n, d, RECOMMENDED_RATIO * d)


def _matrix(x: Any) -> np.ndarray:
    """``x`` (numpy array or torch tensor) as a float64 [N, d] array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise MmkitError(f"expected activations of shape [N, d], got shape {list(x.shape)}", field="activations")
    return x


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _matrix(a), _matrix(b)
    if a.shape[0] != b.shape[0]:
        raise MmkitError(f"the two activation matrices have {a.shape[0]} and {b.shape[0]} rows; expected "
                         "the same samples on both sides", field="activations")
    return a, b


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


class ConstantActivations(MmkitError):
    """Activations without any variance over the samples: every similarity is undefined."""


def _constant_error() -> ConstantActivations:
    return ConstantActivations("every feature is constant over the samples; similarity needs activations that vary",
                               field="activations")


# --------------------------------------------------------------------------- CCA


@dataclass(frozen=True)
class CcaResult:
    """Canonical correlations ``rho`` (descending, in [0, 1]) and the weights that average them:
    uniform 1/k for CCA and SVCCA, the projection weights α for PWCCA."""

    rho: np.ndarray
    weights: np.ndarray
    dims: tuple[int, int]   # features of each side that entered CCA (kept neurons / SVD directions)

    @property
    def mean(self) -> float:
        """Σ weights·ρ: the plain mean ρ (CCA, SVCCA) or the PWCCA score."""
        return float(self.weights @ self.rho)


@dataclass
class CcaSide:
    """One activation matrix prepared for CCA: its centred kept neurons ``x`` [N, d'] and
    ``z = x Σ^{-1/2}`` (whitened; Σ the eps-regularised covariance)."""

    x: np.ndarray
    z: np.ndarray


def prepare_cca(a: Any, eps: float = EPS) -> CcaSide:
    """Centre, drop near-constant neurons and whiten (distill.md §1.5)."""
    x = _centre(_matrix(a))
    n = x.shape[0]
    var = (x * x).sum(axis=0) / max(n - 1, 1)
    if not var.size or var.max() <= 0:
        raise _constant_error()
    x = x[:, var >= CONSTANT_RATIO * var.max()]
    cov = x.T @ x / max(n - 1, 1)
    ridge = eps * float(np.trace(cov)) / cov.shape[0]
    cov[np.diag_indices_from(cov)] += ridge
    w, v = np.linalg.eigh(cov)
    w = np.maximum(w, ridge if ridge > 0 else np.finfo(np.float64).eps * w.max())
    return CcaSide(x, x @ ((v / np.sqrt(w)) @ v.T))


def _canonical(sa: CcaSide, sb: CcaSide) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD ``U, ρ, Vᵀ`` of the whitened cross-covariance Σxx^{-1/2} Σxy Σyy^{-1/2}, ρ clipped to [0, 1]."""
    t = sa.z.T @ sb.z / max(sa.z.shape[0] - 1, 1)
    u, s, vt = np.linalg.svd(t, full_matrices=False)
    return u, np.clip(s, 0.0, 1.0), vt


def cca_sides(sa: CcaSide, sb: CcaSide) -> CcaResult:
    """CCA of two prepared sides: all k = min(d1', d2') correlations, uniform weights."""
    _, rho, _ = _canonical(sa, sb)
    return CcaResult(rho, np.full(len(rho), 1.0 / len(rho)), (sa.x.shape[1], sb.x.shape[1]))


def pwcca_sides(sa: CcaSide, sb: CcaSide) -> CcaResult:
    """PWCCA: on the side with fewer kept neurons (A on a tie), canonical variates H = Z U
    (= A_c Σ^{-1/2} U), P = QR(H), α_i = Σ_j |⟨p_i, a_j⟩| / Σ α; score Σ α_i ρ_i."""
    u, rho, vt = _canonical(sa, sb)
    side, directions = (sa, u) if sa.x.shape[1] <= sb.x.shape[1] else (sb, vt.T)
    p, _ = np.linalg.qr(side.z @ directions)
    alpha = np.abs(p.T @ side.x).sum(axis=1)
    return CcaResult(rho, alpha / alpha.sum(), (sa.x.shape[1], sb.x.shape[1]))


def cca(a: Any, b: Any, eps: float = EPS) -> CcaResult:
    """Mean canonical correlation of A [N, d1] and B [N, d2] (``.mean``; ``.rho`` all k values)."""
    a, b = _pair(a, b)
    check_samples(a.shape[0], max(a.shape[1], b.shape[1]))
    return cca_sides(prepare_cca(a, eps), prepare_cca(b, eps))


def pwcca(a: Any, b: Any, eps: float = EPS) -> CcaResult:
    """Projection-weighted CCA (``.mean`` is the score, ``.weights`` the α, summing to 1)."""
    a, b = _pair(a, b)
    check_samples(a.shape[0], max(a.shape[1], b.shape[1]))
    return pwcca_sides(prepare_cca(a, eps), prepare_cca(b, eps))


# --------------------------------------------------------------------------- SVCCA


def svd_reduce(a: Any, keep: float = SVCCA_KEEP, dims: int | None = None) -> np.ndarray:
    """The centred data projected on its top singular directions: the fewest whose squared singular
    values reach ``keep`` of the total, or the first ``dims`` (at most the width)."""
    x = _centre(_matrix(a))
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    energy = s * s
    if not energy.size or energy.sum() <= 0:
        raise _constant_error()
    if dims is not None:
        k = min(int(dims), len(s))
    else:
        k = min(int(np.searchsorted(np.cumsum(energy) / energy.sum(), keep, side="left")) + 1, len(s))
    return u[:, :k] * s[:k]


def svcca(a: Any, b: Any, keep: float = SVCCA_KEEP, dims: int | None = None, eps: float = EPS) -> CcaResult:
    """SVCCA: :func:`svd_reduce` each side, then :func:`cca` (``.dims`` = directions kept per side)."""
    a, b = _pair(a, b)
    check_samples(a.shape[0], max(a.shape[1], b.shape[1]))
    return cca_sides(prepare_cca(svd_reduce(a, keep, dims), eps), prepare_cca(svd_reduce(b, keep, dims), eps))


# --------------------------------------------------------------------------- CKA


@dataclass
class CkaSide:
    """Centred activations and ‖XᵀX‖_F, prepared once per layer."""

    x: np.ndarray
    norm: float


def prepare_cka(a: Any) -> CkaSide:
    x = _centre(_matrix(a))
    norm = float(np.linalg.norm(x.T @ x))
    if norm <= 0:
        raise _constant_error()
    return CkaSide(x, norm)


def cka_sides(sa: CkaSide, sb: CkaSide) -> float:
    """Linear CKA ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) of two prepared sides."""
    cross = np.linalg.norm(sb.x.T @ sa.x)
    return float(cross * cross / (sa.norm * sb.norm))


def linear_cka(a: Any, b: Any) -> float:
    """Linear CKA of A [N, d1] and B [N, d2]: in [0, 1], 1 for identical inputs, invariant to
    orthogonal maps and isotropic scaling (Kornblith et al. 2019, feature-space form)."""
    a, b = _pair(a, b)
    return cka_sides(prepare_cka(a), prepare_cka(b))


# --------------------------------------------------------------------------- registry and grid


@dataclass(frozen=True)
class SimilarityOptions:
    """Knobs of the CCA family (distill.md §1.5 defaults)."""

    eps: float = EPS
    svcca_keep: float = SVCCA_KEEP
    svcca_dims: int | None = None


@dataclass(frozen=True)
class Metric:
    """A similarity metric: ``prepare(x, options)`` once per layer, ``compare(side_a, side_b)`` per
    pair -> ``(score, rho or None)``. Metrics with the same ``side`` name share prepared layers;
    ``needs_samples`` applies the N > d rule."""

    name: str
    side: str
    prepare: Callable[[np.ndarray, SimilarityOptions], Any]
    compare: Callable[[Any, Any], tuple[float, np.ndarray | None]]
    needs_samples: bool = True


def _with_rho(fn: Callable[[CcaSide, CcaSide], CcaResult]) -> Callable[[Any, Any], tuple[float, np.ndarray]]:
    def compare(sa: CcaSide, sb: CcaSide) -> tuple[float, np.ndarray]:
        r = fn(sa, sb)
        return r.mean, r.rho
    return compare


METRICS: Registry = Registry("similarity metric")
for _metric in (
    Metric("cca", "cca", lambda x, o: prepare_cca(x, o.eps), _with_rho(cca_sides)),
    Metric("svcca", "svcca", lambda x, o: prepare_cca(svd_reduce(x, o.svcca_keep, o.svcca_dims), o.eps),
           _with_rho(cca_sides)),
    Metric("pwcca", "cca", lambda x, o: prepare_cca(x, o.eps), _with_rho(pwcca_sides)),
    Metric("cka", "cka", lambda x, o: prepare_cka(x), lambda sa, sb: (cka_sides(sa, sb), None), needs_samples=False),
):
    METRICS.register(_metric.name, _metric)
METRIC_NAMES = tuple(METRICS)


@dataclass
class Grid:
    """Scores of every requested (layer_a, layer_b) pair: ``values[metric]`` is a
    [len(layers_a), len(layers_b)] float array (NaN where a pair was not asked for, or is undefined
    because a layer is constant: ``warnings`` says which); ``rho[(layer_a, layer_b)][metric]`` holds
    the canonical correlations of the CCA family."""

    layers_a: list[Hashable]
    layers_b: list[Hashable]
    pairs: list[tuple[Hashable, Hashable]]
    metrics: list[str]
    values: dict[str, np.ndarray]
    rho: dict[tuple[Hashable, Hashable], dict[str, np.ndarray]] = field(default_factory=dict)
    n_samples: int = 0
    warnings: list[str] = field(default_factory=list)

    def value(self, metric: str, layer_a: Hashable, layer_b: Hashable) -> float:
        return float(self.values[metric][self.layers_a.index(layer_a), self.layers_b.index(layer_b)])


def similarity_grid(acts_a: Mapping[Hashable, Any], acts_b: Mapping[Hashable, Any],
                    pairs: Sequence[tuple[Hashable, Hashable]] | None = None,
                    metrics: Sequence[str] = METRIC_NAMES, options: SimilarityOptions = SimilarityOptions(),
                    progress: bool = True) -> Grid:
    """Every metric on every pair (default: all layer_a × layer_b, row-major). Each layer is
    prepared once per kind of side; B's prepared layers are kept, A's only while its row runs.
    A layer that is constant over the samples (e.g. the CLS embedding at layer 0) gets NaN scores
    and a warning instead of failing the grid."""
    from mmkit.progress import Progress

    chosen = [METRICS.resolve(m, field="--metrics") for m in metrics]
    layers_a, layers_b = list(acts_a), list(acts_b)
    pairs = [(a, b) for a in layers_a for b in layers_b] if pairs is None else list(pairs)
    rows = {int(x.shape[0]) for x in [*acts_a.values(), *acts_b.values()]}
    if len(rows) != 1:
        raise MmkitError(f"the layers have different numbers of rows ({', '.join(map(str, sorted(rows)))}); "
                         "expected the same samples everywhere", field="activations")
    n = rows.pop()
    if any(m.needs_samples for m in chosen):
        check_samples(n, max(int(x.shape[1]) for x in [*(acts_a[a] for a, _ in pairs), *(acts_b[b] for _, b in pairs)]))
    values = {m.name: np.full((len(layers_a), len(layers_b)), np.nan) for m in chosen}
    grid = Grid(layers_a, layers_b, pairs, [m.name for m in chosen], values, n_samples=n)
    cache_a: dict[tuple[str, Hashable], Any] = {}
    cache_b: dict[tuple[str, Hashable], Any] = {}

    def side(cache: dict, acts: Mapping[Hashable, Any], metric: Metric, layer: Hashable, name: str) -> Any:
        key = (metric.side, layer)
        if key not in cache:
            try:
                cache[key] = metric.prepare(acts[layer], options)
            except ConstantActivations:
                cache[key] = None
                msg = f"layer {layer} of {name} is constant over the samples; its scores are null"
                if msg not in grid.warnings:
                    grid.warnings.append(msg)
                    log.warning(msg)
        return cache[key]

    with Progress(len(pairs), "similarity", enabled=progress) as bar:
        for la, lb in pairs:
            if any(k[1] != la for k in cache_a):
                cache_a.clear()
            i, j = layers_a.index(la), layers_b.index(lb)
            for m in chosen:
                sa, sb = side(cache_a, acts_a, m, la, "A"), side(cache_b, acts_b, m, lb, "B")
                if sa is None or sb is None:
                    continue
                score, rho = m.compare(sa, sb)
                values[m.name][i, j] = score
                if rho is not None:
                    grid.rho.setdefault((la, lb), {})[m.name] = rho
            bar.update(1)
    return grid


# --------------------------------------------------------------------------- activations of text encoders


@dataclass
class Tokenized:
    """Token ids (and token type ids for text pairs) as flat arrays (:class:`mmkit.core.data.TokenArrays`)."""

    ids: Any
    types: Any | None = None

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer: Any, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
             max_length: int | None, chunk: int = 8192) -> Tokenized:
    """Tokenise once (truncation, no padding); pairs keep their ``token_type_ids``."""
    from mmkit.core.data import TokenArrays, tokenize_flat

    if text_pairs is None:
        return Tokenized(tokenize_flat(tokenizer, texts, max_length=max_length, chunk=chunk))
    ids, types = [], []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[start:start + chunk]), text_pair=list(text_pairs[start:start + chunk]),
                        truncation=max_length is not None, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=True)
        ids.append(TokenArrays.from_lists(enc["input_ids"]))
        types.append(TokenArrays.from_lists(enc["token_type_ids"]))
    return Tokenized(TokenArrays.concat(ids), TokenArrays.concat(types))


def first_difference(a: Tokenized, b: Tokenized) -> int | None:
    """The index of the first sequence two tokenisations disagree on (None when identical)."""
    la, lb = a.ids.lengths, b.ids.lengths
    if len(la) != len(lb):
        return min(len(la), len(lb))
    bad = np.flatnonzero(la != lb)
    if bad.size:
        return int(bad[0])
    pos = np.flatnonzero(a.ids.flat != b.ids.flat)
    return None if not pos.size else int(np.searchsorted(a.ids.offsets, pos[0], side="right") - 1)


@dataclass
class Selection:
    """Which rows the activations hold: ``unit`` token -> flat token positions, else example
    indices (``chosen``, sorted); ``sequences`` = the examples that must be run."""

    unit: str
    chosen: np.ndarray
    sequences: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)


def sample_rows(total: int, max_samples: int, seed: int, label: str) -> np.ndarray:
    """Sorted row indices: all ``total`` rows, or a seeded subsample of ``max_samples`` of them
    (``stable_rng(seed, "similarity-samples", label)``)."""
    from mmkit.core.seeding import stable_rng

    if total <= max_samples:
        return np.arange(total, dtype=np.int64)
    return np.sort(stable_rng(seed, "similarity-samples", label).choice(total, max_samples, replace=False))


def select_samples(tokens: Tokenized, unit: str, max_samples: int = MAX_SAMPLES, seed: int = 0) -> Selection:
    """A seeded subsample of at most ``max_samples`` rows: all non-pad tokens (``token``) or one
    row per example (``cls``, ``mean``); the same tokens give the same rows for every model."""
    if unit not in UNITS:
        raise ConfigError(f"expected one of {', '.join(UNITS)}, got {unit!r}", field="unit")
    total = int(tokens.ids.lengths.sum()) if unit == "token" else len(tokens)
    chosen = sample_rows(total, max_samples, seed, unit)
    if unit != "token":
        return Selection(unit, chosen, chosen)
    seqs = np.unique(np.searchsorted(tokens.ids.offsets, chosen, side="right") - 1)
    return Selection(unit, chosen, seqs)


def num_hidden_states(config: Any) -> int:
    """How many hidden states a text encoder returns: the embeddings plus one per layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise ModelError(f"{type(config).__name__} has no num_hidden_layers; expected a text encoder", field="model")
    return layers + 1


def hidden_states(model: Any, tokens: Tokenized, selection: Selection, layers: Sequence[int], *,
                  pad_id: int, batch_size: int = 32, progress: bool = True,
                  description: str = "hidden states") -> dict[int, np.ndarray]:
    """float32 [len(selection), d] activations per layer (0 = embeddings), in selection order.

    Length-sorted padded batches of the selected examples run under ``torch.inference_mode`` with
    ``output_hidden_states=True``; ``token`` rows are the chosen non-pad tokens, ``cls`` the
    first token, ``mean`` the mean over non-pad tokens."""
    import torch

    from mmkit.core.data import length_sorted_batches, pad_flat
    from mmkit.core.embed import _eval_mode, _model_device
    from mmkit.progress import Progress

    device = _model_device(model)
    seqs = selection.sequences
    out: dict[int, np.ndarray] = {}
    with _eval_mode(model), torch.inference_mode(), Progress(len(seqs), description, enabled=progress) as bar:
        for batch in length_sorted_batches(tokens.ids.lengths[seqs], batch_size):
            rows = seqs[batch]
            ids, mask = pad_flat(tokens.ids, rows, pad_id)
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if tokens.types is not None:
                inputs["token_type_ids"] = pad_flat(tokens.types, rows, 0)[0].to(device)
            states = model(**inputs, output_hidden_states=True, return_dict=True).hidden_states
            keep, dest = _destinations(tokens, selection, rows)
            for layer in layers:
                if layer >= len(states):
                    raise ModelError(f"layer {layer} does not exist: the model returns {len(states)} hidden "
                                     f"states (0..{len(states) - 1})", field="--layers")
                vec = _unit_rows(states[layer].float(), mask.to(device), selection.unit)[keep]
                if layer not in out:
                    out[layer] = np.empty((len(selection), vec.shape[1]), dtype=np.float32)
                out[layer][dest] = vec.cpu().numpy()
            bar.update(len(rows))
    return out


def _unit_rows(h: Any, mask: Any, unit: str) -> Any:
    """[B, T, d] hidden states -> rows of the unit: real tokens in row-major order, CLS, or mean."""
    if unit == "token":
        return h[mask.bool()]
    if unit == "cls":
        return h[:, 0]
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def _destinations(tokens: Tokenized, selection: Selection, rows: np.ndarray) -> tuple[Any, np.ndarray]:
    """Which of a batch's unit rows were chosen (a torch index) and where each goes in the output."""
    import torch

    if selection.unit != "token":
        return torch.arange(len(rows)), np.searchsorted(selection.chosen, rows)
    lengths = tokens.ids.lengths[rows]
    starts = tokens.ids.offsets[rows] - np.concatenate(([0], np.cumsum(lengths)[:-1]))
    flat = np.repeat(starts, lengths) + np.arange(int(lengths.sum()))  # flat position of each real token
    pos = np.minimum(np.searchsorted(selection.chosen, flat), len(selection.chosen) - 1)
    hit = selection.chosen[pos] == flat
    return torch.from_numpy(np.flatnonzero(hit)), pos[hit]


# --------------------------------------------------------------------------- plots


def plot_heatmap(path: str | os.PathLike, matrix: np.ndarray, row_labels: Sequence[Any],
                 col_labels: Sequence[Any], *, title: str, row_title: str = "layer_a",
                 col_title: str = "layer_b", outline: Sequence[tuple[int, int]] = ()) -> None:
    """A [rows, cols] similarity heatmap (0..1, viridis, values written in small grids, NaN blank,
    ``outline`` cells boxed) written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mmkit.io import atomic_write

    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.55 * cols, 16), min(2 + 0.45 * rows, 14)), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=90 if cols > 12 else 0)
    ax.set_yticks(range(rows), [str(r) for r in row_labels])
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    ax.set_title(title)
    if rows * cols <= 400:
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    for i, j in outline:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.tight_layout()
    with atomic_write(path, mode="wb", encoding=None) as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
