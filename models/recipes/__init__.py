"""Recipe registry: `recipe.name` in a config picks the module that defines the GAN.

A recipe builds its networks, says how one training iteration updates them, and keeps any
state of its own (e.g. an image pool); it never touches devices, process groups or files.
Adding a GAN variant = one module here (decorated with `@register`) + one YAML in configs/.
"""

from __future__ import annotations

import importlib

from trainer.errors import ConfigError

RECIPES: dict[str, type] = {}
_MODULES = ("models.recipes.gan", "models.recipes.lsgan", "models.recipes.cgan", "models.recipes.t2i", "models.recipes.cyclegan")


def register(cls: type) -> type:
    RECIPES[cls.Params.name] = cls
    return cls


def get_recipe(name: str) -> type:
    for module in _MODULES:
        importlib.import_module(module)
    if name not in RECIPES:
        raise ConfigError(f"recipe.name={name!r} is not a known recipe (choose one of: {', '.join(sorted(RECIPES))})")
    return RECIPES[name]
