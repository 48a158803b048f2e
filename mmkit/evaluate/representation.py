"""``mmkit evaluate representation``: CCA, SVCCA, PWCCA and linear CKA between layers (evaluate.md §7).

``load`` extracts per-layer activations of two text encoders on ``--data`` (``--model-a``,
``--model-b``; units ``token``, ``cls``, ``mean``; :mod:`mmkit.core.similarity`) or reads two
safetensors files of [N, D] tensors named by layer (``--acts-a``, ``--acts-b``); ``score`` runs
every metric on every selected (layer_a, layer_b) pair. :func:`run` writes ``results.json``
(``metrics.pairs``), ``similarity.json`` (matrices, ρ vectors) and ``similarity_<metric>.png``.
"""

from __future__ import annotations

import logging
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Literal, Optional

import numpy as np

from mmkit.config import config_dict
from mmkit.errors import ConfigError, MmkitError, suggest
from mmkit.io import RunDir, default_out, fingerprint, start_run, write_json, write_results

log = logging.getLogger("mmkit")

COMMAND = "evaluate representation"
BENCHMARK_VERSION = "1"
ALL_METRICS = ["cca", "svcca", "pwcca", "cka"]


@dataclass
class RepresentationConfig:
    """Options of ``mmkit evaluate representation`` (docs/evaluate.md lists each one)."""

    model_a: Optional[str] = None
    model_b: Optional[str] = None
    data: Optional[str] = None
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    acts_a: Optional[str] = None
    acts_b: Optional[str] = None
    layers: list[str] = field(default_factory=list)
    layers_a: list[str] = field(default_factory=list)
    layers_b: list[str] = field(default_factory=list)
    pairs: Literal["all", "diagonal"] = "all"
    metrics: list[str] = field(default_factory=lambda: list(ALL_METRICS))
    unit: Literal["token", "cls", "mean"] = "token"
    max_samples: int = 10_000
    max_length: Optional[int] = None
    batch_size: int = 32
    eps: float = 1e-6
    svcca_keep: float = 0.99
    svcca_dims: Optional[int] = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        from mmkit.core.similarity import METRICS

        acts = self.acts_a or self.acts_b
        if acts and (self.model_a or self.model_b or self.data):
            raise ConfigError("--acts-a/--acts-b replace --model-a/--model-b/--data; give one or the other",
                              field="--acts-a")
        if acts:
            if not (self.acts_a and self.acts_b):
                raise ConfigError("give both --acts-a and --acts-b", field="--acts-b" if self.acts_a else "--acts-a")
        else:
            for name, value in (("--model-a", self.model_a), ("--model-b", self.model_b), ("--data", self.data)):
                if not value:
                    raise ConfigError("missing: give --model-a, --model-b and --data (or --acts-a and --acts-b)",
                                      field=name)
        if self.layers and (self.layers_a or self.layers_b):
            raise ConfigError("--layers picks the same layers on both sides; give it or --layers-a/--layers-b",
                              field="--layers")
        if not self.metrics:
            raise ConfigError(f"expected at least one of {', '.join(ALL_METRICS)}", field="--metrics")
        for name in self.metrics:
            METRICS.resolve(name, field="--metrics")
        self.metrics = list(dict.fromkeys(self.metrics))
        for name, value, low in (("--max-samples", self.max_samples, 2), ("--batch-size", self.batch_size, 1),
                                 ("--max-length", self.max_length, 1), ("--svcca-dims", self.svcca_dims, 1),
                                 ("--eps", self.eps, 0)):
            if value is not None and value < low:
                raise ConfigError(f"expected a value >= {low:g}, got {value}", field=name)
        if not 0 < self.svcca_keep <= 1:
            raise ConfigError(f"expected a fraction in (0, 1], got {self.svcca_keep}", field="--svcca-keep")

    @property
    def options(self):
        from mmkit.core.similarity import SimilarityOptions

        return SimilarityOptions(eps=self.eps, svcca_keep=self.svcca_keep, svcca_dims=self.svcca_dims)

    @property
    def needs_samples(self) -> bool:
        """Whether a CCA-family metric is asked for (the N > d rule)."""
        from mmkit.core.similarity import METRICS

        return any(METRICS.resolve(m).needs_samples for m in self.metrics)


