"""``mmkit unlearn``: parse, build a config, call mmkit.unlearn, render the result."""

from __future__ import annotations

import typer

app = typer.Typer(help="EFUF: fine-grained unlearning of object hallucinations in multimodal LLMs.",
                  no_args_is_help=True, rich_markup_mode=None)
