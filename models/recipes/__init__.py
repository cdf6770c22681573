"""Recipe registry: `recipe.name` in a config picks the registered recipe that defines the GAN.

Recipes are discovered: every module in this package is imported the first time a recipe is
looked up, and a module registers its recipe with `@register`. Adding a GAN is one module here
plus one YAML in configs/; no list is edited anywhere (docs/architecture.md walks through one).
The contract a recipe implements is `gannet.models.recipes.base.Recipe`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from gannet.trainer.errors import ConfigError

if TYPE_CHECKING:
    from gannet.models.recipes.base import Examples, Recipe
    from gannet.trainer.config.schema import Config

RECIPES: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make `cls` selectable as `recipe.name: <cls.Params.name>`."""
    from gannet.models.recipes.base import Recipe, RecipeParams

    if not (isinstance(cls, type) and issubclass(cls, Recipe) and issubclass(cls.Params, RecipeParams)):
        raise TypeError(f"{cls!r}: a registered recipe subclasses gannet.models.recipes.base.Recipe, with Params a RecipeParams")
    name = cls.Params.name
    if not name or (name in RECIPES and RECIPES[name] is not cls):
        raise TypeError(f"{cls.__name__}: recipe name {name!r} is empty or already taken by {RECIPES.get(name)!r}")
    RECIPES[name] = cls
    return cls


def discover() -> dict[str, type[Recipe]]:
    """Import every module of this package (each registers its recipes); the registry, by name."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return RECIPES


def get_recipe(name: str) -> type[Recipe]:
    recipes = discover()
    if name not in recipes:
        raise ConfigError(f"recipe.name={name!r} is not a known recipe (choose one of: {', '.join(sorted(recipes))})")
    return recipes[name]


def make_recipe(cfg: Config, examples: Examples | None = None) -> Recipe:
    """The recipe `cfg.recipe` names, with its typed params; `examples` is the run's data."""
    return get_recipe(cfg.recipe.name)(cfg.recipe, cfg, examples)
