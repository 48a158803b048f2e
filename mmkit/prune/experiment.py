"""The small real pruning experiment (prune.md section 11): record, prune, retrain from scratch.

For each seed: train the proxy on the whole training split while recording its dynamics (this
run is also the keep = 1.0 reference), score with every method, keep each fraction, retrain a
fresh model on each subset with the same seed and report the final-epoch test accuracy.
Rows are appended to ``seed-S/results.csv`` as they finish, so a rerun resumes where it stopped;
seeds can run in parallel processes (``jobs``). ``results.csv`` gathers every seed's rows.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmkit.config import config_dict
from mmkit.errors import ConfigError
from mmkit.io import atomic_write, start_run, write_results
from mmkit.prune.data import ImageSet, load_image_set, training_examples
from mmkit.prune.proxy import ProxyConfig, accuracy, build_model, classification_loss, record_dynamics, train_config
from mmkit.prune.scores import METHODS, ScoreParams, compute_scores
from mmkit.prune.select import n_keep_for, select

log = logging.getLogger("mmkit")

COLUMNS = ["method", "keep", "seed", "n_train", "test_acc", "train_seconds"]
PRESET_MODELS = {"mnist5k": "small-cnn", "digits": "mlp"}


@dataclass
class ExperimentConfig:
    """``prune-data experiment`` (prune.md section 11 defaults)."""

    preset: str = "mnist5k"  # mnist5k | digits
    methods: list[str] = field(default_factory=lambda: [
        "random", "el2n", "forgetting", "aum", "entropy", "dyn-unc", "cartography", "ccs:dyn-unc", "ccs:aum"])
    keeps: list[float] = field(default_factory=lambda: [0.9, 0.75, 0.5, 0.3])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 20
    window: int = 10
    budget: str = "epochs"  # epochs | iterations (retraining matches the full run's optimizer steps)
    quick: bool = False  # 2 seeds, keep 0.5, random vs dyn-unc
    jobs: int = 1  # seeds run in parallel processes, each with cpu_count // jobs torch threads
    proxy: ProxyConfig = field(default_factory=lambda: ProxyConfig(dtype="float32"))

    def resolved(self) -> "ExperimentConfig":
        cfg = replace(self, seeds=[0, 1], keeps=[0.5], methods=["random", "dyn-unc"]) if self.quick else self
        if cfg.preset not in PRESET_MODELS:
            raise ConfigError(f"expected one of {', '.join(PRESET_MODELS)}, got {cfg.preset!r}", field="--preset")
        if cfg.jobs < 1:
            raise ConfigError(f"expected at least 1, got {cfg.jobs}", field="--jobs")
        if cfg.budget not in ("epochs", "iterations"):
            raise ConfigError(f"expected epochs or iterations, got {cfg.budget!r}", field="--budget")
        for m in cfg.methods:
            METHODS.resolve(m.split(":", 1)[-1], field="--methods")
        for k in cfg.keeps:
            n_keep_for(100, keep=k)  # validates the fraction
        return cfg


def run_experiment(cfg: ExperimentConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """Run the grid, then write ``results.csv``, ``summary.csv``, ``accuracy_vs_keep.png``, ``report.md``."""
    cfg = cfg.resolved()
    data = load_image_set(cfg.preset)
    run = start_run(out, "prune-data", cfg, overwrite=overwrite)
    with run.guard():
        model = cfg.proxy.model if cfg.proxy.model != "auto" else PRESET_MODELS[cfg.preset]
        if cfg.jobs == 1 or len(cfg.seeds) == 1:
            for seed in cfg.seeds:
                _one_seed(cfg, data, model, seed, run.path)
        else:
            _parallel_seeds(cfg, model, run.path)
        rows = [r for seed in cfg.seeds for r in _read_rows(run.path / f"seed-{seed}" / "results.csv")]
        _write_csv(run.path / "results.csv", rows, COLUMNS)
        summary = summarise(rows)
        _write_csv(run.path / "summary.csv", summary, ["method", "keep", "n", "mean", "std"])
        plot_accuracy(run.path / "accuracy_vs_keep.png", summary, cfg.preset)
        flags = compare_to_random(summary)
        (run.path / "report.md").write_text(report(cfg, summary, flags, model), encoding="utf-8")
        metrics = {f"{r['method']}@{r['keep']}": {"mean": r["mean"], "std": r["std"], "n": r["n"]} for r in summary}
        return write_results(run, method="experiment", config=config_dict(cfg), metrics=metrics, seed=cfg.seeds[0],
                             data=data.describe(), models={"proxy": {"id": model, "revision": None}},
                             flags=flags)


def _parallel_seeds(cfg: ExperimentConfig, model: str, out: Path) -> None:
    """One process per seed, at most ``jobs`` at a time, splitting the CPU threads between them."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job in [pool.submit(_seed_worker, cfg, model, seed, out, threads) for seed in cfg.seeds]:
            job.result()


