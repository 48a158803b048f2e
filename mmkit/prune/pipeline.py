"""The ``prune-data`` stages and their files: record, score, select, apply, and ``run`` = all four
(prune.md sections 7 and 9). The CLI builds a :class:`PruneConfig` and calls one function here."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmkit import __version__
from mmkit.config import config_dict
from mmkit.errors import ConfigError, DataError
from mmkit.io import RunDir, atomic_write, is_main_process, start_run, write_json, write_results
from mmkit.prune.data import DataOptions, ImageSet, check_indices, load_image_set, read_indices, write_pruned
from mmkit.prune.proxy import ProxyConfig, record_dynamics
from mmkit.prune.scores import METHODS, ScoreParams, ScoreResult, compute_scores
from mmkit.prune.select import Selection, check_options, n_keep_for, select

log = logging.getLogger("mmkit")

#: preset -> (proxy model, K) for the dataset names of prune.md section 8
PRESET_PROXY = {"digits": ("mlp", 20), "mnist5k": ("small-cnn", 20), "imagenet": ("resnet-50", 90),
                "cifar10": ("resnet-50", 90), "cifar100": ("resnet-50", 90)}


@dataclass
class SelectOptions:
    """How the kept set is chosen from the importances (prune.md section 6)."""

    keep: float | None = None  # default 0.75 when neither keep, prune nor n_keep is given
    prune: float | None = None
    n_keep: int | None = None
    strategy: str = "topk"  # topk | ccs | random
    balance: str = "none"  # none | class
    tie_break: str = "random"  # random | index
    nan_policy: str = "keep"  # keep | drop | error
    ccs_hard_fraction: str = "auto"
    ccs_strata: int = 50
    ccs_cutoff_score: str | None = None  # a method whose importance sets the CCS cut-off

    def check(self, n: int) -> None:
        """Check the options and the budget for ``n`` examples before any training."""
        check_options(self.strategy, self.balance, self.tie_break, self.nan_policy)
        self.budget(n)
        _fraction(self.ccs_hard_fraction)

    def budget(self, n: int) -> int:
        keep = 0.75 if self.keep is None and self.prune is None and self.n_keep is None else self.keep
        return n_keep_for(n, keep=keep, prune=self.prune, n_keep=self.n_keep)


@dataclass
class PruneConfig:
    """``mmkit prune-data`` (prune.md section 9)."""

    dataset: str = ""
    method: str = "dyn-unc"
    epochs: int | None = None  # K; None = the preset's (20 for digits/mnist5k, 90 for hub presets)
    seed: int = 0
    data: DataOptions = field(default_factory=DataOptions)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    score: ScoreParams = field(default_factory=ScoreParams)
    select: SelectOptions = field(default_factory=SelectOptions)
    dynamics: list[str] = field(default_factory=list)  # score: sources instead of recording
    dynamics_format: str = "auto"
    transpose: bool = False
    allow_gaps: bool = False
    allow_nan: bool = False
    labels: str | None = None  # .npy or one integer per line
    scores: str | None = None  # select: scores.npy or scores.csv
    indices: str | None = None  # apply
    materialize: str = "list"  # list | symlink | copy
    scores_format: str = "both"  # csv | npy | both
    mem_limit_mb: int = 1024
    force: bool = False  # accept a dataset fingerprint mismatch

    def validate(self) -> None:
        METHODS.resolve(self.method, field="--method")
        if self.select.ccs_cutoff_score is not None:
            METHODS.resolve(self.select.ccs_cutoff_score, field="--ccs-cutoff-score")
        for name, value, allowed in (("--materialize", self.materialize, ("list", "symlink", "copy")),
                                     ("--scores-format", self.scores_format, ("csv", "npy", "both"))):
            if value not in allowed:
                raise ConfigError(f"expected one of {', '.join(allowed)}, got {value!r}", field=name)


# --------------------------------------------------------------------------- stages


def run_all(cfg: PruneConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """``prune-data DATASET``: record dynamics, score, select and write the pruned dataset."""
    cfg.validate()
    cfg.proxy.validate()
    data = load_image_set(cfg.dataset, cfg.data)
    cfg.select.check(len(data))
    if cfg.method == "dyn-unc" and _epochs(cfg) < cfg.score.window:
        raise ConfigError(f"--epochs {_epochs(cfg)} is smaller than the window J = {cfg.score.window}; use "
                          f"--window {_epochs(cfg)} or more epochs", field="--window")
    run = start_run(out, "prune-data", cfg, overwrite=overwrite)
    with run.guard():
        training = _record(cfg, data, run)
        if not is_main_process():  # under accelerate launch rank 0 scores, selects and writes
            return {}
        sources = _native_sources(cfg, run.path / "dynamics", data)
        result = compute_scores(sources, cfg.method, cfg.score, mem_limit=cfg.mem_limit_mb << 20)
        chosen = _select(cfg, result, data.labels, sources)
        _write_scores(run.path, result, chosen, data.ids, data.labels, cfg.scores_format)
        selection = _write_selection(run.path, cfg, result, chosen, data.labels,
                                     _dynamics_info(run.path / "dynamics", sources))
        write_pruned(data, chosen.kept, run.path / "pruned", cfg.materialize)
        return _results(run, cfg, selection, data.describe(), training=training)


def run_record(cfg: PruneConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """``prune-data record DATASET``: train the proxy and write ``dynamics/`` only."""
    cfg.proxy.validate()
    data = load_image_set(cfg.dataset, cfg.data)
    run = start_run(out, "prune-data", cfg, overwrite=overwrite)
    with run.guard():
        training = _record(cfg, data, run)
        if not is_main_process():
            return {}
        metrics = {"N": len(data), "num_classes": data.num_classes, "epochs": _epochs(cfg),
                   "record_mode": cfg.proxy.record_mode, "channels": list(cfg.proxy.channels), **training}
        return write_results(run, method="record", config=config_dict(cfg), metrics=metrics, seed=cfg.seed,
                             data=data.describe(), models={"proxy": {"id": _model_name(cfg), "revision": None}})


def run_score(cfg: PruneConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """``prune-data score --dynamics PATH...``: scores; also a selection when a budget is given."""
    cfg.validate()
    if not cfg.dynamics:
        raise ConfigError("give at least one --dynamics PATH", field="--dynamics")
    run = start_run(out, "prune-data", cfg, overwrite=overwrite)
    with run.guard():
        sources = _open_sources(cfg)
        labels = sources[0].labels
        n = sources[0].num_samples
        result = compute_scores(sources, cfg.method, cfg.score, mem_limit=cfg.mem_limit_mb << 20)
        budgeted = any(v is not None for v in (cfg.select.keep, cfg.select.prune, cfg.select.n_keep))
        chosen = _select(cfg, result, labels, sources) if budgeted else None
        ids = [str(i) for i in range(n)]
        _write_scores(run.path, result, chosen, ids, labels, cfg.scores_format)
        info = _dynamics_info(Path(cfg.dynamics[0]), sources)
        if chosen is None:
            metrics = {"method": cfg.method, "N": n, "nan_count": result.nan_count, **_stats(result.importance)}
            return write_results(run, method=cfg.method, config=config_dict(cfg), metrics=metrics, seed=cfg.seed,
                                 data={"path": ",".join(cfg.dynamics), "n": n, "fingerprint": info["fingerprint"]})
        selection = _write_selection(run.path, cfg, result, chosen, labels, info)
        return _results(run, cfg, selection, {"path": ",".join(cfg.dynamics), "n": n,
                                              "fingerprint": info["fingerprint"]})


def run_select(cfg: PruneConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """``prune-data select --scores FILE``: choose the kept set from saved importances."""
    if cfg.scores is None:
        raise ConfigError("give --scores scores.npy or scores.csv", field="--scores")
    importance, labels = read_scores(cfg.scores)
    if cfg.labels is not None:
        from mmkit.prune.dynamics import read_labels

        labels = read_labels(cfg.labels)
    run = start_run(out, "prune-data", cfg, overwrite=overwrite)
    with run.guard():
        result = ScoreResult(score=importance, importance=importance, extras={},
                             nan_count=int(np.isnan(importance).sum()), method=cfg.method, params={})
        chosen = _select(cfg, result, labels, None)
        _write_kept(run.path, chosen.kept)
        selection = _write_selection(run.path, cfg, result, chosen, labels, None)
        return _results(run, cfg, selection, {"path": cfg.scores, "n": len(importance)})


def run_apply(cfg: PruneConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """``prune-data apply DATASET --indices FILE``: the kept examples in the input's own format."""
    if cfg.indices is None:
        raise ConfigError("give --indices FILE (kept_indices.txt, .npy, scores.csv or a file list)",
                          field="--indices")
    data = load_image_set(cfg.dataset, cfg.data)
    kept = check_indices(read_indices(cfg.indices, data), len(data), cfg.indices)
    beside = Path(cfg.indices).expanduser().parent / "selection.json"
    if beside.is_file():
        import json

        expected = (json.loads(beside.read_text(encoding="utf-8")).get("dynamics") or {}).get("fingerprint")
        _check_fingerprint(expected, data, str(beside), cfg.force)
    run = start_run(out, "prune-data", cfg, overwrite=overwrite)
    with run.guard():
        write_pruned(data, kept, run.path / "pruned", cfg.materialize)
        per_class = np.bincount(data.labels[kept], minlength=data.num_classes)
        metrics = {"N": len(data), "n_keep": int(len(kept)), "keep": len(kept) / len(data),
                   "per_class_kept": {str(c): int(v) for c, v in enumerate(per_class)}}
        return write_results(run, method="apply", config=config_dict(cfg), metrics=metrics, seed=cfg.seed,
                             data=data.describe())


