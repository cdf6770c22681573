"""The original GAN (Goodfellow et al. 2014): minimax or non-saturating generator loss.

D minimises the cross-entropy of telling real from fake; we report it averaged over the two
terms, so a discriminator at equilibrium (D = 1/2 everywhere) sits at log 2. The minimax G
minimises log(1 - D(G(z))), whose gradient vanishes while D wins early in training; the
non-saturating G maximises log D(G(z)) instead, same fixed point, strong early gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from models.recipes import register
from models.recipes.base import AdversarialParams, AdversarialRecipe


@dataclass
class GANParams(AdversarialParams):
    name: ClassVar[str] = "gan"
    loss: Literal["nonsaturating", "minimax"] = "nonsaturating"


@register
class GAN(AdversarialRecipe):
    Params = GANParams

    def d_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> torch.Tensor:
        real_term = F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out))
        fake_term = F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
        return 0.5 * (real_term + fake_term)

    def g_loss(self, fake_out: torch.Tensor) -> torch.Tensor:
        if self.params.loss == "minimax":
            # log(1 - D(G(z))) = -BCE(logit, 0); minimising it is G's side of the minimax game.
            return -F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
        return F.binary_cross_entropy_with_logits(fake_out, torch.ones_like(fake_out))

    def equilibrium(self) -> dict[str, float]:
        return {"loss_d": math.log(2), "d_real": 0.5, "d_fake": 0.5, "separation": 1.0}

    def d_stat(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out).mean()