@dataclass
class Activations:
    """What ``load`` returns: per-layer [N, d] activations of each side and their provenance."""

    a: dict[Hashable, np.ndarray]
    b: dict[Hashable, np.ndarray]
    pairs: list[tuple[Hashable, Hashable]]
    data: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    unit: Optional[str] = None
    n_records: Optional[int] = None
    labels: tuple[str, str] = ("A", "B")    # axis titles of the heatmaps


# --------------------------------------------------------------------------- layers and pairs


def _pick(available: list[Hashable], wanted: list[str], what: str, field: str) -> list[Hashable]:
    """The layers named in ``wanted`` (all of ``available`` when empty), in the given order."""
    if not wanted:
        return list(available)
    by_name = {str(x): x for x in available}
    for name in wanted:
        if name not in by_name:
            raise ConfigError(f"no layer {name!r}{suggest(name, by_name)}; {what}", field=field)
    return [by_name[name] for name in dict.fromkeys(wanted)]


def _pairs(layers_a: list[Hashable], layers_b: list[Hashable], mode: str) -> list[tuple[Hashable, Hashable]]:
    """Every (layer_a, layer_b), row-major, or the diagonal (i-th with i-th)."""
    if mode == "all":
        return [(a, b) for a in layers_a for b in layers_b]
    if len(layers_a) != len(layers_b):
        raise ConfigError(f"diagonal pairs need as many layers on each side; got {len(layers_a)} and "
                          f"{len(layers_b)}", field="--pairs")
    return list(zip(layers_a, layers_b))