# --------------------------------------------------------------------------- pieces


def _model_name(cfg: PruneConfig) -> str:
    if cfg.proxy.model != "auto":
        return cfg.proxy.model
    return PRESET_PROXY.get(cfg.dataset, ("resnet-50", 90))[0]


def _epochs(cfg: PruneConfig) -> int:
    return cfg.epochs or PRESET_PROXY.get(cfg.dataset, ("resnet-50", 90))[1]


def _record(cfg: PruneConfig, data: ImageSet, run: RunDir) -> dict[str, Any]:
    from mmkit.prune.dynamics import completed_epochs

    dyn = run.path / "dynamics"
    if completed_epochs(dyn):
        _check_fingerprint(_meta(dyn).get("dataset", {}).get("fingerprint"), data, str(dyn / "meta.json"), cfg.force)
    return record_dynamics(data, cfg.proxy, _model_name(cfg), _epochs(cfg), run.path, cfg.seed)


def _meta(dyn: Path) -> dict[str, Any]:
    import json

    path = dyn / "meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _check_fingerprint(expected: str | None, data: ImageSet, where: str, force: bool) -> None:
    if expected and expected != data.fingerprint and not force:
        raise DataError(f"fingerprint {expected} does not match the dataset ({data.fingerprint}); it was made "
                        "for another dataset (pass --force to use it anyway)", file=where, field="fingerprint")


