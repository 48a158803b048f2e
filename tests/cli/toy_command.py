"""A small command built only from the core, as a real subcommand is: config -> run dir ->
records -> model -> results. Tests mount it on the root app to drive the error paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Optional

import typer  # noqa: F401  (Annotated options)


@dataclass
class ToyModel:
    path: str = ""
    kind: str = "encoder"


@dataclass
class ToyConfig:
    data: str = ""
    text_field: str = "text"
    batch_size: int = 4
    model: ToyModel = field(default_factory=ToyModel)


def toy(
    data: str,
    model: Annotated[Optional[str], typer.Option()] = None,
    out: Annotated[Optional[str], typer.Option()] = None,
    config: Annotated[Optional[str], typer.Option("--config")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set")] = None,
    overwrite: bool = False,
) -> None:
    from mmkit.config import load_config
    from mmkit.core.models import load_model
    from mmkit.io import fingerprint, read_records, start_run, write_results

    cfg = load_config(ToyConfig, file=config, flags={"data": data, "model.path": model}, sets=set_ or [])
    records = list(read_records(cfg.data, fields={"text": cfg.text_field}, required=["text"]))
    loaded = load_model(cfg.model.path, cfg.model.kind, device="cpu")
    run = start_run(out, "toy", cfg, overwrite=overwrite)
    write_results(run, method="toy", config={"data": cfg.data}, metrics={"n": len(records)},
                  models={"model": loaded.record()}, data=fingerprint(cfg.data, len(records)))


def mounted():
    from mmkit.cli import build_app

    root = build_app()
    root.command(name="toy", help="Count records and load a model. Example: mmkit toy DATA --model M")(toy)
    return root
