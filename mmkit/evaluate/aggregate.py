"""Statistics over several evaluation runs (evaluate.md §1.3): the ``aggregate`` block of a run with
repeated ``--model`` (generation benchmarks and retrieval alike) and ``mmkit evaluate aggregate
RUN_DIR...`` (``aggregate.json``).

For every numeric metric (nested blocks as dotted keys, ``coco_1k.rsum``): ``n``, ``mean``, sample
``std`` (ddof 1; ``None`` when n < 2), ``min``, ``max``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmkit.errors import DataError, MmkitError
from mmkit.io import write_json


def model_slug(model_id: str) -> str:
    """A model's sub-folder name: ``/`` -> ``__``, other characters outside ``[A-Za-z0-9._-]`` -> ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", model_id.replace("/", "__"))


def _flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric metrics with nested blocks as dotted keys (``coco_1k.rsum``); lists and strings left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per numeric metric over runs: ``n``, ``mean``, sample ``std`` (ddof 1; None when n < 2), ``min``, ``max``."""
    flat = [_flat(m) for m in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    out = {}
    for key in keys:
        values = np.array([f[key] for f in flat if key in f], dtype=np.float64)
        out[key] = {"n": len(values), "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) >= 2 else None,
                    "min": float(values.min()), "max": float(values.max())}
    return out


def metric_means(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The aggregate's means as a metrics block (dotted keys nested again)."""
    out: dict[str, Any] = {}
    for key, s in stats.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = s["mean"]
    return out


def run_entry(results: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One run's (model, revision, seed) and folder, as listed under ``runs``."""
    model = next(iter(results.get("models", {}).values()), {})
    return {"model": model.get("id"), "revision": model.get("revision"), "seed": results.get("seed"), "dir": where}


def aggregate_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                   force: bool = False) -> dict[str, Any]:
    """``mmkit evaluate aggregate RUN_DIR...`` (evaluate.md §1.3): :func:`aggregate` over the runs'
    metrics, with each run's (model, revision, seed); runs whose benchmark, protocol or data sha256
    differ are refused unless ``force``. Writes ``aggregate.json`` (default: in the runs' common
    parent folder)."""
    if not run_dirs:
        raise MmkitError("give at least one run directory", field="RUN_DIR")
    results = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise MmkitError("no results.json here (not a finished run folder)", file=str(d), field="RUN_DIR")
        try:
            results.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise DataError(f"malformed JSON ({exc})", file=str(path), field="json") from None
    ref = results[0]
    for d, r in zip(run_dirs[1:], results[1:]):
        for what, get in (("benchmark", lambda x: x.get("method")), ("protocol", lambda x: x.get("protocol")),
                          ("data sha256", lambda x: (x.get("data") or {}).get("sha256"))):
            if get(r) != get(ref) and not force:
                raise MmkitError(f"{what} {get(r)!r} differs from {get(ref)!r} in {run_dirs[0]} "
                                 "(pass --force to aggregate anyway)", file=str(d), field="RUN_DIR")
    target = Path(out) if out is not None else Path(os.path.commonpath([Path(d).resolve() for d in run_dirs]))
    if target.is_dir():
        target = target / "aggregate.json"
    body = {"mmkit_version": ref.get("mmkit_version"), "command": "evaluate aggregate", "method": ref.get("method"),
            "n": len(results), "aggregate": aggregate([r.get("metrics", {}) for r in results]),
            "runs": [run_entry(r, str(d)) for d, r in zip(run_dirs, results)],
            "data": ref.get("data"), "forced": force, "out": str(target)}
    write_json(target, body)
    return body