def _native_sources(cfg: PruneConfig, dyn: Path, data: ImageSet) -> list:
    from mmkit.prune.dynamics import open_dynamics

    return [open_dynamics(dyn, labels=data.labels, allow_gaps=cfg.allow_gaps)]


def _open_sources(cfg: PruneConfig) -> list:
    from mmkit.prune.dynamics import open_dynamics, read_labels

    labels = read_labels(cfg.labels) if cfg.labels else None
    sources = [open_dynamics(p, format=cfg.dynamics_format, transpose=cfg.transpose, allow_gaps=cfg.allow_gaps,
                             labels=labels, allow_nan=cfg.allow_nan) for p in cfg.dynamics]
    n = {s.num_samples for s in sources}
    if len(n) > 1:
        raise DataError(f"the --dynamics sources hold different numbers of examples: {sorted(n)}", field="--dynamics")
    return sources


def _select(cfg: PruneConfig, result: ScoreResult, labels: np.ndarray | None, sources: Sequence | None) -> Selection:
    opts = cfg.select
    n_keep = opts.budget(len(result.importance))
    cutoff = None
    if opts.strategy == "ccs" and opts.ccs_cutoff_score not in (None, cfg.method):
        if sources is None:
            raise ConfigError("--ccs-cutoff-score needs --dynamics (it scores them with another method)",
                              field="--ccs-cutoff-score")
        cutoff = compute_scores(sources, opts.ccs_cutoff_score, cfg.score,
                                mem_limit=cfg.mem_limit_mb << 20).importance
    if opts.balance == "class" and labels is None:
        raise ConfigError("--balance class needs labels (--labels FILE, or dynamics with labels.npy)",
                          field="--balance")
    return select(result.importance, n_keep, strategy=opts.strategy, balance=opts.balance, labels=labels,
                  seed=cfg.seed, tie_break=opts.tie_break, nan_policy=opts.nan_policy,
                  ccs_hard_fraction=_fraction(opts.ccs_hard_fraction), ccs_strata=opts.ccs_strata,
                  ccs_cutoff=cutoff)


