"""``mmkit build-dataset``: parse, build a recipe config, call the recipe, render its manifest."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Build datasets: condense (Bunny), ambiguous-mmt (3AM), snare probes, mmr pairs, realbench samples.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

# <!-- commands: recipes -->

# <!-- commands: condense -->
