"""`gannet sample`: images from a run's latest checkpoint, on one process, no engine needed."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from models.recipes import get_recipe
from trainer.checkpoint import latest_checkpoint
from trainer.config import config_from_dict
from trainer.errors import GannetError
from trainer.images import save_grid
from safetensors.torch import load_file


def sample_grid(run_dir: Path, out: Path, *, n: int, seed: int) -> Path:
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise GannetError(f"{run_dir} is not a gannet run directory (no config.yaml)")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise GannetError(f"{run_dir} has no checkpoint yet")
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    recipe = get_recipe(cfg.recipe.name)(cfg.recipe, cfg)
    nets = recipe.build()
    for name, net in nets.items():
        net.load_state_dict(load_file(str(ckpt / f"{name}.safetensors")))
        net.eval()
    with torch.no_grad():
        images = recipe.generate(nets, recipe.fixed_inputs(n, torch.Generator().manual_seed(seed)))
    return save_grid(images, out)
