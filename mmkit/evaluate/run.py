"""The runner of generation benchmarks (evaluate.md §1-2): load -> prompt -> backend -> predictions.jsonl
-> score -> results.json, with resume by uid under one ``config_hash``, several ``--model`` runs with an
``aggregate`` block, and ``mmkit evaluate aggregate RUN_DIR...``.

Benchmarks implement the hooks of :mod:`mmkit.evaluate.base`; they never touch the run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmkit.config import config_dict
from mmkit.core.backends import Backend, GenerationSettings, Request, budget, open_backend, resolve_kind
from mmkit.errors import ConfigError, MmkitError
from mmkit.evaluate import Benchmark, get_benchmark
from mmkit.evaluate.aggregate import aggregate, metric_means, model_slug, run_entry
from mmkit.evaluate.base import EvalConfig, Loaded
from mmkit.io import RunDir, Predictions, default_out, sha256_file, start_run, write_jsonl, write_results

log = logging.getLogger("mmkit")

PREDICTIONS = "predictions.jsonl"
#: fsync predictions.jsonl every this many appended lines (and at the end), §1.2.
FSYNC_EVERY = 50


def command_of(name: str) -> str:
    """The run-folder command of benchmark ``name`` (``evaluate mmr``)."""
    return f"evaluate {name}"


def evaluate(name: str, cfg: EvalConfig, out: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Run generation benchmark ``name`` with ``cfg`` into ``out`` (resuming unless ``overwrite``) and
    return ``results.json``. ``--dump-requests`` only writes the rendered requests (no run folder)."""
    bench = get_benchmark(name)
    if cfg.dump_requests:
        return dump_requests(bench, cfg)
    out = out if out is not None else default_out(f"evaluate-{name}")
    if len(cfg.backend.model) > 1 and not cfg.predictions:
        return _run_many(bench, cfg, out, overwrite)
    run = start_run(out, command_of(name), cfg, overwrite=overwrite)
    with run.guard():
        return run_one(bench, cfg, run)


def dump_requests(bench: Benchmark, cfg: EvalConfig) -> dict[str, Any]:
    """``--dump-requests FILE``: the rendered requests (uid, text, image paths) as JSONL, no model (§2.3)."""
    data = bench.load(cfg)
    requests = _requests(bench, data, cfg)
    n = write_jsonl(cfg.dump_requests, ({"uid": r.uid, "text": r.text, "images": [_image_name(i) for i in r.images],
                                        **({"parts": [[k, v if k == "text" else _image_name(v)] for k, v in r.parts]}
                                           if r.parts else {})} for r in requests))
    log.info("wrote %d requests to %s", n, cfg.dump_requests)
    return {"method": bench.name, "requests": str(cfg.dump_requests), "n": n}


def _image_name(image: Any) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else "<in-memory image>"


def _requests(bench: Benchmark, data: Loaded, cfg: EvalConfig) -> list[Request]:
    """The benchmark's requests with its default budget filled in; uids must be unique."""
    requests = [r if r.max_new_tokens is not None else replace(r, max_new_tokens=bench.max_new_tokens)
                for r in bench.prompt(data, cfg)]
    seen: set[str] = set()
    for r in requests:
        if r.uid in seen:
            raise RuntimeError(f"benchmark {bench.name} made two requests with uid {r.uid!r}")
        seen.add(r.uid)
    return requests


def settings_of(bench: Benchmark, cfg: EvalConfig) -> GenerationSettings:
    """The generation settings of a run: the user's, with every beam setting left unset taken from
    the benchmark's ``generation_defaults`` (CHAIR: 5 beams, length penalty 0), else greedy;
    ``max_new_tokens`` None keeps each request's own budget."""
    g = cfg.generation.resolved(getattr(bench, "generation_defaults", None))
    for name, value in (("--max-new-tokens", g.max_new_tokens), ("generation.n", g.n), ("--num-beams", g.num_beams)):
        if value is not None and value < 1:
            raise ConfigError(f"expected >= 1, got {value}", field=name)
    return g