def _natural(name: str) -> list[Any]:
    """Sort key that puts ``layer2`` before ``layer10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- activation files


def load_acts(path: str, flag: str) -> dict[str, np.ndarray]:
    """One safetensors file of [N, D] float tensors, one per layer, in natural key order."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).expanduser().is_file():
        raise MmkitError("no such file", file=path, field=flag)
    try:
        tensors = load_file(str(Path(path).expanduser()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MmkitError(f"not a readable safetensors file ({str(exc).splitlines()[0]})", file=path,
                         field=flag) from None
    if not tensors:
        raise MmkitError("holds no tensors; expected one [N, D] float tensor per layer", file=path, field=flag)
    out: dict[str, np.ndarray] = {}
    rows = None
    for name in sorted(tensors, key=_natural):
        x = tensors[name]
        if x.ndim != 2 or not x.is_floating_point():
            raise MmkitError(f"expected a 2-D float tensor [N, D], got {str(x.dtype).removeprefix('torch.')} of "
                             f"shape {list(x.shape)}", file=path, field=name)
        if not bool(torch.isfinite(x).all()):
            raise MmkitError("holds NaN or infinite values", file=path, field=name)
        if rows is not None and x.shape[0] != rows:
            raise MmkitError(f"has {x.shape[0]} rows, the other tensors {rows}; expected one row per sample in "
                             "every layer", file=path, field=name)
        rows = x.shape[0]
        out[name] = (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()
    return out


def _load_files(cfg: RepresentationConfig) -> Activations:
    from mmkit.core.similarity import check_samples, sample_rows

    a, b = load_acts(cfg.acts_a, "--acts-a"), load_acts(cfg.acts_b, "--acts-b")
    n_a, n_b = next(iter(a.values())).shape[0], next(iter(b.values())).shape[0]
    if n_a != n_b:
        raise MmkitError(f"has {n_b} rows, {cfg.acts_a} has {n_a}; expected the same samples in the same order",
                         file=cfg.acts_b, field="--acts-b")
    layers_a = _pick(list(a), cfg.layers or cfg.layers_a, f"{cfg.acts_a} holds {', '.join(a)}",
                     "--layers" if cfg.layers else "--layers-a")
    layers_b = _pick(list(b), cfg.layers or cfg.layers_b, f"{cfg.acts_b} holds {', '.join(b)}",
                     "--layers" if cfg.layers else "--layers-b")
    pairs = _pairs(layers_a, layers_b, cfg.pairs)
    rows = sample_rows(n_a, cfg.max_samples, cfg.seed, "rows")
    if cfg.needs_samples:
        file, layer, width = max([*((cfg.acts_a, la, a[la].shape[1]) for la in layers_a),
                                  *((cfg.acts_b, lb, b[lb].shape[1]) for lb in layers_b)], key=lambda t: t[2])
        hint = f"; raise --max-samples above {cfg.max_samples}" if n_a > cfg.max_samples else ""
        check_samples(len(rows), width, file=file, field=layer, hint=hint, warn=False)
    subset = len(rows) < n_a
    a = {k: a[k][rows] if subset else a[k] for k in layers_a}
    b = {k: b[k][rows] if subset else b[k] for k in layers_b}
    data = {**fingerprint(cfg.acts_a, n_a), "acts_b": fingerprint(cfg.acts_b, n_b)}
    return Activations(a, b, pairs, data, labels=(Path(cfg.acts_a).name, Path(cfg.acts_b).name))


# --------------------------------------------------------------------------- models


def _texts(cfg: RepresentationConfig) -> tuple[list[str], list[str] | None, list[Any]]:
    """The texts (and text pairs) of ``--data`` with each record's line, for error messages."""
    from mmkit.errors import DataError
    from mmkit.io import read_records

    texts, pairs, lines = [], [], []
    for rec in read_records(cfg.data):
        texts.append(rec.require(cfg.text_field))
        if cfg.text_pair_field:
            pairs.append(rec.require(cfg.text_pair_field))
        lines.append(rec.loc)
    if not texts:
        raise DataError("no records; expected one text per record", file=cfg.data, field=cfg.text_field)
    return texts, pairs if cfg.text_pair_field else None, lines


def _load_models(cfg: RepresentationConfig) -> Activations:
    from mmkit.core import similarity as sim
    from mmkit.core.embed import _pad_id, _tokenizer_of, resolve_max_length
    from mmkit.core.models import load_model

    texts, text_pairs, lines = _texts(cfg)
    lm_a = load_model(cfg.model_a, "encoder", device=cfg.device, dtype=cfg.dtype)
    lm_b = lm_a if cfg.model_b == cfg.model_a else load_model(cfg.model_b, "encoder", device=cfg.device,
                                                              dtype=cfg.dtype)
    same = lm_b is lm_a
    layers = []
    for side, lm, wanted in (("a", lm_a, cfg.layers_a), ("b", lm_b, cfg.layers_b)):
        n_states = sim.num_hidden_states(lm.model.config)
        layers.append(_pick(list(range(n_states)), cfg.layers or wanted,
                            f"{lm.id} has layers 0..{n_states - 1} (0 = embeddings)",
                            "--layers" if cfg.layers else f"--layers-{side}"))
    pairs = _pairs(*layers, cfg.pairs)
    tok_a, tok_b = _tokenizer_of(lm_a.preprocessor), _tokenizer_of(lm_b.preprocessor)
    length = min([resolve_max_length(lm.path, lm.model.config, tok, None) for lm, tok in ((lm_a, tok_a), (lm_b, tok_b))]
                 + ([cfg.max_length] if cfg.max_length else []))  # the models' limits, capped by --max-length
    tokens_a = sim.tokenize(tok_a, texts, text_pairs, max_length=length)
    tokens_b = tokens_a if same else sim.tokenize(tok_b, texts, text_pairs, max_length=length)
    if cfg.unit == "token" and not same:
        bad = sim.first_difference(tokens_a, tokens_b)
        if bad is not None:
            raise ConfigError(f"unit token needs one tokenizer for both models, but {cfg.model_a} and {cfg.model_b} "
                              "tokenise this record differently; use --unit cls or mean", file=cfg.data,
                              line=lines[min(bad, len(lines) - 1)], field="--unit")
    # rows depend only on the record count (cls, mean) or on tokens both sides share (token)
    selection = sim.select_samples(tokens_a, cfg.unit, cfg.max_samples, cfg.seed)
    if cfg.needs_samples:  # before any forward pass
        available = int(tokens_a.ids.lengths.sum()) if cfg.unit == "token" else len(texts)
        hint = f"; raise --max-samples above {cfg.max_samples}" if available > cfg.max_samples else ""
        sim.check_samples(len(selection), max(_hidden_size(lm_a.model.config), _hidden_size(lm_b.model.config)),
                          file=cfg.data, field="--data", hint=hint, warn=False)

    def extract(lm, tokenizer, tokens, wanted: list[int]) -> dict[int, np.ndarray]:
        return sim.hidden_states(lm.model, tokens, selection, wanted, pad_id=_pad_id(tokenizer),
                                 batch_size=cfg.batch_size, description=f"hidden states ({lm.id})")

    if same:
        got = extract(lm_a, tok_a, tokens_a, sorted(set(layers[0]) | set(layers[1])))
        acts_a, acts_b = ({k: got[k] for k in side} for side in layers)
    else:
        acts_a, acts_b = extract(lm_a, tok_a, tokens_a, layers[0]), extract(lm_b, tok_b, tokens_b, layers[1])
    models = {f"model_{s}": {**lm.record(), "backend": "hf", "class": type(lm.model).__name__,
                             "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."), "layers": ls}
              for s, lm, ls in (("a", lm_a, layers[0]), ("b", lm_b, layers[1]))}
    return Activations(acts_a, acts_b, pairs, fingerprint(cfg.data, len(texts)), models, cfg.unit, len(texts),
                       (Path(lm_a.id).name, Path(lm_b.id).name))


def _hidden_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


# --------------------------------------------------------------------------- benchmark


class RepresentationBenchmark:
    """Layer-by-layer similarity of two models' activations: only the ``load`` and ``score`` hooks."""

    name = "representation"
    version = BENCHMARK_VERSION
    needs = "embed"

    def load(self, cfg: RepresentationConfig) -> Activations:
        """Activations of both sides: from ``--acts-a/--acts-b`` files or extracted on ``--data``."""
        return _load_files(cfg) if cfg.acts_a else _load_models(cfg)

    def score(self, data: Activations, cfg: RepresentationConfig):
        """A :class:`~mmkit.core.similarity.Grid` of every metric on every pair."""
        from mmkit.core.similarity import similarity_grid

        return similarity_grid(data.a, data.b, data.pairs, cfg.metrics, cfg.options)


BENCHMARK = RepresentationBenchmark()


# --------------------------------------------------------------------------- run


def run(cfg: RepresentationConfig, out: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate and write the run folder; returns ``results.json``."""
    from mmkit.core.seeding import seed_everything

    run_dir = start_run(out if out is not None else default_out("evaluate-representation"), COMMAND, cfg,
                        overwrite=overwrite)
    with run_dir.guard():
        seed_everything(cfg.seed)
        acts = BENCHMARK.load(cfg)
        grid = BENCHMARK.score(acts, cfg)
        _write_artefacts(run_dir, grid, acts)
        pairs = [{"layer_a": la, "layer_b": lb, **{m: _number(grid.value(m, la, lb)) for m in grid.metrics}}
                 for la, lb in grid.pairs]
        log.info("similarity of %d layer pairs on %d samples", len(pairs), grid.n_samples)
        return write_results(
            run_dir, method="representation", config=config_dict(cfg), metrics={"pairs": pairs}, seed=cfg.seed,
            models=acts.models, data=acts.data, benchmark_version=BENCHMARK_VERSION, complete=True,
            counts={"records": acts.n_records, "samples": grid.n_samples, "pairs": len(pairs)}, unit=acts.unit,
            layers_a=grid.layers_a, layers_b=grid.layers_b, environment=_environment(), anomalies=[],
            warnings=grid.warnings, out=str(run_dir.path))


def _number(value: float) -> float | None:
    """A score for JSON: NaN (not computed, or undefined for a constant layer) becomes null."""
    return float(value) if np.isfinite(value) else None


def _matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[_number(v) for v in row] for row in values]


def _write_artefacts(run_dir: RunDir, grid: Any, acts: Activations) -> None:
    """``similarity.json`` (every matrix, the ρ vectors) and one ``similarity_<metric>.png`` per metric."""
    from mmkit.core.similarity import plot_heatmap

    write_json(run_dir / "similarity.json", {
        "metrics": grid.metrics, "layers_a": grid.layers_a, "layers_b": grid.layers_b,
        "n_samples": grid.n_samples, "unit": acts.unit,
        **{m: _matrix(grid.values[m]) for m in grid.metrics},
        "rho": [{"layer_a": la, "layer_b": lb, **grid.rho.get((la, lb), {})} for la, lb in grid.pairs],
    })
    for m in grid.metrics:
        plot_heatmap(run_dir / f"similarity_{m}.png", grid.values[m], grid.layers_a, grid.layers_b,
                     title=f"{m} (N={grid.n_samples})", row_title=f"layer of {acts.labels[0]}",
                     col_title=f"layer of {acts.labels[1]}")


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}