def _fraction(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"expected auto or a fraction, got {value!r}", field="--ccs-hard-fraction") from None


def read_scores(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Importances (and labels when the file has them) from ``scores.npy`` or ``scores.csv``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError("file not found", file=path, field="--scores")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 1:
            raise DataError(f"expected a 1-D array of importances, got shape {arr.shape}", file=path, field="--scores")
        return arr.astype(np.float32), None
    import pandas as pd

    frame = pd.read_csv(p)
    if "importance" not in frame.columns:
        raise DataError("a scores CSV needs an 'importance' column (as prune-data score writes it)", file=path,
                        field="importance")
    if "index" in frame.columns:
        frame = frame.sort_values("index")
        if not np.array_equal(frame["index"].to_numpy(), np.arange(len(frame))):
            raise DataError("the 'index' column must hold every index 0..N-1 once", file=path, field="index")
    labels = frame["label"].to_numpy(np.int64) if "label" in frame.columns and frame["label"].notna().all() else None
    return frame["importance"].to_numpy(np.float32), labels


def _write_kept(out: Path, kept: np.ndarray) -> None:
    with atomic_write(out / "kept_indices.txt") as fh:
        fh.write("".join(f"{i}\n" for i in kept.tolist()))
    with atomic_write(out / "kept_indices.npy", mode="wb", encoding=None) as fh:
        np.save(fh, kept.astype(np.int64))


def _write_scores(out: Path, result: ScoreResult, chosen: Selection | None, ids: Sequence[str],
                  labels: np.ndarray | None, fmt: str) -> None:
    """``scores.npy`` (importance) and ``scores.csv`` (index, id, label, score, importance, rank, kept, extras)."""
    import pandas as pd

    n = len(result.importance)
    if fmt in ("npy", "both"):
        with atomic_write(out / "scores.npy", mode="wb", encoding=None) as fh:
            np.save(fh, result.importance.astype(np.float32))
    if fmt in ("csv", "both"):
        columns: dict[str, Any] = {"index": np.arange(n), "id": list(ids),
                                   "label": labels if labels is not None else np.full(n, np.nan),
                                   "score": result.score, "importance": result.importance}
        if chosen is not None:
            kept = np.zeros(n, dtype=np.int8)
            kept[chosen.kept] = 1
            columns.update(rank=chosen.rank, kept=kept)
        columns.update({k: v for k, v in result.extras.items()})
        with atomic_write(out / "scores.csv") as fh:
            pd.DataFrame(columns).to_csv(fh, index=False, float_format="%.8g")
    if chosen is not None:
        _write_kept(out, chosen.kept)


def _stats(values: np.ndarray) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"score_stats": None}
    q = np.quantile(finite, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"score_stats": {"min": float(finite.min()), "max": float(finite.max()), "mean": float(finite.mean()),
                            "quantiles": {k: float(v) for k, v in zip(("0", "0.1", "0.25", "0.5", "0.75", "0.9", "1"), q)}}}


