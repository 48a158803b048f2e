"""The contract between generation benchmarks, backends and the evaluation runner (evaluate.md §1-2).

A generation benchmark (``needs = "generate"``) implements::

    config_class: type[EvalConfig]          # its dataclass: EvalConfig plus its own fields
    flags: dict[str, str]                   # extra CLI flags -> config field, e.g. {"--parse-rule": "parse_rule"}
    max_new_tokens: int                     # default generation budget
    load(cfg) -> Loaded                     # read and check --data (DataError naming file/line/field)
    prompt(data, cfg) -> list[Request]      # one request per answer the model must give
    parse(text, request) -> Any             # the ``parsed`` convenience copy (JSON-able)
    score(data, answers, cfg) -> dict       # answers: uid -> prediction line; returns
                                            # {"metrics", "per_category", "anomalies"?, "warnings"?}

and optionally:

- ``uid_of(line, data) -> str | None``: how a predictions-file line names its request when it gives
  no ``uid`` (``data`` is the whole data set, not cut by ``--limit`` or ``unfiltered`` fields);
- ``unfiltered: dict``: config values that select every record (RealBench ``{"tasks": []}``); the
  predictions route loads the data with them (and no ``--limit``) so that lines of records left
  out by those options are ignored rather than reported as extra;
- ``generation_defaults: dict``: the benchmark's decoding where the user set none
  (``GenerationSettings`` fields left None, e.g. CHAIR's ``{"num_beams": 5, "length_penalty": 0.0}``);
- ``score_direct(data, cfg) -> dict | None``: routes that need no generation (SNARE's cosine/ITM
  scores, MMT's ``--hyp/--ref``; ``None`` = use the generation route); its ``predictions`` entry (a
  list of ``{"uid", ...}`` lines) goes to predictions.jsonl, so every route leaves per-sample logs;
- ``per_sample_file: str``: where the runner writes ``score(...)["per_sample"]`` rows (CHAIR's
  ``chair_per_caption.jsonl``).

A benchmark with several scoring routes records the one in use as ``data.route`` (part of
``config_hash``). The runner (``mmkit.evaluate.run``) owns predictions.jsonl, resume,
``config_hash``, results.json and the backends; benchmarks never touch files other than their data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from mmkit.core.backends import BackendConfig, GenerationSettings, Request

__all__ = ["BackendConfig", "EvalConfig", "GenerationSettings", "Loaded", "Request", "option_default"]


@dataclass
class EvalConfig:
    """Options every generation benchmark shares (evaluate.md §8 "Common options")."""

    data: Optional[str] = None
    backend: BackendConfig = field(default_factory=BackendConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    predictions: Optional[str] = None
    allow_missing: bool = False
    ignore_extra: bool = False
    dump_requests: Optional[str] = None
    limit: Optional[int] = None
    strict: bool = False
    seed: int = 0


@dataclass
class Loaded:
    """A benchmark's checked data: its records, the data provenance and loading anomalies."""

    records: list[Any]
    path: str
    sha256: str
    anomalies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.records)


def option_default(bench: Any, key: str) -> Any:
    """The default of a benchmark's config key as a run uses it (for ``--help``): a ``generation.*``
    key takes the benchmark's ``generation_defaults`` entry before :class:`GenerationSettings`'
    own; ``dataclasses.MISSING`` when the field has only a default factory."""
    section, _, name = key.partition(".")
    if section == "generation" and name:
        return getattr(bench, "generation_defaults", {}).get(name, getattr(GenerationSettings(), name))
    return {f.name: f for f in dataclasses.fields(bench.config_class)}[key].default