def config_hash(*, benchmark: str, version: str, data_sha256: str | None, model: Mapping[str, Any],
                connector_sha256: str | None, backend: str, settings: GenerationSettings, default_budget: int,
                image_mode: str, route: str, seed: int) -> str:
    """SHA-256 over what makes an answer (evaluate.md §1.2): benchmark name and version (which versions
    its prompt template), data sha256, model id and revision, connector sha256, backend kind, generation
    parameters, image mode, scoring route and seed; batch size, concurrency and device are left out."""
    gen = dataclasses.asdict(settings)
    gen["max_new_tokens"] = settings.max_new_tokens if settings.max_new_tokens is not None else f"default:{default_budget}"
    payload = {"benchmark": benchmark, "version": version, "data_sha256": data_sha256, "model": model.get("id"),
               "revision": model.get("revision"), "connector": connector_sha256, "backend": backend,
               "generation": gen, "image_mode": image_mode, "route": route, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _route(data: Loaded) -> str:
    """The scoring route the loaded data resolved (SNARE's ``data.route``), else ``generate``."""
    return str(getattr(data, "route", None) or "generate")


def _unfiltered(bench: Benchmark, cfg: EvalConfig, data: Loaded) -> tuple[Loaded, EvalConfig]:
    """The benchmark's whole data set and its config: ``cfg`` without ``--limit`` and with the
    benchmark's ``unfiltered`` values (``data`` itself when that changes nothing)."""
    changes = {"limit": None, **getattr(bench, "unfiltered", {})}
    if all(getattr(cfg, k) == v for k, v in changes.items()):
        return data, cfg
    whole = replace(cfg, **changes)
    return bench.load(whole), whole


def open_for(bench: Benchmark, cfg: EvalConfig, data: Loaded, model: str | None) -> Backend:
    """Open the backend the config names for ``model`` and check it offers what ``bench`` needs. A
    predictions file is read against the whole data set, so its lines for records that ``--limit``
    (or a subset option such as RealBench ``--tasks``) leaves out are ignored, not extra."""
    kind = resolve_kind(cfg.backend, cfg.predictions)
    options: dict[str, Any] = {"seed": cfg.seed}
    if kind == "predictions":
        whole, whole_cfg = _unfiltered(bench, cfg, data)
        options.update(path=cfg.predictions, known_uids=[r.uid for r in bench.prompt(whole, whole_cfg)], data=whole,
                       uid_of=getattr(bench, "uid_of", None), allow_missing=cfg.allow_missing,
                       ignore_extra=cfg.ignore_extra)
        model = model or cfg.predictions
    elif not model:
        raise ConfigError(f"{bench.name} needs --model (or --predictions FILE)", field="--model")
    backend = open_backend(kind, cfg.backend, model, **options)
    if "generate" not in backend.offers:
        desc = backend.describe()
        backend.close()
        raise MmkitError(f"{bench.name} needs a generate model; {desc['id']} ({desc.get('class')}) offers: "
                         f"{', '.join(backend.offers) or 'nothing mmkit can use'}", field="--model")
    return backend


def decoding_of(backend: Backend, settings: GenerationSettings, requests: Sequence[Request]) -> dict[str, Any] | None:
    """``config.decoding`` of results.json (unlearn.md §5.1): the backend's decoding of ``settings``
    plus the new-token budget (one number, or the sorted budgets when requests differ); None when
    the answers come from a predictions file."""
    decoding = backend.decoding(settings)
    if decoding is None:
        return None
    budgets = sorted({budget(r, settings) for r in requests})
    return {**decoding, "max_new_tokens": budgets[0] if len(budgets) == 1 else budgets}


def _decoding_warnings(backend: Backend, settings: GenerationSettings, decoding: Mapping[str, Any] | None) -> list[str]:
    """A warning when the backend cannot decode as asked (beam search over HTTP is greedy)."""
    if decoding is None or decoding["num_beams"] == settings.num_beams:
        return []
    message = (f"num_beams {settings.num_beams} (beam search) needs the hf backend; the {backend.kind} backend "
               f"decoded {decoding['strategy']} (see config.decoding)")
    log.warning("%s", message)
    return [message]


def run_one(bench: Benchmark, cfg: EvalConfig, run: RunDir) -> dict[str, Any]:
    """One model's run in ``run``: resume, answer what is missing, score, write results.json."""
    from mmkit.core.seeding import seed_everything

    seed_everything(cfg.seed)
    data = bench.load(cfg)
    if data.anomalies:
        write_jsonl(run / "anomalies.jsonl", data.anomalies)
    settings = settings_of(bench, cfg)
    direct = getattr(bench, "score_direct", None)
    scored = direct(data, cfg) if callable(direct) else None
    if scored is not None:  # no generation: under a multi-process launch rank 0 writes, the others stop
        return _write_direct(bench, cfg, run, data, scored, settings) if _shard()[0] == 0 else {}
    requests = _requests(bench, data, cfg)
    backend = open_for(bench, cfg, data, cfg.backend.model[0] if cfg.backend.model else None)
    try:
        model = backend.describe()
        digest = config_hash(benchmark=bench.name, version=bench.version, data_sha256=data.sha256, model=model,
                             connector_sha256=_connector_sha256(cfg), backend=backend.kind, settings=settings,
                             default_budget=bench.max_new_tokens, image_mode=backend.image_mode, route=_route(data),
                             seed=cfg.seed)
        decoding = decoding_of(backend, settings, requests)
        warnings = _decoding_warnings(backend, settings, decoding)
        rank, world = _shard()
        mine = requests[rank::world]
        merged = _resume(run / PREDICTIONS, digest)
        own = _resume(run / _rank_file(rank), digest) if world > 1 else merged
        done = {**merged.done, **own.done}
        pending = [r for r in mine if done.get(r.uid, {}).get("error", "x") is not None]
        if len(pending) < len(mine):
            log.info("%d of %d requests already answered in %s", len(mine) - len(pending), len(mine), run)
        _answer(bench, backend, pending, settings, own, digest)
        device = backend.device
    finally:
        backend.close()
    done = _merge_ranks(run, merged) if world > 1 else merged.done
    if rank != 0:
        return {}
    answers = {r.uid: done[r.uid] for r in requests if r.uid in done}
    failed = sum(1 for r in requests if answers.get(r.uid, {}).get("error", "x") is not None)
    scored = bench.score(data, answers, cfg)
    unparsed = sum(1 for a in answers.values() if a.get("error") is None and a.get("parsed") is None)
    unparsed = scored.get("metrics", {}).get("n_unparsed", unparsed)
    counts = {"records": data.n, "requests": len(requests), "answered": len(requests) - failed, "failed": failed,
              "unparsed": unparsed}
    if failed:
        log.warning("%d of %d requests failed (see the error field in %s); they count as wrong",
                    failed, len(requests), run / PREDICTIONS)
    return _write(bench, cfg, run, data, scored, models={"model": model}, counts=counts,
                  complete=failed == 0 and cfg.limit is None, environment=_environment(device), config_hash=digest,
                  decoding=decoding, warnings=warnings)


def _shard() -> tuple[int, int]:
    """(rank, world size) of a multi-process launch (``accelerate launch``, torchrun); (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _rank_file(rank: int) -> str:
    return f"predictions.rank{rank}.jsonl"


def _merge_ranks(run: RunDir, merged: Predictions) -> dict[str, dict[str, Any]]:
    """Multi-process runs (evaluate.md §2): after a barrier rank 0 folds every ``predictions.rank<r>.jsonl``
    into ``predictions.jsonl`` (a rank's newer line wins over an older merged one), replaces it atomically
    and deletes the rank files; returns the merged lines (empty on other ranks)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    if _shard()[0] != 0:
        return {}
    done = dict(merged.done)
    parts = sorted(run.path.glob("predictions.rank*.jsonl"))
    for part in parts:
        done.update(Predictions(part).done)
    write_jsonl(run / PREDICTIONS, done.values())
    for part in parts:
        part.unlink()
    return done


def _connector_sha256(cfg: EvalConfig) -> str | None:
    return sha256_file(cfg.backend.connector) if cfg.backend.connector else None


def _write_direct(bench: Benchmark, cfg: EvalConfig, run: RunDir, data: Loaded, scored: Mapping[str, Any],
                  settings: GenerationSettings) -> dict[str, Any]:
    """Results of a route that needs no generation (``score_direct``); its per-sample ``predictions``
    lines, stamped with ``config_hash`` and ``time``, replace predictions.jsonl atomically and are
    counted as the answered requests."""
    models = dict(scored.get("models") or {})
    model = models.get("model") or {}
    digest = config_hash(benchmark=bench.name, version=bench.version, data_sha256=data.sha256, model=model,
                         connector_sha256=_connector_sha256(cfg), backend=str(model.get("backend")),
                         settings=settings, default_budget=bench.max_new_tokens, image_mode="none",
                         route=_route(data), seed=cfg.seed)
    lines = scored.get("predictions") or []
    if lines:
        write_jsonl(run / PREDICTIONS, ({"error": None, **line, "config_hash": digest, "time": _now()}
                                        for line in lines))
    return _write(bench, cfg, run, data, scored, models=models,
                  counts={"records": data.n, "requests": len(lines), "answered": len(lines), "failed": 0,
                          "unparsed": 0},
                  complete=cfg.limit is None, environment=_environment(None), config_hash=digest, decoding=None,
                  warnings=[])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _resume(path: Path, digest: str) -> Predictions:
    """``predictions.jsonl`` of this run: lines made under another ``config_hash`` stop the run."""
    preds = Predictions(path)
    other = next((line for line in preds.done.values() if line.get("config_hash") != digest), None)
    if other is not None:
        raise MmkitError("holds answers made with other settings (model, data, generation parameters or seed "
                         "changed); pass --overwrite to restart or choose another --out", file=str(path),
                         field="config_hash")
    return preds


def _answer(bench: Benchmark, backend: Backend, pending: Sequence[Request], settings: GenerationSettings,
            preds: Predictions, digest: str) -> None:
    """Send ``pending`` to the backend and append each answer as it arrives (fsync every 50 lines)."""
    from mmkit.progress import Progress

    if not pending:
        return
    by_uid = {r.uid: r for r in pending}
    written = failed = 0
    with Progress(len(pending), f"{bench.name} answers") as bar:
        try:
            for line in backend.answer(pending, settings):
                request = by_uid[line["uid"]]
                parsed = bench.parse(line["prediction"], request) if line["error"] is None else None
                # the backend's extras win over the request's: a predictions file's qhash must reach
                # the benchmark's check against the data (evaluate.md §3)
                record = {"uid": line["uid"], "prediction": line["prediction"], "parsed": parsed,
                          "error": line["error"], "config_hash": digest, "latency_s": line["latency_s"],
                          "finish_reason": line["finish_reason"], "usage": line["usage"], "time": _now(),
                          **dict(request.extras), **{k: v for k, v in line.items() if k not in _LINE_KEYS}}
                preds.append(record)
                written += 1
                if written % FSYNC_EVERY == 0:
                    _fsync(preds.path)
                failed += line["error"] is not None
                bar.update(1, failed=failed)
        finally:
            _fsync(preds.path)


_LINE_KEYS = frozenset({"uid", "prediction", "error", "latency_s", "finish_reason", "usage"})


def _fsync(path: Path) -> None:
    if path.exists():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


def _environment(device: str | None) -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}


def _write(bench: Benchmark, cfg: EvalConfig, run: RunDir, data: Loaded, scored: Mapping[str, Any], *,
           models: Mapping[str, Any], counts: dict[str, int], complete: bool, environment: dict[str, Any],
           config_hash: str | None, decoding: Mapping[str, Any] | None, warnings: list[str]) -> dict[str, Any]:
    """results.json (and the benchmark's ``per_sample`` rows, written atomically to its
    ``per_sample_file``, never into results.json)."""
    if not complete:
        why = "--limit" if cfg.limit is not None and not counts["failed"] else f"{counts['failed']} failed requests"
        log.warning("the run is incomplete (%s): results.json has complete: false", why)
    if scored.get("per_sample") is not None:
        write_jsonl(run / getattr(bench, "per_sample_file", "per_sample.jsonl"), scored["per_sample"])
    anomalies = list(scored.get("anomalies", data.anomalies))
    return write_results(
        run, method=bench.name, config={**config_dict(cfg), "decoding": decoding}, metrics=scored.get("metrics", {}),
        per_category=scored.get("per_category"), seed=cfg.seed, models=models,
        data={"path": data.path, "sha256": data.sha256, "n": data.n}, benchmark_version=bench.version,
        complete=complete, counts=counts, environment=environment, anomalies=anomalies,
        warnings=[*warnings, *scored.get("warnings", [])], config_hash=config_hash, out=str(run.path),
        **{k: v for k, v in scored.items() if k not in _SCORED_KEYS})


_SCORED_KEYS = frozenset({"metrics", "per_category", "anomalies", "warnings", "models", "counts", "per_sample",
                          "predictions"})


# --------------------------------------------------------------------------- several models


def _run_many(bench: Benchmark, cfg: EvalConfig, out: str | os.PathLike, overwrite: bool) -> dict[str, Any]:
    """One sub-folder per ``--model`` (its slug) and ``<out>/results.json`` with an ``aggregate`` block."""
    models = cfg.backend.model
    slugs = [model_slug(m) for m in models]
    if len(set(slugs)) != len(slugs):
        dup = next(m for m, s in zip(models, slugs) if slugs.count(s) > 1)
        raise ConfigError(f"{dup!r} is given twice (or maps to the same folder as another)", field="--model")
    top = start_run(out, command_of(bench.name), cfg, overwrite=overwrite)
    with top.guard():
        per_model = []
        for model, slug in zip(models, slugs):
            one = replace(cfg, backend=replace(cfg.backend, model=[model]))
            sub = start_run(top / slug, command_of(bench.name), one, overwrite=overwrite)
            per_model.append((slug, run_one(bench, one, sub)))
        top.attach_log()
        stats = aggregate([r["metrics"] for _, r in per_model])
        first = per_model[0][1]
        counts = {k: sum(r["counts"][k] for _, r in per_model) for k in first["counts"]}
        return write_results(
            top, method=bench.name, config=config_dict(cfg), metrics=metric_means(stats), seed=cfg.seed,
            models={slug: r["models"]["model"] for slug, r in per_model}, data=first["data"],
            benchmark_version=bench.version, complete=all(r["complete"] for _, r in per_model), counts=counts,
            aggregate=stats, runs=[run_entry(r, slug) for slug, r in per_model], environment=first["environment"],
            anomalies=first["anomalies"], warnings=[w for _, r in per_model for w in r["warnings"]], out=str(top.path))
