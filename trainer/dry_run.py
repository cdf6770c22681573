"""`gannet train CONFIG --dry-run`: what a run would be, without starting or creating anything.

The resolved config as YAML (it loads back as a config file: `gannet train run.yaml`), then, as
comments, what each `auto` setting chooses on this machine, where the run would go (a new run, a
resume, or the refusal `gannet train` would stop with) and whether its shards are there. The choices
come from the code the run itself uses (gannet.trainer.engine.fast on the recipe's networks, built
on PyTorch's meta device: shapes only, no memory, no weights), so the dry run says what the run's
log will say. Nothing is written, no process group or loader starts, remote shards are not read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from gannet.models.recipes import make_recipe
from gannet.trainer.config.loader import config_to_dict
from gannet.trainer.config.schema import Config
from gannet.trainer.data import remote
from gannet.trainer.data.stream import expand_urls
from gannet.trainer.engine import fast
from gannet.trainer.errors import ConfigError
from gannet.trainer.tracking.tracker import shows_bar


def dry_run(cfg: Config) -> str:
    """The report: YAML, then `#` lines. Raises the ConfigError `gannet train` would stop with."""
    from gannet.trainer.loop import resume_point  # the run's own rule: refuses what train refuses

    checkpoint = resume_point(cfg)
    lines = [f"# gannet train --dry-run: {cfg.name}; nothing was created or started", "",
             yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), ""]
    lines += [f"# {line}" for line in [*speed_lines(cfg), *run_lines(cfg, checkpoint)]]
    return "\n".join(lines)


def speed_lines(cfg: Config) -> list[str]:
    """The speed settings as the run resolves and logs them, with each reason."""
    device = "cpu" if cfg.train.cpu or not torch.cuda.is_available() else "cuda"
    choices = fast.resolve(cfg, device)
    recipe = make_recipe(cfg, None)
    with torch.device("meta"):
        nets = recipe.build()
    for name in recipe.optimized:
        fast.prepare_network(name, nets[name], choices, cfg)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    layout = ", ".join(f"{name} {'channels_last' if on else 'contiguous'}" for name, on in choices.channels_last.items())
    return [f"on this machine ({where}), the speed settings resolve to:",
            f"  mixed_precision={choices.mixed_precision}, compile={'on' if choices.compile else 'off'}, "
            f"adam={choices.adam}, layout: {layout}",
            *(f"    {key}: {why}" for key, why in choices.why.items()),
            f"  log.progress={cfg.log.progress}: {'a progress bar' if shows_bar(cfg.log.progress) else 'a line per log step'}"
            " (a bar on a terminal)"]


def run_lines(cfg: Config, checkpoint: Path | None) -> list[str]:
    """Where the run goes, how much each step takes in, and whether its data is there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = (f"resumes {cfg.run_path} from {checkpoint.name}" if checkpoint is not None
             else f"a new run in {cfg.run_path}")
    lines = [f"run: {where}, {cfg.train.steps} generator steps on {world} process(es), "
             f"{cfg.images_per_step(world)} real images per step"]
    for key, pattern in (("data.shards", cfg.data.shards), ("data.shards_b", cfg.data.shards_b)):
        if pattern:
            lines.append(f"{key}: {shard_status(pattern)}")
    return lines


def shard_status(pattern: str) -> str:
    """Local shards counted; remote ones are not read here (training checks them before it starts)."""
    if any(remote.is_remote(part.strip()) for part in pattern.split(",")):
        return f"{pattern} (remote: checked when training starts)"
    try:
        return f"{len(expand_urls(pattern))} shard(s) found"
    except ConfigError as exc:
        return f"none found here: {str(exc).removeprefix('data.shards: ')}"
