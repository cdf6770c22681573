"""The distributed engine: Accelerate wraps the networks and optimizers; recipes see a `Step`.

The engine knows processes, devices, mixed precision and gradient synchronisation; it does not
know which GAN it runs. Recipes call `update(name, loss)` and `frozen(name)`, and the engine maps
them onto DDP (or a single process) following the rules in DESIGN.md: BatchNorm buffers are not
broadcast (D sees real and fake batches in separate forwards), and a frozen network's forward
runs under `no_sync` so its reducer never waits for gradients that will not come.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
from torch import nn

from trainer.config import TrainConfig


class Engine:
    """One training job's processes: owns the Accelerator, the wrapped nets and optimizers."""

    def __init__(self, cfg: TrainConfig):
        cpu = cfg.cpu or not torch.cuda.is_available()
        handlers: list[Any] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched as several CPU processes
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=handlers)
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.data: Iterator[dict[str, torch.Tensor]] | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, nets: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        names = list(nets)
        wrapped = self.accelerator.prepare(*(nets[n] for n in names), *(optimizers[n] for n in names))
        self.nets = dict(zip(names, wrapped[: len(names)]))
        self.optimizers = dict(zip(names, wrapped[len(names) :]))

    def unwrapped(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.nets[name])

    # -- the Step interface recipes use -------------------------------------------------------

    def batch(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in next(self.data).items()}

    def noise(self, n: int, dim: int) -> torch.Tensor:
        return torch.randn(n, dim, device=self.device)

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Backward through `loss` and step `name`'s optimizer (gradients of other nets untouched)."""
        optimizer = self.optimizers[name]
        self.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def frozen(self, name: str) -> Iterator[None]:
        """Use `name` inside another network's update: no grads for it, no DDP sync of it."""
        net = self.nets[name]
        params = [p for p in net.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            with ExitStack() as stack:
                if self.accelerator.distributed_type != DistributedType.NO:
                    stack.enter_context(self.accelerator.no_sync(net))
                yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- checkpoint state ---------------------------------------------------------------------

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.unwrapped(name).state_dict() for name in self.nets}

    def load_weights(self, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, state in weights.items():
            self.unwrapped(name).load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, opt_state in state["optimizers"].items():
            self.optimizers[name].load_state_dict(opt_state)
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """End cleanly: a barrier, then tear the process group down (DESIGN.md rule 9)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