def _seed_worker(cfg: ExperimentConfig, model: str, seed: int, out: Path, threads: int) -> None:
    import torch

    from mmkit.progress import set_quiet

    torch.set_num_threads(threads)
    set_quiet(True)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    _one_seed(cfg, load_image_set(cfg.preset), model, seed, out)


def _one_seed(cfg: ExperimentConfig, data: ImageSet, model: str, seed: int, out: Path) -> None:
    """Record the seed's dynamics, then prune and retrain; rows go to ``seed-S/results.csv``."""
    seed_dir = out / f"seed-{seed}"
    rows_path = seed_dir / "results.csv"
    have = {(r["method"], float(r["keep"]), int(r["seed"])) for r in _read_rows(rows_path)}
    start = time.time()
    proxy = record_dynamics(data, cfg.proxy, model, cfg.epochs, seed_dir, seed)
    if ("full", 1.0, seed) not in have:
        acc = proxy.get("test_acc")
        if acc is None:  # resumed after the recording finished: evaluate the saved proxy
            acc = _saved_proxy_accuracy(data, cfg.proxy, model, seed_dir)
        _append(rows_path, {"method": "full", "keep": 1.0, "seed": seed, "n_train": len(data),
                            "test_acc": acc, "train_seconds": round(time.time() - start, 2)})
    from mmkit.prune.dynamics import open_dynamics

    source = open_dynamics(seed_dir / "dynamics", labels=data.labels)
    params = ScoreParams(window=cfg.window, seed=seed)
    steps_full = int(np.ceil(len(data) / train_config(cfg.proxy, data, 1, seed).batch_size)) * cfg.epochs
    for spec in cfg.methods:
        strategy, _, method = spec.rpartition(":")
        importance = compute_scores([source], method, params).importance
        for keep in cfg.keeps:
            if (spec, keep, seed) in have:
                continue
            kept = select(importance, n_keep_for(len(data), keep=keep), strategy=strategy or "topk",
                          seed=seed).kept
            acc, seconds = retrain(data, kept, cfg, model, seed, seed_dir / "retrain",
                                   steps_full if cfg.budget == "iterations" else None)
            _append(rows_path, {"method": spec, "keep": keep, "seed": seed, "n_train": len(kept),
                                "test_acc": acc, "train_seconds": seconds})
            log.info("seed %d %s keep %.2f: test accuracy %.2f%% (%d examples, %.0fs)", seed, spec, keep, acc,
                     len(kept), seconds)


def retrain(data: ImageSet, kept: np.ndarray, cfg: ExperimentConfig, model_name: str, seed: int, work: Path,
            max_steps: int | None = None) -> tuple[float, float]:
    """Train a fresh model with ``seed`` on ``kept``; the final epoch's test accuracy (percent)."""
    from torch.utils.data import Subset

    from mmkit.core.train import train

    start = time.time()
    shutil.rmtree(work, ignore_errors=True)
    model = build_model(model_name, data, cfg.proxy.init, seed=seed)
    tc = train_config(cfg.proxy, data, cfg.epochs if max_steps is None else 10**6, seed)
    tc.max_steps = max_steps
    tc.checkpoints = False  # a short run from scratch: restarting it is cheaper than checkpointing
    train(model, classification_loss("eval-pass"), Subset(training_examples(data), kept.tolist()), tc, work,
          final_dir=None)
    shutil.rmtree(work, ignore_errors=True)
    return accuracy(model, data.test), round(time.time() - start, 2)


