"""What a recipe sees of the engine, and the adversarial iteration most GANs share.

`Step` is the whole interface between a recipe and the distributed engine: the wrapped networks,
a fresh real batch, noise, `update` (backward + optimizer step, however the engine does it), and
`frozen` (a network used inside another network's update, with no gradient of its own).
`update` is called once per micro-batch with the plain loss; the engine scales it for gradient
accumulation and steps the optimizer on the last micro-batch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Protocol

import torch
from torch import nn

from models import networks
from trainer.config import Config
from trainer.errors import ConfigError


class Step(Protocol):
    nets: Mapping[str, nn.Module]
    accumulation: int  # micro-batches per optimizer step: call `update` this many times per step

    def batch(self) -> dict[str, torch.Tensor]: ...

    def noise(self, n: int, dim: int) -> torch.Tensor: ...

    def update(self, name: str, loss: torch.Tensor) -> None: ...

    def frozen(self, name: str) -> AbstractContextManager: ...


@dataclass
class AdversarialParams:
    name: ClassVar[str] = ""
    d_steps: int = 1  # k discriminator steps per generator step (Goodfellow et al., Algorithm 1)

    def validate(self) -> None:
        if self.d_steps < 1:
            raise ConfigError(f"recipe.d_steps={self.d_steps} must be >= 1")


class AdversarialRecipe:
    """One generator G(z) against one discriminator D(x), trained by Algorithm 1 of the GAN paper.

    Each iteration: k times, a real minibatch and a noise minibatch update D; then a fresh noise
    minibatch updates G through a frozen D. Subclasses supply the losses (and, for conditional
    GANs, the conditions or whole objectives), so the minimax GAN, the non-saturating GAN, LSGAN,
    the conditional GAN and the text-to-image GAN share one, tested, update order.
    """

    Params: ClassVar[type] = AdversarialParams
    condition: ClassVar[str] = ""  # what G is conditioned on besides z: "", "label" or "text"

    def __init__(self, params: AdversarialParams, cfg: Config):
        self.params = params
        self.cfg = cfg

    def build(self) -> dict[str, nn.Module]:
        model, data = self.cfg.model, self.cfg.data
        return {
            "G": networks.build(networks.GENERATORS, model.generator, model, data),
            "D": networks.build(networks.DISCRIMINATORS, model.discriminator, model, data),
        }

    def d_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_loss(self, fake_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def equilibrium(self) -> dict[str, float]:
        """Where the game settles when G matches the data (D can no longer tell), and `separation`:
        the largest gap between D(x) and D(G(z)) a perfect discriminator reaches."""
        raise NotImplementedError

    def d_stat(self, out: torch.Tensor) -> torch.Tensor:
        """What the dashboards call D(x): a probability for the GAN, the raw score for LSGAN."""
        return out.mean()

    def conditions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What G and D see besides z and the image: nothing here; class labels for the conditional
        GAN. `inputs` is a training batch or a set of sampling inputs: both carry the same fields."""
        del inputs
        return ()

    def d_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on one real batch and as many fresh fakes, and the D outputs the dashboards show."""
        G, D, cond = step.nets["G"], step.nets["D"], self.conditions(batch)
        real = batch["image"]
        with torch.no_grad():
            fake = G(step.noise(real.shape[0], self.cfg.model.z_dim), *cond)
        real_out, fake_out = D(real, *cond).float(), D(fake, *cond).float()  # losses in fp32 under bf16/fp16
        return self.d_loss(real_out, fake_out), self.d_outputs(real_out, fake_out)

    def d_outputs(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """D(x) and D(G(z)) for the dashboards: the statistics, and the raw outputs as histograms."""
        real_out, fake_out = real_out.detach(), fake_out.detach()
        return {"d_real": self.d_stat(real_out), "d_fake": self.d_stat(fake_out),
                "d_real_outputs": real_out.flatten(), "d_fake_outputs": fake_out.flatten()}

    def g_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss through the (frozen) D, on fresh noise with the batch's conditions."""
        G, D, cond = step.nets["G"], step.nets["D"], self.conditions(batch)
        gen_out = D(G(step.noise(batch["image"].shape[0], self.cfg.model.z_dim), *cond), *cond).float()
        return self.g_loss(gen_out), {}

    def iteration(self, step: Step) -> dict[str, torch.Tensor]:
        """One generator step (after k D-steps). Returns what the dashboards show, by convention for
        every recipe: scalar tensors are averaged over ranks and logged as `train/<key>`; tensors with
        a batch dimension (here D's raw outputs) are rank 0's values, shown as W&B histograms."""
        for _ in range(self.params.d_steps):
            for _ in range(step.accumulation):  # micro-batches; the engine steps on the last one
                batch = step.batch()
                loss_d, d_stats = self.d_objective(step, batch)
                step.update("D", loss_d)
        with step.frozen("D"):
            for _ in range(step.accumulation):
                loss_g, g_stats = self.g_objective(step, batch)
                step.update("G", loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **d_stats, **g_stats}

    def fixed_inputs(self, n: int, generator: torch.Generator,
                     examples: Callable[[int], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """The inputs behind every sample grid of a run: drawn once from the run's seed. `examples(n)`
        reads n real images of the run's data (keys as in a batch), for recipes whose inputs are
        images; the loop passes it, noise-driven recipes never call it."""
        return {"z": torch.randn(n, self.cfg.model.z_dim, generator=generator)}

    def generate(self, nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return nets["G"](inputs["z"], *self.conditions(inputs))

    def captions(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        """What each sample of `inputs` was asked to show, in words (none for unconditional GANs):
        the prompts table beside the sample grid."""
        del inputs
        return []

    def state_dict(self) -> dict:
        """This rank's recipe state beyond the networks (none here; CycleGAN's image pools, say).
        Checkpoints keep it per rank: each rank's pools hold its own past fakes."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state
