"""Pieces every subcommand's CLI shares: option types, a default-command group, result output."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Callable, Mapping, Optional

import click
import typer
from typer.core import TyperGroup

ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="YAML config; flags and --set override it.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set a.b=value.")]
OutOpt = Annotated[Optional[str], typer.Option("--out", help="Run directory (default runs/<command>-<time>).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Restart the run in --out instead of resuming.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for every random choice.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results.json to stdout (for jq).")]


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument is a subcommand only when it names one exactly; anything
    else runs the default command (``mmkit prune-data imagenet ...`` means ``... run imagenet``)."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def print_results(results: Mapping[str, Any]) -> None:
    """``--json``: the results as one JSON document on stdout."""
    sys.stdout.write(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def finish(results: Mapping[str, Any], json_: bool, render: Callable[[Mapping[str, Any]], None] | None = None) -> None:
    """After a command: its summary on stderr (unless ``-q``), then ``results.json`` for ``--json``.
    Empty results (a non-zero rank of a multi-process launch; rank 0 reports) print nothing."""
    from mmkit.progress import is_quiet

    if not results:
        return
    if render is not None and not is_quiet():
        render(results)
    if json_:
        print_results(results)