def _saved_proxy_accuracy(data: ImageSet, proxy: ProxyConfig, model_name: str, seed_dir: Path) -> float:
    from safetensors.torch import load_file

    model = build_model(model_name, data, proxy.init)
    model.load_state_dict(load_file(str(seed_dir / "proxy" / "model" / "model.safetensors")))
    return accuracy(model, data.test)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (ddof = 1; NaN for one seed) of test accuracy per (method, keep)."""
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["keep"])), []).append(float(r["test_acc"]))
    out = []
    for (method, keep), accs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], -kv[0][1])):
        a = np.asarray(accs)
        out.append({"method": method, "keep": keep, "n": len(a), "mean": float(a.mean()),
                    "std": float(a.std(ddof=1)) if len(a) > 1 else float("nan")})
    return out


def compare_to_random(summary: list[dict[str, Any]]) -> list[str]:
    """Cases where dyn-unc's mean falls more than one std below random's (prune.md section 11)."""
    by = {(r["method"], r["keep"]): r for r in summary}
    flags = []
    for (method, keep), r in by.items():
        rnd = by.get(("random", keep))
        if method != "dyn-unc" or rnd is None:
            continue
        std = rnd["std"] if np.isfinite(rnd["std"]) else 0.0
        if r["mean"] < rnd["mean"] - std:
            flags.append(f"keep {keep}: dyn-unc {r['mean']:.2f} is more than one std below random "
                         f"{rnd['mean']:.2f} +- {std:.2f}" + (" (expected on small data at keep <= 0.3)"
                                                              if keep <= 0.3 else ""))
    return flags


def plot_accuracy(path: Path, summary: list[dict[str, Any]], preset: str) -> None:
    """Test accuracy against the kept fraction, one line per method with +-std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    full = [r for r in summary if r["method"] == "full"]
    for method in sorted({r["method"] for r in summary} - {"full"}):
        pts = sorted((r for r in summary if r["method"] == method), key=lambda r: r["keep"])
        ax.errorbar([p["keep"] for p in pts], [p["mean"] for p in pts],
                    yerr=[0 if not np.isfinite(p["std"]) else p["std"] for p in pts], marker="o", capsize=3,
                    label=method)
    if full:
        ax.axhline(full[0]["mean"], color="black", linestyle="--", label=f"full data {full[0]['mean']:.2f}")
    ax.set_xlabel("kept fraction")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{preset}: retrained from scratch on the kept subset")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, mode="wb", encoding=None) as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def report(cfg: ExperimentConfig, summary: list[dict[str, Any]], flags: list[str], model: str) -> str:
    """``report.md``: a method x keep table of "mean +- std" and the run configuration."""
    keeps = sorted({r["keep"] for r in summary if r["method"] != "full"}, reverse=True)
    by = {(r["method"], r["keep"]): r for r in summary}
    methods = [m for m in dict.fromkeys(r["method"] for r in summary) if m != "full"]
    lines = [f"# Pruning experiment: {cfg.preset}", "",
             f"Proxy and retraining model `{model}`, {cfg.epochs} epochs ({cfg.budget} budget), seeds "
             f"{cfg.seeds}, dyn-unc window {cfg.window}; test accuracy (%) of the final epoch, mean +- sample std "
             "over seeds.", "", "| method | " + " | ".join(f"keep {k}" for k in keeps) + " |",
             "|---|" + "---|" * len(keeps)]
    for m in methods:
        cells = [_cell(by.get((m, k))) for k in keeps]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if ("full", 1.0) in by:
        lines += ["", f"Full data (keep 1.0): {_cell(by[('full', 1.0)])}."]
    lines += ["", "## Flags", ""] + ([f"- {f}" for f in flags] or ["- none: dyn-unc is never more than one std "
                                                                   "below random."])
    return "\n".join(lines) + "\n"


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{r['mean']:.2f} +- {r['std']:.2f}" if np.isfinite(r["std"]) else f"{r['mean']:.2f}"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _append(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with atomic_write(path) as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
