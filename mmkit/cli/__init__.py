"""The ``mmkit`` command: a thin typer root that mounts one app per subcommand.

Importing this package must not import torch: subcommand modules import heavy code inside
their command functions. A :class:`~mmkit.errors.MmkitError` becomes one ``error:`` line on
stderr and exit code 2; any other exception is a bug (traceback, exit code 1).
"""

from __future__ import annotations

from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from mmkit import __version__
from mmkit.errors import EXIT_USER_ERROR, MmkitError

#: Subcommand apps, ``(name, "module:attr")``, mounted in this order. Each app's help names
#: what it does in one line and shows an example.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("distill", "mmkit.cli.distill:app"),
    ("prune-data", "mmkit.cli.prune:app"),
    ("cluster-instructions", "mmkit.cli.cluster:app"),
    ("evaluate", "mmkit.cli.evaluate:app"),
    ("build-dataset", "mmkit.cli.build:app"),
    ("unlearn", "mmkit.cli.unlearn:app"),
]


class MmkitGroup(TyperGroup):
    """Root group: user mistakes print one line and exit 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MmkitError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USER_ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmkit {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """The root app with every built subcommand mounted."""
    from mmkit.registry import import_string

    app = typer.Typer(
        cls=MmkitGroup,
        name="mmkit",
        help="Efficient multimodal and language-model methods from one command line.\n\n"
        "Every command writes into --out DIR (config.yaml, results.json, log.txt) and resumes "
        "when DIR exists; --json prints results.json for jq.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def root(
        version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                        help="Print the version and exit.")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info lines.")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug log lines.")] = False,
        plugin: Annotated[Optional[list[str]], typer.Option(
            "--plugin", help="Import a module that registers methods, benchmarks or model kinds.")] = None,
    ) -> None:
        from mmkit.progress import set_quiet, setup_logging
        from mmkit.registry import load_plugins

        set_quiet(quiet)
        setup_logging(verbose)
        load_plugins(plugin or [])

    for name, target in SUBCOMMANDS:
        app.add_typer(import_string(target), name=name)
    return app


app = build_app()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="mmkit")
