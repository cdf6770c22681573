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
from gannet.models.schedules import cosine_decay_with_warmup
from gannet.trainer.config.schema import Config, OptimConfig
from gannet.trainer.engine import fast
from gannet.trainer.engine.distributed import Engine, make_engine


def lr_factor(opt: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Constant, or constant until `decay_from` and then linear to zero at the last step."""
    if opt.schedule == "constant":
        return lambda step: 1.0
    span = total_steps - opt.decay_from
    return lambda step: 1.0 - max(0, step - opt.decay_from) / span


class CosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    """`schedule: cosine` (R3GAN): lr and Adam's beta2 as functions of the images G has learned from
    (G steps x `images_per_step`), each a cosine from its base to its final value (lr after a linear
    warm-up). Stepped once per G step like every LR schedule; its position is `last_epoch`, so a
    resumed run continues both, and rollback's scaling of `base_lrs` scales the whole lr curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, opt: OptimConfig, images_per_step: int):
        self.images_per_step, self.lr, self.lr_final = images_per_step, opt.lr, opt.lr_final
        self.beta2, self.beta2_final = opt.betas[1], opt.beta2_final or opt.betas[1]
        self.total, self.warmup = opt.decay_kimg * 1000, opt.warmup_kimg * 1000
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """lr / base lr after `step` G steps."""
        return cosine_decay_with_warmup(step * self.images_per_step, self.lr, self.lr_final, self.total, warmup=self.warmup) / self.lr

    def beta2_at(self, step: int) -> float:
        return cosine_decay_with_warmup(step * self.images_per_step, self.beta2, self.beta2_final, self.total)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        for group in self.optimizer.param_groups:
            group["betas"] = (group["betas"][0], self.beta2_at(self.last_epoch))

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "lr_lambdas"}  # a bound method: rebuilt, not saved

    def load_state_dict(self, state_dict: dict) -> None:
        """The position, then lr and beta2 set for it in the optimizer (whatever its own state held)."""
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.base_lrs)})
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            lr = base * self.factor(self.last_epoch)
            group["lr"], group["betas"] = lr, (group["betas"][0], self.beta2_at(self.last_epoch))


def make_schedule(optimizer: torch.optim.Optimizer, opt: OptimConfig, cfg: Config, world: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The network's schedule: cosine over images seen, else constant / linear over G steps."""
    if opt.schedule == "cosine":  # images G learns from per step: the batch on every rank and micro-batch
        return CosineSchedule(optimizer, opt, cfg.data.batch_size * cfg.train.grad_accum * world)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(opt, cfg.train.steps))


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
    schedulers = {name: make_schedule(optimizer, engine.optim_config(name), cfg, engine.world) for name, optimizer in optimizers.items()}
    engine.prepare(nets, optimizers)
    return Job(engine, recipe, schedulers)
