"""Opening a finished (or running) run directory on one process: `gannet sample`, `gannet eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from models.recipes import get_recipe
from trainer.checkpoint import list_checkpoints
from trainer.config import Config, config_from_dict
from trainer.errors import GannetError
from trainer.images import save_grid


def open_run(run_dir: Path, eval_overrides: dict[str, Any] | None = None) -> tuple[Config, Any, dict[int, Path]]:
    """The run's saved config (eval settings optionally overridden), its recipe, and its kept
    checkpoints by step."""
    config_file = run_dir / "config.yaml"
    kept = {int(p.name.split("-")[1]): p for p in list_checkpoints(run_dir)}
    if not config_file.is_file() or not kept:
        raise GannetError(f"{run_dir} is not a gannet run directory with a checkpoint")
    raw = yaml.safe_load(config_file.read_text())
    raw.setdefault("eval", {}).update(eval_overrides or {})
    cfg = config_from_dict(raw)
    return cfg, get_recipe(cfg.recipe.name)(cfg.recipe, cfg), kept


def load_networks(recipe: Any, checkpoint: Path) -> dict[str, nn.Module]:
    """The recipe's networks with a checkpoint's weights, in eval mode."""
    nets = recipe.build()
    for name, net in nets.items():
        net.load_state_dict(load_file(str(checkpoint / f"{name}.safetensors")))
        net.eval()
    return nets


def sample_grid(run_dir: Path, out: Path, *, n: int, seed: int) -> Path:
    _, recipe, kept = open_run(run_dir)
    nets = load_networks(recipe, kept[max(kept)])
    with torch.no_grad():
        images = recipe.generate(nets, recipe.fixed_inputs(n, torch.Generator().manual_seed(seed)))
    return save_grid(images, out)