def _dynamics_info(path: Path, sources: Sequence | None) -> dict[str, Any] | None:
    if not sources:
        return None
    meta = getattr(sources[0], "meta", None) or {}
    return {"path": str(path), "K": len(sources[0].epochs), "runs": len(sources),
            "record_mode": meta.get("record_mode"), "fingerprint": (meta.get("dataset") or {}).get("fingerprint")}


def _write_selection(out: Path, cfg: PruneConfig, result: ScoreResult, chosen: Selection,
                     labels: np.ndarray | None, dynamics: dict[str, Any] | None) -> dict[str, Any]:
    n = len(result.importance)
    selection = {
        "method": cfg.method, "params": result.params, "strategy": cfg.select.strategy,
        "balance": cfg.select.balance, "tie_break": cfg.select.tie_break, "keep": len(chosen.kept) / n,
        "n_keep": int(len(chosen.kept)), "N": n, "seed": cfg.seed, "nan_count": int(result.nan_count),
        "per_class_kept": {str(k): int(v) for k, v in sorted(chosen.per_class_kept.items())},
        **_stats(result.importance), "ccs": {"n_cut": chosen.n_cut, "beta": chosen.beta} if cfg.select.strategy == "ccs" else None,
        "dynamics": dynamics, "warnings": list(chosen.warnings), "mmkit_version": __version__, "argv": sys.argv[1:],
    }
    write_json(out / "selection.json", selection)
    plot_histogram(out / "scores_hist.png", result.importance, chosen, cfg.method)
    return selection


def plot_histogram(path: Path, importance: np.ndarray, chosen: Selection, method: str) -> None:
    """Histogram of the importances, kept and pruned stacked, with the keep/prune cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = np.isfinite(importance)
    kept = np.zeros(len(importance), dtype=bool)
    kept[chosen.kept] = True
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    values = importance[finite]
    bins = np.histogram_bin_edges(values, bins=50) if values.size else 10
    ax.hist([importance[finite & kept], importance[finite & ~kept]], bins=bins, stacked=True,
            label=[f"kept ({int(kept.sum())})", f"pruned ({int((~kept).sum())})"], color=["tab:blue", "tab:gray"])
    if kept.any() and (~kept & finite).any():
        cut = float(np.nanmin(importance[kept & finite])) if (kept & finite).any() else None
        if cut is not None:
            ax.axvline(cut, color="tab:red", linestyle="--", label=f"cut {cut:.4g}")
    ax.set_xlabel(f"importance ({method})")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, mode="wb", encoding=None) as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def _results(run: RunDir, cfg: PruneConfig, selection: dict[str, Any], data: dict[str, Any],
             training: dict[str, Any] | None = None) -> dict[str, Any]:
    metrics = {k: selection[k] for k in ("method", "N", "n_keep", "keep", "nan_count", "score_stats")}
    if training:
        metrics["proxy"] = training
    return write_results(run, method=cfg.method, config=config_dict(cfg), metrics=metrics,
                         per_category={"per_class_kept": selection["per_class_kept"]}, seed=cfg.seed, data=data,
                         models={"proxy": {"id": _model_name(cfg), "revision": None}} if training else None,
                         selection="selection.json")
