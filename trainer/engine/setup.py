"""One assembly of a training job from a config: engine, recipe, networks, optimizers, LR schedules.

The loop, the bench and the tests' harness all build through `setup`, so they train the same thing
(the same initial weights on every rank, each network's own `optim.g` / `optim.d` settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gannet.models.recipes import make_recipe
from gannet.models.recipes.base import Examples, Recipe
from gannet.trainer.config.schema import Config, OptimConfig
from gannet.trainer.engine import fast
from gannet.trainer.engine.distributed import Engine, make_engine


def lr_factor(opt: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Constant, or constant until `decay_from` and then linear to zero at the last step."""
    if opt.schedule == "constant":
        return lambda step: 1.0
    span = total_steps - opt.decay_from
    return lambda step: 1.0 - max(0, step - opt.decay_from) / span


@dataclass
class Job:
    """What `setup` built: the engine (holding the wrapped networks and optimizers), the recipe,
    and one LR scheduler per optimised network, stepped once per generator step."""

    engine: Engine
    recipe: Recipe
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]

    def close(self) -> None:
        """The end of the job (every rank): the schedules let go of the optimizers, then the engine
        leaves the process groups cleanly (gannet.trainer.engine.distributed.Engine.close)."""
        self.schedulers.clear()
        self.engine.close()


def setup(cfg: Config, examples: Examples | None = None) -> Job:
    """Start the engine (processes, device), then build the recipe's networks from the run's seed
    (identical on every rank), an Adam per network the recipe optimises (fused or foreach as
    `train.adam` resolves: gannet.trainer.engine.fast), and their schedules."""
    engine = make_engine(cfg)
    torch.manual_seed(cfg.seed)
    recipe = make_recipe(cfg, examples)
    nets = recipe.build()
    optimizers = {}
    for name in recipe.optimized:
        opt = engine.optim_config(name)
        optimizers[name] = torch.optim.Adam(nets[name].parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay,
                                            **fast.adam_kwargs(engine.fast.adam))
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(engine.optim_config(name), cfg.train.steps))
                  for name, optimizer in optimizers.items()}
    engine.prepare(nets, optimizers)
    return Job(engine, recipe, schedulers)
