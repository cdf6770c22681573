"""R3GAN (Huang, Gokaslan, Kuleshov, Tompkin, NeurIPS 2024): the regularised relativistic GAN.

The game is RpGAN's: D scores each real image against a fake drawn beside it, and both players
use the paired difference,

    D: softplus(-(D(x) - D(G(z)))),    G: softplus(-(D(G(z)) - D(x))),

with zero-centred gradient penalties on both sides, gamma/2 (R1 + R2): R1 = E ||grad D(x)||^2 on
real images, R2 = E ||grad D(G(z))||^2 on fakes. The paper proves local convergence for this pair
(R1 alone leaves RpGAN's fakes free to oscillate around the data), and without mode dropping: a
fake far from every real image still gets a gradient through the pairing. gamma, the learning
rate, Adam's beta2, the EMA half-life and the augmentation probability follow one cosine over the
images G has learned from (`schedule_kimg`; gannet.models.schedules); lr and beta2 are the
engine's (`optim.*.schedule: cosine`), the rest is here.

`loss: nonsaturating` and `penalty: r1` are the paper's ablations on the same networks. Each G
step draws its own real batch (the official code's second batch per step), since G's loss reads
D on real images too. `r3gan_cond` is the class-conditional recipe (model: r3gan_cond networks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gannet.models import augment, penalties
from gannet.models import r3gan as r3gan_nets  # registers the r3gan networks
from gannet.models.conditional import ConcatDiscriminator, LabelGenerator, ProjectionDiscriminator
from gannet.models.recipes import register
from gannet.models.recipes.base import AdversarialParams, AdversarialRecipe, Examples, Step
from gannet.models.recipes.cgan import check_networks
from gannet.models.schedules import cosine_decay_with_warmup
from gannet.trainer.config.schema import Config
from gannet.trainer.errors import ConfigError, DataError


@dataclass
class R3GANParams(AdversarialParams):
    name: ClassVar[str] = "r3gan"
    loss: Literal["relativistic", "nonsaturating"] = "relativistic"  # nonsaturating: the paper's ablation
    penalty: Literal["r1+r2", "r1"] = "r1+r2"  # gamma/2 (R1 + R2), or R1 alone (the ablation)
    gamma: float = 0.05  # penalty weight at the start (the CIFAR-10 preset) ...
    gamma_final: float = 0.005  # ... and after schedule_kimg
    # The cosine's length in thousands of images G learns from (G steps x global batch): gamma from
    # `gamma` to gamma_final, the EMA half-life from 0 to ema_kimg, and with augment=ada and
    # augment_p > 0, ADA's p from 0 to augment_p (the official presets; 0 = ADA's own feedback).
    schedule_kimg: float = 20000.0  # the cosine's length (thousands of images) for gamma, the EMA half-life and ADA's p
    augment_p: float = 0.0  # augment=ada: ADA's p at the cosine's end (0 = ADA's own feedback)
    ema_rampup: float = 0.0  # must stay 0: the half-life's cosine from 0 is R3GAN's ramp-up
    r1_every: int = 1  # lazy: R1 + R2 on every r1_every-th D step, weight x r1_every (StyleGAN2); 1 = every step, as R3GAN

    def validate(self) -> None:
        super().validate()
        if min(self.gamma, self.gamma_final, self.augment_p) < 0 or self.schedule_kimg <= 0 or self.augment_p > 1:
            raise ConfigError(f"recipe.gamma={self.gamma}, gamma_final={self.gamma_final} must be >= 0, schedule_kimg="
                              f"{self.schedule_kimg} > 0 and augment_p={self.augment_p} in [0, 1]")
        if self.r1_gamma or self.gp_weight or self.ema_rampup or self.topk < 1:
            raise ConfigError(f"recipe.name={self.name} penalises through recipe.gamma (R1 + R2) and ramps its EMA by "
                              "the cosine schedule: leave r1_gamma, gp_weight and ema_rampup at 0 and topk at 1")
        if self.augment_p and self.augment != "ada":
            raise ConfigError(f"recipe.augment_p={self.augment_p} schedules ADA's p: it needs recipe.augment=ada")

    @property
    def batches_per_step(self) -> int:
        return self.d_steps + 1  # G's step reads a real batch of its own

    @property
    def double_backward(self) -> tuple[str, ...]:
        return ("D",) if self.gamma > 0 or self.gamma_final > 0 else ()


@register
class R3GAN(AdversarialRecipe):
    Params = R3GANParams

    def __init__(self, params: R3GANParams, cfg: Config, examples: Examples | None = None):
        super().__init__(params, cfg, examples)
        self.images = 0  # images G has learned from: where the schedules stand (checkpointed)
        self.last_penalty: dict[str, float] = {}  # reported on the lazy steps between penalties (r1_every > 1)

    def build(self) -> dict[str, nn.Module]:
        nets = super().build()
        if self.condition != "label" and isinstance(nets["G"], r3gan_nets.R3GANCondGenerator):
            raise ConfigError("model.generator=r3gan_cond draws from class labels: use recipe.name=r3gan_cond")
        return nets

    # -- the schedules ------------------------------------------------------------------------------

    def scheduled(self, base: float, final: float) -> float:
        """A hyper-parameter's value now: the cosine from `base` to `final` over schedule_kimg."""
        return cosine_decay_with_warmup(self.images, base, final, self.params.schedule_kimg * 1000)

    def gamma(self) -> float:
        return self.scheduled(self.params.gamma, self.params.gamma_final)

    def ema_beta(self, batch: int) -> float:
        """The official EMA: half-life (in images) from 0 to ema_kimg on the cosine, beta = 0.5 ** (batch / half-life)."""
        return 0.5 ** (batch / max(self.scheduled(0.0, self.params.ema_kimg * 1000), 1e-8))

    def scheduled_p(self) -> bool:
        return self.params.augment == "ada" and self.params.augment_p > 0

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheduled_p():
            return augment.ada_augment(x, self.scheduled(0.0, self.params.augment_p))
        return super().augmented(x)

    def tune_ada(self, step: Step, batch: int) -> None:
        if not self.scheduled_p():  # a scheduled p needs no feedback (nor its collective)
            super().tune_ada(step, batch)

    # -- the game ----------------------------------------------------------------------------------

    def d_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> torch.Tensor:
        if self.params.loss == "relativistic":  # each real against the fake beside it
            return F.softplus(fake_out - real_out).mean()
        return (F.softplus(-real_out) + F.softplus(fake_out)).mean()

    def g_loss(self, fake_out: torch.Tensor, real_out: torch.Tensor | None = None) -> torch.Tensor:
        if self.params.loss == "relativistic":
            return F.softplus(real_out - fake_out).mean()
        return F.softplus(-fake_out).mean()

    def g_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss on fresh noise against a fresh real batch (its conditions too), through the frozen D."""
        batch = step.batch()
        G, D, cond = step.nets["G"], step.nets["D"], self.conditions(batch)
        real = batch["image"]
        fake_out = self.discriminate(D, G(step.noise(real.shape[0], self.cfg.model.z_dim), *cond), *cond).float()
        if self.params.loss != "relativistic":
            return self.g_loss(fake_out), {}
        with torch.no_grad():  # a constant for G: D(x) only shifts each pair's logit
            real_out = self.discriminate(D, real, *cond).float()
        return self.g_loss(fake_out, real_out), {}

    def d_penalty(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                  cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """gamma/2 (R1 + R2): one forward over reals and fakes together, the squared input-gradient
        norms split back into R1 (reals) and R2 (fakes)."""
        total, stats = super().d_penalty(D, real, fake, cond)
        gamma, n = self.gamma(), real.shape[0]
        if gamma <= 0 or not self.lazy_r1():
            return total, {**stats, **{k: torch.tensor(v, device=real.device) for k, v in self.last_penalty.items()}}
        both = self.params.penalty == "r1+r2"
        x, c = (torch.cat([real, fake]), tuple(torch.cat([t, t]) for t in cond)) if both else (real, cond)
        norms = penalties.squared_grad_norms(lambda y, *k: self.discriminate(D, y, *k), x, *c)
        r1 = norms[:n].mean()
        stats.update(r1=r1.detach(), gamma=torch.tensor(gamma, device=real.device))
        if both:
            r2 = norms[n:].mean()
            stats["r2"] = r2.detach()
        term = 0.5 * gamma * self.params.r1_every * (r1 + r2 if both else r1)
        self.last_penalty = {k: stats[k].item() for k in ("r1", "r2", "gamma") if k in stats}
        return term if total is None else total + term, stats

    def d_outputs(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Relativistic: D(x) is the probability D ranks a real above its paired fake, sigmoid(D(x) - D(G(z)))
        (0.5 at equilibrium; raw scores drift by a constant the loss never sees); ADA counts that
        ranking. The non-saturating ablation reports as the GAN does."""
        if self.params.loss != "relativistic":
            stats = super().d_outputs(real_out, fake_out)
        else:
            gap = (real_out - fake_out).detach()
            stats = {"d_real": torch.sigmoid(gap).mean(), "d_fake": torch.sigmoid(-gap).mean(), "logit_gap": gap.mean(),
                     "d_real_outputs": real_out.detach().flatten(), "d_fake_outputs": fake_out.detach().flatten()}
            if self.params.augment == "ada" and not self.scheduled_p():
                self.ada.observe(gap, 0.0)
        if self.params.augment == "ada":
            p = self.scheduled(0.0, self.params.augment_p) if self.scheduled_p() else self.ada.p
            stats["ada_p"] = torch.tensor(p, device=real_out.device)
        return stats

    def d_stat(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out).mean()  # the non-saturating ablation: D's probability

    def equilibrium(self) -> dict[str, float]:
        loss = math.log(2) if self.params.loss == "relativistic" else 2 * math.log(2)  # softplus(0) per term
        return {"loss_d": loss, "d_real": 0.5, "d_fake": 0.5, "separation": 1.0}

    def iteration(self, step: Step) -> dict[str, torch.Tensor]:
        """The adversarial iteration at the schedules' current values; then the images move on."""
        half_life = self.scheduled(0.0, self.params.ema_kimg)
        metrics = super().iteration(step)
        self.images += self.images_per_g_step(step)
        return {**metrics, "ema_half_life_kimg": torch.tensor(half_life)} if "G_ema" in step.nets else metrics

    def generate(self, nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return super().generate(nets, inputs).clamp(-1, 1)  # G has no tanh: pixels outside the range are clipped

    def state_dict(self) -> dict:
        return {**super().state_dict(), "images": self.images, "last_penalty": dict(self.last_penalty)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state:
            self.images, self.last_penalty = state["images"], dict(state["last_penalty"])


@dataclass
class R3GANCondParams(R3GANParams):
    name: ClassVar[str] = "r3gan_cond"


@register
class R3GANCond(R3GAN):
    """Class-conditional R3GAN: G(z, y) with a class embedding beside z, D(x, y) projected on one;
    fakes in D's step carry the real batch's classes, as in the official code."""

    Params = R3GANCondParams
    condition = "label"

    def build(self) -> dict[str, nn.Module]:
        nets = super().build()
        check_networks("r3gan_cond", nets, (r3gan_nets.R3GANCondGenerator, LabelGenerator),
                       (r3gan_nets.R3GANCondDiscriminator, ProjectionDiscriminator, ConcatDiscriminator))
        return nets

    def conditions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        label, classes = inputs["label"], self.cfg.model.num_classes
        if label.min() < 0 or label.max() >= classes:
            raise DataError(f"r3gan_cond needs class labels in [0, model.num_classes={classes}) in every sample "
                            f"(the .cls field); got labels {label.min().item()}..{label.max().item()}")
        return (label,)

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Noise plus classes in turn: grids and evaluations cover every class."""
        return {**super().fixed_inputs(n, generator), "label": torch.arange(n) % self.cfg.model.num_classes}

    def captions(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        return [f"class {int(y)}" for y in inputs["label"]]
