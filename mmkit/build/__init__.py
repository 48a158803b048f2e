"""``mmkit build-dataset`` recipes: a registry of name -> ``"module:attr"`` (build.md §1).

Each recipe module exposes a config dataclass and ``run(cfg, out, overwrite) -> dict`` (the
manifest it wrote); ``mmkit/cli/build.py`` only wires typer. Plugins register their own recipes
with ``RECIPES.register("name", "module:attr")``.
"""

from __future__ import annotations

from mmkit.registry import Registry

RECIPES: Registry = Registry("recipe")
RECIPES.register("condense", "mmkit.build.condense:RECIPE")
RECIPES.register("ambiguous-mmt", "mmkit.build.ambiguous_mmt:RECIPE")
RECIPES.register("snare", "mmkit.build.snare:RECIPE")
RECIPES.register("mmr", "mmkit.build.mmr:RECIPE")
RECIPES.register("realbench", "mmkit.build.realbench:RECIPE")
